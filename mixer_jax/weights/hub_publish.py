"""A Hugging Face Hub folder that timm and mixer_jax both load.

`write_folder(loaded, out)` writes, for any checkpoint `any_checkpoint.load`
accepts: `model.safetensors` (timm's state dict), `config.json` (timm's
schema, plus a `mixer_jax` field our loader reads back: the GELU form),
`<variant>.npz` (the official layout) and `README.md` (a model card with
the evaluations and their splits, and an empty licence field).
`push_folder(out, repo_id)` uploads it with `huggingface_hub` (its token
from `HF_TOKEN` or `hf auth login`).

timm builds its Mixer by name (`mixer_b16_224`: patch, depth and width
fixed), so a model of another size is written with a card that says how to
build it by hand; and timm always runs the exact GELU, so for weights
trained with the tanh form the card states how far timm's logits are.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from flax import traverse_util
import jax
import numpy as np

from mixer_jax import models
from mixer_jax.errors import UserError
from mixer_jax.weights import hub
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import timm_format

# timm's Mixer names: (patch, blocks, width) -> name. Token/channel MLP
# ratios default to (0.5, 4.0), the paper's; img_size to 224.
TIMM_ARCHITECTURES = {
    (32, 8, 512): 'mixer_s32_224', (16, 8, 512): 'mixer_s16_224',
    (32, 12, 768): 'mixer_b32_224', (16, 12, 768): 'mixer_b16_224',
    (32, 24, 1024): 'mixer_l32_224', (16, 24, 1024): 'mixer_l16_224',
}
_TIMM_DEFAULT_RATIOS = (0.5, 4.0)
_TIMM_DEFAULT_IMAGE = 224
OUR_FIELD = 'mixer_jax'  # Our part of config.json (timm ignores it).


class PublishError(UserError, RuntimeError):
  """The folder cannot be written or uploaded (no head, no token, no network)."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One measured result for the model card, e.g. ('eval', 'digits',
  'test', 'top-1 accuracy', 0.98, step)."""
  name: str
  dataset: str
  split: str
  metric: str
  value: float  # A fraction for accuracies.
  step: Optional[int] = None


def timm_architecture(model: models.MlpMixer, image_size: int):
  """(timm name or None, model_args) that rebuild `model` in timm."""
  key = (model.patch_size, model.num_blocks, model.hidden_dim)
  name = TIMM_ARCHITECTURES.get(key)
  ratios = (model.tokens_mlp_dim / model.hidden_dim,
            model.channels_mlp_dim / model.hidden_dim)
  args: Dict[str, Any] = {}
  if image_size != _TIMM_DEFAULT_IMAGE:
    args['img_size'] = image_size
  if ratios != _TIMM_DEFAULT_RATIOS:
    # timm sizes the MLPs as int(ratio * width): the ratio must give them back.
    if [int(r * model.hidden_dim) for r in ratios] != [
        model.tokens_mlp_dim, model.channels_mlp_dim]:
      name = None
    args['mlp_ratio'] = list(ratios)
  return name, args


def gelu_gap(model: models.MlpMixer, params, image_size: int, *,
             batch: int = 8, seed: int = 0) -> Dict[str, float]:
  """How far the exact-GELU model (timm's) is from the tanh one, measured.

  On `batch` uniform random images in [-1, 1]: the largest absolute logit
  difference and the share of images whose top-1 class agrees.
  """
  images = np.random.RandomState(seed).uniform(
      -1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  ours = np.asarray(model.apply({'params': params}, images))
  exact = np.asarray(model.clone(gelu_approximate=False).apply(
      {'params': params}, images))
  return {'max_abs_logit_difference': float(np.abs(ours - exact).max()),
          'top1_agreement': float(np.mean(
              ours.argmax(-1) == exact.argmax(-1))), 'images': batch}


def _results_table(evaluations: Sequence[Evaluation]) -> str:
  if not evaluations:
    return ('No evaluation was recorded with these weights; measure them '
            'with `python -m mixer_jax.evaluate` before you cite a number.')
  rows = ['| measured | dataset | split | metric | value | step |',
          '|---|---|---|---|---|---|']
  for e in evaluations:
    value = (f'{100 * e.value:.2f}%' if 'accuracy' in e.metric or
             e.metric.startswith('top') else f'{e.value:.4g}')
    rows.append(f'| {e.name} | {e.dataset} | {e.split} | {e.metric} | '
                f'{value} | {"" if e.step is None else e.step} |')
  return '\n'.join(rows)


def model_card(loaded, config: Mapping[str, Any], *, repo_id: str,
               num_params: int, evaluations: Sequence[Evaluation],
               training: Optional[str], npz_name: str) -> str:
  """The README.md of the folder (YAML header as the Hub reads it)."""
  ours, m, size = config[OUR_FIELD], loaded.model, loaded.image_size
  gelu = 'tanh approximation' if ours['gelu_approximate'] else 'exact (erf)'
  crop = (f'resize the short side to {loaded.eval_resize}, central {size} '
          'crop' if loaded.eval_crop == 'resize_crop' else
          f'resize to {size}')
  names = (f'\n- Classes: {len(loaded.class_names)} names in `config.json` '
           '(`label_names`).' if loaded.class_names else '')
  if config.get('architecture'):
    timm_use = ('```python\nimport timm\nmodel = timm.create_model('
                f"'hf-hub:{repo_id}', pretrained=True).eval()\n```")
  else:
    timm_use = (
        "timm builds Mixers by name, and no timm name has this model's "
        'size, so build it by hand and load the weights:\n\n```python\n'
        'import safetensors.torch\n'
        'from timm.models.mlp_mixer import MlpMixer\n'
        f'model = MlpMixer(num_classes={loaded.num_classes}, img_size={size}, '
        f'patch_size={m.patch_size}, num_blocks={m.num_blocks}, '
        f'embed_dim={m.hidden_dim}, mlp_ratio=('
        f'{m.tokens_mlp_dim / m.hidden_dim}, '
        f'{m.channels_mlp_dim / m.hidden_dim}))\n'
        "model.load_state_dict(safetensors.torch.load_file("
        "'model.safetensors'))\n```")
  if ours['gelu_approximate']:
    gap = ours.get('exact_gelu_difference')
    measured = (f' Measured at export on {gap["images"]} random inputs: '
                f'logits differ by up to {gap["max_abs_logit_difference"]:.3g}'
                f' and the top-1 class agrees on '
                f'{100 * gap["top1_agreement"]:.0f}% of them.' if gap else '')
    timm_use += (
        '\n\ntimm always builds its Mixer with the exact GELU; these weights '
        'were trained with the tanh form, so timm computes a slightly '
        f'different function.{measured} For the trained function in timm, '
        'pass `act_layer=functools.partial(torch.nn.GELU, '
        "approximate='tanh')` to `timm.create_model` (or to `MlpMixer`).")
  return f"""---
license:  # Fill in: the licence you publish these weights under.
library_name: timm
tags:
- image-classification
- mlp-mixer
- mixer_jax
---

# MLP-Mixer {ours["variant"]} ({size}x{size}, {loaded.num_classes} classes)

An MLP-Mixer (Tolstikhin et al., 2021, arXiv 2105.01601), written by \
mixer_jax from `{loaded.portable_source}`.

## Model

- Variant: {ours["variant"]}: patch {m.patch_size}, {m.num_blocks} blocks, \
width {m.hidden_dim}, token MLP {m.tokens_mlp_dim}, channel MLP \
{m.channels_mlp_dim}.
- Parameters: {num_params:,}.
- Input: {size}x{size} RGB, pixels scaled to [-1, 1] (mean = std = 0.5 of \
x/255); evaluation preprocessing: {crop} (bilinear).
- GELU: trained with the {gelu}.{names}

## Training

{training or 'Not recorded (these weights were not trained in a mixer_jax '
           'workdir).'}

## Evaluation

{_results_table(evaluations)}

## Use it in JAX (mixer_jax)

```python
from mixer_jax.weights import any_checkpoint
loaded = any_checkpoint.load('hf-hub:{repo_id}')
# images: (N, H, W, 3) in [-1, 1].
logits = loaded.model.apply({{'params': loaded.params}}, images)
```

or from the official-layout file `{npz_name}` with \
`mixer_jax.weights.pretrained.load_pretrained(path)` (also what the official \
vision_transformer code reads). mixer_jax reads the GELU form from \
`config.json`.

## Use it in PyTorch (timm)

{timm_use}

Preprocess as timm's `resolve_data_config` reads it from `config.json` \
(mean = std = 0.5).
"""


def write_folder(loaded, out: str, *, repo_id: str = 'OWNER/NAME',
                 evaluations: Sequence[Evaluation] = (),
                 training: Optional[str] = None) -> Dict[str, str]:
  """Writes the Hub folder of `loaded` (an `any_checkpoint.Loaded` with a
  head) into `out`; returns {role: path} of the files written.

  `repo_id` is the name the card's examples use, `evaluations` the results
  it lists, `training` a paragraph on the training data and config.
  """
  if not loaded.num_classes:
    raise PublishError(f'{loaded.source} has no classification head; a Hub '
                       'model for timm needs one.')
  params = jax.device_get(official_format.unwrap(loaded.params))
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  m, size = loaded.model, loaded.image_size
  architecture, model_args = timm_architecture(m, size)
  variant = official_format.infer_architecture(traverse_util.flatten_dict(
      params, sep='/')).variant or (
          f'custom_P{m.patch_size}_N{m.num_blocks}_C{m.hidden_dim}_'
          f'DS{m.tokens_mlp_dim}_DC{m.channels_mlp_dim}')
  ours = {'gelu_approximate': bool(m.gelu_approximate), 'variant': variant,
          'source': loaded.portable_source}
  if m.gelu_approximate:
    ours['exact_gelu_difference'] = gelu_gap(m, params, size)
  config = {
      'architecture': architecture,
      'num_classes': loaded.num_classes,
      'num_features': m.hidden_dim,
      'global_pool': 'avg',
      'pretrained_cfg': {
          'input_size': [3, size, size], 'fixed_input_size': True,
          # Our eval resize is bilinear (tf.image); timm's default for the
          # Mixers is bicubic, so name what this model was evaluated with.
          'interpolation': 'bilinear',
          # Our eval crops in timm's terms (hub.TimmInfo.eval_crop reads
          # them back): 'resize' is a squash to the input size itself.
          'crop_pct': (1.0 if loaded.eval_crop == 'resize' else
                       size / loaded.eval_resize),
          'crop_mode': ('center' if loaded.eval_crop == 'resize_crop' else
                        'squash'),
          'mean': list(hub.NATIVE_MEAN), 'std': list(hub.NATIVE_STD),
          'num_classes': loaded.num_classes, 'first_conv': 'stem.proj',
          'classifier': 'head'},
      'model_args': model_args,
      'label_names': loaded.class_names,
      OUR_FIELD: ours,
  }
  config = {k: v for k, v in config.items() if v}  # No null fields for timm.
  os.makedirs(out, exist_ok=True)
  paths = {'weights': os.path.join(out, hub.WEIGHTS_FILE),
           'config': os.path.join(out, hub.CONFIG_FILE),
           'npz': os.path.join(out, f'Mixer-{variant}.npz'),
           'card': os.path.join(out, 'README.md')}
  timm_format.export_timm(params, paths['weights'])
  pretrained.export_official(params, paths['npz'])
  with open(paths['config'], 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  with open(paths['card'], 'w', encoding='utf-8') as f:
    f.write(model_card(loaded, config, repo_id=repo_id,
                       num_params=models.count_params(params),
                       evaluations=evaluations, training=training,
                       npz_name=os.path.basename(paths['npz'])))
  return paths


def push_folder(folder: str, repo_id: str, *, private: bool = False) -> str:
  """Uploads `folder` to the Hub model repository `repo_id`; returns its URL.

  The token comes from where huggingface_hub keeps it (`HF_TOKEN`, or
  `hf auth login`); the repository is created if it does not exist.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  hub.parse(f'hf-hub:{repo_id}')  # The same OWNER/NAME rule as loading.
  if constants.HF_HUB_OFFLINE:
    raise PublishError(
        f'Cannot upload to {repo_id}: HF_HUB_OFFLINE is set; unset it on a '
        'machine with network access.')
  if huggingface_hub.get_token() is None:
    raise PublishError(
        f'Cannot upload to {repo_id}: no Hugging Face token. Run `hf auth '
        'login` or set HF_TOKEN to a token with write access.')
  api = huggingface_hub.HfApi()
  try:
    api.create_repo(repo_id, repo_type='model', private=private,
                    exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id,
                               repo_type='model',
                               commit_message='Upload from mixer_jax')
  except Exception as e:  # pylint: disable=broad-except
    # huggingface_hub raises HTTP, connection and validation errors of
    # several libraries; each becomes one line naming the repository.
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise PublishError(f'Upload to {repo_id} failed ({type(e).__name__}: '
                       f'{first}). Check the network, the token\'s write '
                       'access and the name.') from e
  return getattr(commit, 'commit_url', None) or (
      f'https://huggingface.co/{repo_id}')


def evaluations_from_records(records: Sequence[Mapping[str, Any]],
                             config) -> List[Evaluation]:
  """The newest value of each accuracy in a workdir's metrics records.

  `eval_accuracy` / `eval_top5` are the main eval (`config.eval_split`);
  `<name>/accuracy` and `<name>/top5` come from `config.evals[name]`.
  """
  evals = config.get('evals') or {}
  newest = {}  # (name, dataset, split, metric) -> (step, value)
  for record in records:
    for key, value in record.items():
      name, _, what = key.rpartition('/') if '/' in key else (
          'eval', '', key.removeprefix('eval_'))
      entry = evals.get(name) if '/' in key else {
          'dataset': config.dataset, 'split': config.eval_split}
      if (key.startswith('eval_') or '/' in key) and entry is not None and (
          what in ('accuracy', 'top5')):
        metric = 'top-5 accuracy' if what == 'top5' else (
            'ReaL top-1 accuracy' if entry.get('kind') == 'real' else
            'top-1 accuracy')
        newest[(name, str(entry.get('dataset') or config.dataset),
                str(entry.get('split')), metric)] = (record.get('step'), value)
  return [Evaluation(*where, value=float(value), step=step)
          for where, (step, value) in sorted(newest.items())]
