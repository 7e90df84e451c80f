"""MLP-Mixer weights from the Hugging Face Hub (timm's repositories).

`hf-hub:OWNER/NAME[@REVISION]` names, the cache and what is read from
`config.json` are described in docs/weights.md.
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
from mixer_jax.weights.registry import first_line

PREFIXES = ('hf-hub:', 'hf_hub:')
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
# The normalisation mixer_jax's preprocessing produces: (x/255 - 0.5) / 0.5.
NATIVE_MEAN = NATIVE_STD = (0.5, 0.5, 0.5)
# timm's published Mixer repositories (for error messages).
TIMM_REPOSITORIES = (
    'timm/mixer_b16_224.goog_in21k', 'timm/mixer_b16_224.goog_in21k_ft_in1k',
    'timm/mixer_l16_224.goog_in21k', 'timm/mixer_l16_224.goog_in21k_ft_in1k',
    'timm/mixer_b16_224.miil_in21k', 'timm/mixer_b16_224.miil_in21k_ft_in1k')


@dataclasses.dataclass(frozen=True)
class HubName:
  """A parsed `hf-hub:OWNER/NAME[@REVISION]`."""
  repo_id: str
  revision: Optional[str] = None

  def __str__(self):
    return f'hf-hub:{self.repo_id}' + (f'@{self.revision}'
                                       if self.revision else '')


def is_hub_name(name) -> bool:
  return isinstance(name, str) and name.startswith(PREFIXES)


def parse(name: str) -> HubName:
  """Parses `hf-hub:OWNER/NAME[@REVISION]`; ValueError if not of that form."""
  repo_id, at, revision = name.split(':', 1)[-1].partition('@')
  if not is_hub_name(name) or not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id) or (
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

  try:
    info = TimmInfo(
        num_classes=get('num_classes'),
        mean=tuple(np.broadcast_to(get('mean', NATIVE_MEAN), 3).astype(float)),
        std=tuple(np.broadcast_to(get('std', NATIVE_STD), 3).astype(float)),
        crop_pct=float(get('crop_pct', 0.875)),
        crop_mode=get('crop_mode', 'center'),
        label_names=list(get('label_names') or []) or None,
        tag=cfg.get('tag') or '',
        stated_gelu_approximate=(data.get('mixer_jax') or {}).get(
            'gelu_approximate'))
  except (TypeError, ValueError) as e:
    raise PretrainedError(f'{CONFIG_FILE}: {first_line(e)}.') from e
  if info.crop_mode not in ('center', 'squash') or not (
      0 < info.crop_pct <= 1) or min(info.std) <= 0:
    raise PretrainedError(
        f'{CONFIG_FILE}: crop_mode={info.crop_mode!r}, crop_pct='
        f'{info.crop_pct}, std={info.std} are not supported: use crop_mode '
        "'center' or 'squash', crop_pct in (0, 1] and a positive std.")
  return info


def fold_normalisation(flat: Dict[str, np.ndarray], mean, std
                       ) -> Dict[str, np.ndarray]:
  """Rewrites the stem so that [-1, 1] inputs act as (x/255 - mean) / std.

  With u = x/127.5 - 1 the model's input and v = (x/255 - mean)/std the one
  the weights expect, v = u / (2 std) + (0.5 - mean) / std per channel; the
  stem's kernel covers each patch exactly once, so the fold is exact:
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
  except Exception as e:  # pylint: disable=broad-except
    # safetensors raises its own (Rust) error types for damaged files.
    raise PretrainedError(f'{source} is not a readable safetensors file '
                          f'({first_line(e)}); download it again.') from e
  info = read_timm_config(config) if config is not None else TimmInfo()
  # The GELU the weights were trained with: tanh for Google's JAX-trained
  # (goog) and our own files, exact (PyTorch) for other timm weights.
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
  if (info.mean, info.std) != (NATIVE_MEAN, NATIVE_STD):
    flat = fold_normalisation(flat, info.mean, info.std)
  return official_format.WeightFile(
      flat, source, 'hub' if is_hub_name(source) else 'timm',
      gelu_approximate=bool(gelu), timm=info)


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
        f'be downloaded ({first_line(e)}). Without network access, copy the '
        'cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE) from a machine '
        'that has downloaded it, and set HF_HUB_OFFLINE=1.') from e
  except errors.HfHubHTTPError as e:  # Also: no such repository or file.
    raise registry.CheckpointNotFoundError(
        f'{hub_name}: {filename}: {first_line(e)}. timm\'s Mixer '
        f'repositories are {", ".join(TIMM_REPOSITORIES)}; private or gated '
        'ones need a token (HF_TOKEN or `hf auth login`).') from e


def _read_json(path: str, advice: str = '.') -> Any:
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
  config = _read_json(_download(hub_name, CONFIG_FILE))
  return load_safetensors(weights, config=config, source=str(hub_name),
                          repo_id=hub_name.repo_id)


def is_folder(path) -> bool:
  return (isinstance(path, (str, os.PathLike)) and
          os.path.isfile(os.path.join(os.fspath(path), WEIGHTS_FILE)))


def sidecar_config(path: str) -> Optional[Dict[str, Any]]:
  """The timm `config.json` next to a `.safetensors` file, parsed, if any;
  a damaged one is an error, never a silent fallback to the defaults."""
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
