"""The defaults of every field, as a config file: `--config=configs/common.py`.

The fields, their defaults and their meaning are defined in the package
(mixer_jax/config_defaults.py), so that an installed mixer_jax knows them
without this repository. Override any field from the command line:
  python -m mixer_jax.train --config=configs/common.py --workdir=DIR \\
      --config.batch_size=64 --config.model.variant=S_16
"""

from mixer_jax import config_defaults


def get_config():
  """The default configuration (Mixer-B/16, ImageNet-1k scale)."""
  return config_defaults.get_config()
