"""MLP-Mixer weights from the Hugging Face Hub (timm's repositories).

Everywhere a checkpoint is taken, `hf-hub:OWNER/NAME[@REVISION]` is too
(e.g. `hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k`; a branch, tag or
commit, default `main`): `model.safetensors` (timm's state dict) and
`config.json` (mean, std, crop_pct, crop_mode, label_names) are fetched by
`huggingface_hub.hf_hub_download`, so its cache (`HF_HUB_CACHE`), offline
mode (`HF_HUB_OFFLINE=1`) and tokens (`HF_TOKEN`) apply. The architecture
is read from the shapes, and mean/std are folded into the stem (exact: the
stem is linear, its patches never overlap), so every model here takes
pixels in [-1, 1]. The goog weights were trained in JAX with the tanh GELU,
MIIL's and other timm weights in PyTorch with the exact one; each is run
with its own (`load_safetensors` decides; `gelu_approximate=` overrides).

Names say what a repository claims, not what it scores: timm's published
top-1 for `mixer_b16_224.goog_in21k_ft_in1k` (76.6%) is the paper's number
for B/16 trained on ImageNet-1k from scratch (76.44%), not its 21k -> 1k
number (80.64%).
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from flax import traverse_util
import numpy as np

from mixer_jax import version
from mixer_jax.weights import official_format
from mixer_jax.weights import registry
from mixer_jax.weights import timm_format
from mixer_jax.weights.official_format import PretrainedError

PREFIXES = ('hf-hub:', 'hf_hub:')
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
# The normalisation mixer_jax's preprocessing produces: (x/255 - 0.5) / 0.5.
NATIVE_MEAN = NATIVE_STD = (0.5, 0.5, 0.5)

# timm's published Mixer repositories (for error messages and the README).
TIMM_REPOSITORIES = (
    'timm/mixer_b16_224.goog_in21k',
    'timm/mixer_b16_224.goog_in21k_ft_in1k',
    'timm/mixer_l16_224.goog_in21k',
    'timm/mixer_l16_224.goog_in21k_ft_in1k',
    'timm/mixer_b16_224.miil_in21k',
    'timm/mixer_b16_224.miil_in21k_ft_in1k',
)

_REPO_RE = re.compile(r'^[\w.-]+/[\w.-]+$')


@dataclasses.dataclass(frozen=True)
class HubName:
  """A parsed `hf-hub:OWNER/NAME[@REVISION]`."""
  repo_id: str
  revision: Optional[str] = None

  def __str__(self):
    rev = f'@{self.revision}' if self.revision else ''
    return f'hf-hub:{self.repo_id}{rev}'


def is_hub_name(name) -> bool:
  """Whether `name` is a string starting with `hf-hub:`."""
  return isinstance(name, str) and name.startswith(PREFIXES)


def parse(name: str) -> HubName:
  """Parses `hf-hub:OWNER/NAME[@REVISION]`; ValueError if not of that form."""
  repo_id, at, revision = name.split(':', 1)[-1].partition('@')
  if not is_hub_name(name) or not _REPO_RE.match(repo_id) or (
      at and not revision):
    raise ValueError(
        f'{name!r} is not a Hub name: expected hf-hub:OWNER/NAME or '
        f'hf-hub:OWNER/NAME@REVISION, e.g. hf-hub:{TIMM_REPOSITORIES[1]}.')
  return HubName(repo_id, revision or None)


@dataclasses.dataclass(frozen=True)
class TimmInfo:
  """What a timm `config.json` says about its weights."""
  num_classes: Optional[int] = None
  mean: Tuple[float, ...] = NATIVE_MEAN  # Of x/255, per channel.
  std: Tuple[float, ...] = NATIVE_STD
  crop_pct: float = 0.875  # Central crop of input_size / crop_pct.
  # 'center': the short side resized; 'squash': the whole image, to a square.
  crop_mode: str = 'center'
  label_names: Optional[List[str]] = None
  tag: str = ''  # E.g. 'goog_in21k_ft_in1k'.
  stated_gelu_approximate: Optional[bool] = None  # As our exports state it.

  def eval_resize(self, image_size: int) -> int:
    """Short side to resize to before the central `image_size` crop."""
    return int(round(image_size / self.crop_pct))

  @property
  def eval_crop(self) -> str:
    """`preprocess.eval_image`'s crop for timm's crop_mode and crop_pct."""
    if self.crop_mode == 'squash':
      return 'resize' if self.crop_pct == 1 else 'squash_crop'
    return 'resize_crop'


def read_timm_config(data: Dict[str, Any]) -> TimmInfo:
  """Reads a parsed timm `config.json` (the `pretrained_cfg` part first)."""
  cfg = data.get('pretrained_cfg') or {}

  def get(key, default=None):
    value = cfg.get(key, data.get(key))
    return default if value is None else value

  def triple(key, default):
    value = get(key, default)
    value = (value,) * 3 if np.ndim(value) == 0 else tuple(value)
    if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
      raise PretrainedError(f'{CONFIG_FILE}: {key}={value!r} is not 3 numbers.')
    return tuple(float(v) for v in value)

  info = TimmInfo(
      num_classes=get('num_classes'), mean=triple('mean', NATIVE_MEAN),
      std=triple('std', NATIVE_STD), crop_pct=float(get('crop_pct', 0.875)),
      crop_mode=get('crop_mode', 'center'),
      label_names=list(get('label_names') or []) or None,
      tag=cfg.get('tag') or '',
      stated_gelu_approximate=(data.get('mixer_jax') or {}).get(
          'gelu_approximate'))
  if min(info.std) <= 0:
    raise PretrainedError(f'{CONFIG_FILE}: std={info.std} must be positive.')
  if not 0 < info.crop_pct <= 1:
    raise PretrainedError(
        f'{CONFIG_FILE}: crop_pct={info.crop_pct} must be in (0, 1].')
  if info.crop_mode not in ('center', 'squash'):
    raise PretrainedError(
        f"{CONFIG_FILE}: crop_mode={info.crop_mode!r} is not supported: use "
        "'center' or 'squash'.")
  if not isinstance(info.stated_gelu_approximate, (bool, type(None))):
    raise PretrainedError(
        f'{CONFIG_FILE}: mixer_jax.gelu_approximate='
        f'{info.stated_gelu_approximate!r} must be true or false.')
  return info


def fold_normalisation(flat: Dict[str, np.ndarray], mean, std
                       ) -> Dict[str, np.ndarray]:
  """Rewrites the stem so that [-1, 1] inputs act as (x/255 - mean) / std.

  With u = x/127.5 - 1 the model's input and v = (x/255 - mean)/std the one
  the weights expect, v = u / (2 std) + (0.5 - mean) / std per channel; the
  stem is a convolution whose kernel covers each patch exactly once, so
  conv(K, v) + b = conv(K / (2 std), u) + b + sum(K * (0.5 - mean) / std).
  """
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  kernel = np.asarray(flat['stem/kernel'], np.float64)  # (P, P, 3, C).
  bias = np.asarray(flat['stem/bias'], np.float64)
  out = dict(flat)
  out['stem/kernel'] = (kernel / (2 * std)[None, None, :, None]).astype(
      np.float32)
  out['stem/bias'] = (bias + np.einsum('hwco,c->o', kernel,
                                       (0.5 - mean) / std)).astype(np.float32)
  return out


def _first_line(error) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else repr(error)


def load_safetensors(path: str, *, config: Optional[Dict[str, Any]] = None,
                     source: Optional[str] = None,
                     repo_id: str = '') -> official_format.WeightFile:
  """Reads a timm-format `.safetensors` file with its parsed `config.json`
  (without one: our own export's conventions) into a tree taking [-1, 1]."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  source = source or path
  try:
    with safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
      state = {key: f.get_tensor(key) for key in f.keys()}
  except FileNotFoundError as e:
    raise registry.CheckpointNotFoundError(f'No file at {path}.') from e
  except Exception as e:  # pylint: disable=broad-except
    # safetensors raises its own (Rust) error types for damaged files.
    raise PretrainedError(
        f'{source} is not a readable safetensors file ({type(e).__name__}: '
        f'{_first_line(e)}); download it again.') from e
  info = read_timm_config(config) if config is not None else TimmInfo()
  # The GELU form the weights were trained with: as our exports state it;
  # else tanh for Google's JAX-trained weights (goog) and for our files
  # without a config, exact (timm's, PyTorch) for all others.
  gelu = info.stated_gelu_approximate
  if gelu is None:
    gelu = ('goog' in f'{repo_id} {info.tag}'.lower() if config is not None
            else metadata.get('source') == 'mixer_jax')
  try:
    tree = timm_format.from_timm_state_dict(state)
  except ValueError as e:
    raise PretrainedError(f'{source}: {e}') from None
  flat = traverse_util.flatten_dict(tree, sep='/')
  official_format.check_finite(flat, source)
  if 'stem/kernel' not in flat or 'stem/bias' not in flat:
    raise PretrainedError(
        f'{source} has no stem.proj.weight/bias: not a timm MlpMixer.')
  head = flat.get('head/kernel')
  if info.num_classes is not None and head is not None and (
      head.shape[-1] != int(info.num_classes)):
    raise PretrainedError(
        f'{source}: {CONFIG_FILE} says num_classes={info.num_classes} but the '
        f'head has {head.shape[-1]} outputs; the files do not belong '
        'together.')
  if not (np.allclose(info.mean, NATIVE_MEAN) and
          np.allclose(info.std, NATIVE_STD)):
    flat = fold_normalisation(flat, info.mean, info.std)
  return official_format.WeightFile(
      flat, source, 'hub' if is_hub_name(source) else 'timm',
      gelu_approximate=gelu, timm=info)


def _download(hub_name: HubName, filename: str) -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.hf_hub_download(
        hub_name.repo_id, filename, revision=hub_name.revision,
        library_name='mixer_jax', library_version=version.__version__)
  except errors.LocalEntryNotFoundError as e:
    raise registry.CheckpointNotFoundError(
        f'{hub_name}: {filename} is not in the Hugging Face cache and cannot '
        f'be downloaded ({_first_line(e)}). Without network access, copy the '
        'cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE) from a machine '
        'that has downloaded it, and set HF_HUB_OFFLINE=1.') from e
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
          errors.EntryNotFoundError, errors.GatedRepoError) as e:
    raise registry.CheckpointNotFoundError(
        f'{hub_name}: {type(e).__name__}: {_first_line(e)}. timm\'s Mixer '
        f'repositories are {", ".join(TIMM_REPOSITORIES)}; private or gated '
        'ones need a token (HF_TOKEN or `hf auth login`).') from e
  except errors.HfHubHTTPError as e:
    raise registry.CheckpointNotFoundError(
        f'{hub_name}: download of {filename} failed: {_first_line(e)}') from e


