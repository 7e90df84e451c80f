"""Data sets for mixer_jax: the built-in `digits` builder and the sources.

Importing this package registers the `digits` TFDS builder (digits.py), so
`tfds.builder('digits')` works anywhere after `import mixer_jax.data.datasets`.
sources.py reads TFDS data sets by name and folders of images for the input
pipeline.
"""

from mixer_jax.data.datasets import digits  # Registers 'digits' with TFDS.
