"""Data sets: the built-in `digits` TFDS builder (registered on import, so
`tfds.builder('digits')` works anywhere after it) and the sources."""

from mixer_jax.data.datasets import digits  # Registers 'digits' with TFDS.
