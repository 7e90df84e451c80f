"""A Hugging Face Hub folder that timm and mixer_jax both load, and its
upload; docs/export.md ("Hub folder") describes the files and the card.
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
from mixer_jax.weights import registry
from mixer_jax.weights import timm_format

OUR_FIELD = 'mixer_jax'  # Our part of config.json (timm ignores it).


class PublishError(UserError, RuntimeError):
  """The folder cannot be written or uploaded (no head, token or network)."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One measured result for the model card."""
  name: str
  dataset: str
  split: str
  metric: str
  value: float  # A fraction for accuracies.
  step: Optional[int] = None


def timm_architecture(model: models.MlpMixer, image_size: int):
  """(timm name or None, model_args) that rebuild `model` in timm, whose
  names `mixer_{s,b,l}{16,32}_224` fix the family and patch size."""
  name = None
  for family in 'SBL':
    sizes = models.FAMILIES[family]
    if model.patch_size in (16, 32) and (
        model.num_blocks, model.hidden_dim) == (
            sizes['num_blocks'], sizes['hidden_dim']):
      name = f'mixer_{family.lower()}{model.patch_size}_224'
  ratios = [model.tokens_mlp_dim / model.hidden_dim,
            model.channels_mlp_dim / model.hidden_dim]
  args: Dict[str, Any] = {}
  if image_size != 224:
    args['img_size'] = image_size
  if ratios != [0.5, 4.0]:
    # timm sizes the MLPs as int(ratio * width): the ratio must give them back.
    if [int(r * model.hidden_dim) for r in ratios] != [
        model.tokens_mlp_dim, model.channels_mlp_dim]:
      name = None
    args['mlp_ratio'] = ratios
  return name, args


def gelu_gap(model: models.MlpMixer, params, image_size: int, *,
             batch: int = 8, seed: int = 0) -> Dict[str, float]:
  """How far the exact-GELU model (timm's) is from the tanh one on random
  images: the largest logit difference and the top-1 agreement."""
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
    value = (f'{100 * e.value:.2f}%' if 'accuracy' in e.metric
             else f'{e.value:.4g}')
    rows.append(f'| {e.name} | {e.dataset} | {e.split} | {e.metric} | '
                f'{value} | {"" if e.step is None else e.step} |')
  return '\n'.join(rows)


def _timm_use(loaded, repo_id: str, config: Mapping[str, Any]) -> str:
  """The card's PyTorch section: how timm builds and runs the model."""
  m = loaded.model
  if config.get('architecture'):
    text = ('```python\nimport timm\nmodel = timm.create_model('
            f"'hf-hub:{repo_id}', pretrained=True).eval()\n```")
  else:
    text = (
        'No timm name has this size; build it by hand:\n\n```python\n'
        'import safetensors.torch\n'
        'from timm.models.mlp_mixer import MlpMixer\n'
        f'model = MlpMixer(num_classes={loaded.num_classes}, '
        f'img_size={loaded.image_size}, patch_size={m.patch_size}, '
        f'num_blocks={m.num_blocks}, embed_dim={m.hidden_dim}, mlp_ratio=('
        f'{m.tokens_mlp_dim / m.hidden_dim}, '
        f'{m.channels_mlp_dim / m.hidden_dim}))\n'
        "model.load_state_dict(safetensors.torch.load_file("
        "'model.safetensors'))\n```")
  gap = config[OUR_FIELD].get('exact_gelu_difference')
  if gap:
    text += (
        '\n\ntimm runs the exact GELU; these weights were trained with the '
        f'tanh form. On {gap["images"]} random inputs the logits differ by '
        f'up to {gap["max_abs_logit_difference"]:.3g} and the top-1 class '
        f'agrees on {100 * gap["top1_agreement"]:.0f}% of them. For the '
        'trained function pass `act_layer=functools.partial('
        "torch.nn.GELU, approximate='tanh')` to `timm.create_model`.")
  return text