def _read_json(path: str, advice: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise PretrainedError(f'{path} cannot be read as JSON ({type(e).__name__}'
                          f': {e}){advice}') from e


def load(name: str) -> official_format.WeightFile:
  """Downloads (or reads from the cache) and reads a Hub checkpoint."""
  hub_name = parse(name)
  weights = _download(hub_name, WEIGHTS_FILE)
  config = _read_json(_download(hub_name, CONFIG_FILE), '.')
  return load_safetensors(weights, config=config, source=str(hub_name),
                          repo_id=hub_name.repo_id)


def is_folder(path) -> bool:
  """Whether `path` is a local folder holding `model.safetensors` (a Hub
  repository's files, e.g. what `mixer_jax.export --format=hub` writes)."""
  return (isinstance(path, (str, os.PathLike)) and
          os.path.isfile(os.path.join(os.fspath(path), WEIGHTS_FILE)))


def sidecar_config(path: str) -> Optional[Dict[str, Any]]:
  """The timm `config.json` next to a `.safetensors` file, parsed, if any.

  Other JSON files there are ignored; a damaged one is an error, never a
  silent fallback to other preprocessing and class names.
  """
  candidate = os.path.join(os.path.dirname(os.path.abspath(path)),
                           CONFIG_FILE)
  if not os.path.isfile(candidate):
    return None
  data = _read_json(candidate, (
      f'; repair it, or move it away to load {os.path.basename(path)} with '
      'the defaults (ImageNet preprocessing, no class names).'))
  is_timm = isinstance(data, dict) and ('pretrained_cfg' in data or str(
      data.get('architecture', '')).startswith('mixer_'))
  return data if is_timm else None