def model_card(loaded, config: Mapping[str, Any], *, repo_id: str,
               evaluations: Sequence[Evaluation], training: Optional[str],
               npz_name: str) -> str:
  """The README.md of the folder (YAML header as the Hub reads it)."""
  ours, m, size = config[OUR_FIELD], loaded.model, loaded.image_size
  gelu = 'tanh approximation' if m.gelu_approximate else 'exact (erf)'
  crop = (f'short side to {loaded.eval_resize}, central {size} crop'
          if loaded.eval_crop == 'resize_crop' else f'resize to {size}')
  names = (f' {len(loaded.class_names)} class names in `config.json`.'
           if loaded.class_names else '')
  return f"""---
license:  # Fill in: the licence you publish these weights under.
library_name: timm
tags: [image-classification, mlp-mixer, mixer_jax]
---

# MLP-Mixer {ours["variant"]} ({size}x{size}, {loaded.num_classes} classes)

An MLP-Mixer (arXiv 2105.01601) written by mixer_jax from \
`{loaded.portable_source}`: patch {m.patch_size}, {m.num_blocks} blocks, \
width {m.hidden_dim}, token MLP {m.tokens_mlp_dim}, channel MLP \
{m.channels_mlp_dim}, {models.count_params(loaded.params):,} parameters, \
trained with the {gelu} of GELU. Input: RGB in [-1, 1] (mean = std = 0.5 \
of x/255); evaluation: {crop} (bilinear).{names}

## Training

{training or 'Not recorded (not trained in a mixer_jax workdir).'}

## Evaluation

{_results_table(evaluations)}

## JAX (mixer_jax)

```python
from mixer_jax.weights import any_checkpoint
loaded = any_checkpoint.load('hf-hub:{repo_id}')
logits = loaded.model.apply({{'params': loaded.params}}, images)
```

`{npz_name}` holds the same weights in the official vision_transformer \
layout (`mixer_jax.load_pretrained(path)`).

## PyTorch (timm)

{_timm_use(loaded, repo_id, config)}
"""


def write_folder(loaded, out: str, *, repo_id: str = 'OWNER/NAME',
                 evaluations: Sequence[Evaluation] = (),
                 training: Optional[str] = None) -> Dict[str, str]:
  """Writes the Hub folder of `loaded` (with a head) into `out`; returns
  {role: path}. `repo_id` is the name the card's examples use."""
  if not loaded.num_classes:
    raise PublishError(f'{loaded.source} has no classification head; a Hub '
                       'model for timm needs one.')
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(
      official_format.unwrap(loaded.params)))
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
      'pretrained_cfg': {
          'input_size': [3, size, size], 'fixed_input_size': True,
          # Our eval resize is bilinear (tf.image), timm's Mixer default
          # bicubic. Our crops in timm's terms (hub.TimmInfo reads them back).
          'interpolation': 'bilinear',
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
                       evaluations=evaluations, training=training,
                       npz_name=os.path.basename(paths['npz'])))
  return paths


def push_folder(folder: str, repo_id: str, *, private: bool = False) -> str:
  """Uploads `folder` to the Hub repository `repo_id`; returns its URL."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  hub.parse(f'hf-hub:{repo_id}')  # The same OWNER/NAME rule as loading.
  if constants.HF_HUB_OFFLINE:
    raise PublishError(f'Cannot upload to {repo_id}: HF_HUB_OFFLINE is set; '
                       'unset it on a machine with network access.')
  if huggingface_hub.get_token() is None:
    raise PublishError(
        f'Cannot upload to {repo_id}: no Hugging Face token. Run `hf auth '
        'login` or set HF_TOKEN to a token with write access.')
  api = huggingface_hub.HfApi()
  try:
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id,
                               commit_message='Upload from mixer_jax')
  except Exception as e:  # pylint: disable=broad-except
    # huggingface_hub raises the errors of several libraries.
    raise PublishError(f'Upload to {repo_id} failed ({registry.first_line(e)}'
                       '). Check the network, the token\'s write access and '
                       'the name.') from e
  return commit.commit_url


def evaluations_from_records(records: Sequence[Mapping[str, Any]],
                             config) -> List[Evaluation]:
  """The newest value of each accuracy in a workdir's metrics records:
  `eval_*` of the main eval, `<name>/*` of `config.evals[name]`."""
  evals = dict(config.get('evals') or {})
  evals['eval'] = {'dataset': config.dataset, 'split': config.eval_split}
  newest = {}  # (name, dataset, split, metric) -> (step, value)
  for record in records:
    for key, value in record.items():
      if key.startswith('eval_'):  # The main eval's keys.
        key = 'eval/' + key.removeprefix('eval_')
      name, _, what = key.rpartition('/')
      entry = evals.get(name)
      if entry is None or what not in ('accuracy', 'top5'):
        continue
      metric = 'top-5 accuracy' if what == 'top5' else (
          'ReaL top-1 accuracy' if entry.get('kind') == 'real' else
          'top-1 accuracy')
      newest[(name, str(entry.get('dataset') or config.dataset),
              str(entry.get('split')), metric)] = (record.get('step'), value)
  return [Evaluation(*where, value=float(value), step=step)
          for where, (step, value) in sorted(newest.items())]
