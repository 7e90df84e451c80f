"""A Hugging Face Hub folder that timm and mixer_jax both load.

`write_folder(loaded, out)` writes, for any checkpoint `any_checkpoint.load`
accepts:

  model.safetensors   timm's `MlpMixer` state dict (`timm_format`);
  config.json         timm's schema: `architecture`, `num_classes`,
                      `pretrained_cfg` (input size, interpolation, crop_pct,
                      mean and std of this model's preprocessing) and
                      `label_names` when known; plus a `mixer_jax` field
                      that our loader reads back (the GELU form);
  <variant>.npz       the official layout, for JAX users
                      (`weights.pretrained.load_pretrained`);
  README.md           a model card: variant, size, data, evaluations with
                      their splits, how to load it in JAX and in timm, and
                      an empty licence field for the author to fill in.

`push_folder(out, repo_id)` uploads it with `huggingface_hub` (its token
from `HF_TOKEN` or `hf auth login`).

Two limits of timm decide what the folder can say:
- timm's Mixer is built by name (`mixer_b16_224`, ...) whose patch size,
  depth and width are fixed by that name; `model_args` may only add what
  the name leaves open (the image size, the MLP ratios). A model of another
  size is still written (our loader reads any size from the tensors), and
  its card says that timm must build it by hand.
- timm's Mixer always uses the exact (erf) GELU and cannot be told the tanh
  form through `config.json`. Weights trained here use the tanh form (the
  official one); the card states the form and, measured at export, how far
  timm's logits are from the model's own on random inputs.
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
# mixer_jax feeds every model pixels scaled to [-1, 1]: x/255 - 0.5, / 0.5.
MEAN = STD = (0.5, 0.5, 0.5)
OUR_FIELD = 'mixer_jax'  # Our part of config.json (timm ignores it).


class PublishError(UserError, RuntimeError):
  """The folder cannot be written or uploaded (no head, no token, no network)."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One measured result for the model card.

  Attributes:
    name: what was measured, e.g. 'eval' or a `config.evals` name.
    dataset: TFDS name (or folder) it was measured on.
    split: the split, e.g. 'test' or 'train[98%:]'.
    metric: e.g. 'accuracy'.
    value: the number (a fraction for accuracies).
    step: training step of the measurement, when known.
  """
  name: str
  dataset: str
  split: str
  metric: str
  value: float
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


def timm_config(loaded, architecture: Optional[str], model_args,
                gelu: Mapping[str, Any]) -> Dict[str, Any]:
  """config.json in timm's schema, plus our `mixer_jax` field."""
  size = loaded.image_size
  config = {
      'architecture': architecture,
      'num_classes': loaded.num_classes,
      'num_features': loaded.model.hidden_dim,
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
          'mean': list(MEAN), 'std': list(STD),
          'num_classes': loaded.num_classes, 'first_conv': 'stem.proj',
          'classifier': 'head'},
      OUR_FIELD: {
          'gelu_approximate': bool(loaded.model.gelu_approximate),
          'variant': variant_name(loaded.model),
          'source': loaded.portable_source},
  }
  if architecture is None:
    del config['architecture']
  if model_args:
    config['model_args'] = dict(model_args)
  if loaded.class_names:
    config['label_names'] = list(loaded.class_names)
  if gelu:
    config[OUR_FIELD]['exact_gelu_difference'] = dict(gelu)
  return config


def variant_name(model: models.MlpMixer) -> str:
  """'B_16' for a paper size, else 'custom_P<patch>' with the sizes."""
  for family, sizes in models.FAMILIES.items():
    if all(getattr(model, k) == v for k, v in sizes.items()):
      return f'{family}_{model.patch_size}'
  return (f'custom_P{model.patch_size}_N{model.num_blocks}_'
          f'C{model.hidden_dim}_DS{model.tokens_mlp_dim}_'
          f'DC{model.channels_mlp_dim}')


def _results_table(evaluations: Sequence[Evaluation]) -> str:
  if not evaluations:
    return ('No evaluation was recorded with these weights; measure them '
            'with `python -m mixer_jax.evaluate` before you cite a number.\n')
  rows = ['| measured | dataset | split | metric | value | step |',
          '|---|---|---|---|---|---|']
  for e in evaluations:
    value = (f'{100 * e.value:.2f}%' if 'accuracy' in e.metric or
             e.metric.startswith('top') else f'{e.value:.4g}')
    rows.append(f'| {e.name} | {e.dataset} | {e.split} | {e.metric} | '
                f'{value} | {"" if e.step is None else e.step} |')
  return '\n'.join(rows) + '\n'


def model_card(loaded, config: Mapping[str, Any], *, repo_id: str,
               num_params: int, evaluations: Sequence[Evaluation],
               training: Optional[str], npz_name: str) -> str:
  """The README.md of the folder (YAML header as the Hub reads it)."""
  ours = config[OUR_FIELD]
  architecture = config.get('architecture')
  gelu = 'tanh approximation' if ours['gelu_approximate'] else 'exact (erf)'
  size = loaded.image_size
  lines = [
      '---',
      'license:  # Fill in: the licence you publish these weights under.',
      'library_name: timm',
      'tags:', '- image-classification', '- mlp-mixer', '- mixer_jax',
      '---', '',
      f'# MLP-Mixer {ours["variant"]} ({size}x{size}, '
      f'{loaded.num_classes} classes)', '',
      'An MLP-Mixer (Tolstikhin et al., 2021, arXiv 2105.01601), written by '
      'mixer_jax from `' + loaded.portable_source + '`.',
      '',
      '## Model', '',
      f'- Variant: {ours["variant"]}: patch {loaded.model.patch_size}, '
      f'{loaded.model.num_blocks} blocks, width {loaded.model.hidden_dim}, '
      f'token MLP {loaded.model.tokens_mlp_dim}, channel MLP '
      f'{loaded.model.channels_mlp_dim}.',
      f'- Parameters: {num_params:,}.',
      f'- Input: {size}x{size} RGB, pixels scaled to [-1, 1] '
      '(mean = std = 0.5 of x/255); evaluation preprocessing: '
      + ('resize the short side to '
         f'{loaded.eval_resize}, central {size} crop'
         if loaded.eval_crop == 'resize_crop' else f'resize to {size}')
      + ' (bilinear).',
      f'- GELU: trained with the {gelu}.',
  ]
  if loaded.class_names:
    lines.append(f'- Classes: {len(loaded.class_names)} names in '
                 '`config.json` (`label_names`).')
  lines += ['', '## Training', '',
            training or 'Not recorded (these weights were not trained in a '
            'mixer_jax workdir).', '',
            '## Evaluation', '', _results_table(evaluations).rstrip(), '',
            '## Use it in JAX (mixer_jax)', '', '```python',
            'from mixer_jax.weights import any_checkpoint',
            f"loaded = any_checkpoint.load('hf-hub:{repo_id}')",
            "logits = loaded.model.apply({'params': loaded.params}, images)"
            '  # (N, H, W, 3) in [-1, 1]',
            '```', '',
            f'or from the official-layout file `{npz_name}` with '
            '`mixer_jax.weights.pretrained.load_pretrained(path)` (also '
            'what the official vision_transformer code reads). mixer_jax '
            'reads the GELU form from `config.json`.', '',
            '## Use it in PyTorch (timm)', '']
  if architecture:
    lines += ['```python', 'import timm',
              f"model = timm.create_model('hf-hub:{repo_id}', "
              'pretrained=True).eval()', '```', '']
  else:
    lines += ['timm builds Mixers by name, and no timm name has this '
              "model's size, so build it by hand and load the weights:", '',
              '```python', 'import safetensors.torch',
              'from timm.models.mlp_mixer import MlpMixer',
              f'model = MlpMixer(num_classes={loaded.num_classes}, '
              f'img_size={size}, patch_size={loaded.model.patch_size}, '
              f'num_blocks={loaded.model.num_blocks}, '
              f'embed_dim={loaded.model.hidden_dim}, mlp_ratio=('
              f'{loaded.model.tokens_mlp_dim / loaded.model.hidden_dim}, '
              f'{loaded.model.channels_mlp_dim / loaded.model.hidden_dim}))',
              "model.load_state_dict(safetensors.torch.load_file("
              "'model.safetensors'))", '```', '']
  if ours['gelu_approximate']:
    gap = ours.get('exact_gelu_difference') or {}
    measured = (f' Measured at export on {gap["images"]} random inputs: '
                f'logits differ by up to {gap["max_abs_logit_difference"]:.3g}'
                f' and the top-1 class agrees on '
                f'{100 * gap["top1_agreement"]:.0f}% of them.'
                if gap else '')
    lines += ['timm always builds its Mixer with the exact GELU; these '
              'weights were trained with the tanh form, so timm computes a '
              'slightly different function.' + measured + ' For the '
              'trained function in timm, pass `act_layer=functools.partial('
              "torch.nn.GELU, approximate='tanh')` to `timm.create_model` "
              '(or to `MlpMixer`).',
              '']
  lines += ['Preprocess as timm\'s `resolve_data_config` reads it from '
            '`config.json` (mean = std = 0.5).', '']
  return '\n'.join(lines)


def write_folder(loaded, out: str, *, repo_id: str = 'OWNER/NAME',
                 evaluations: Sequence[Evaluation] = (),
                 training: Optional[str] = None) -> Dict[str, str]:
  """Writes the Hub folder for `loaded` (an `any_checkpoint.Loaded`).

  Args:
    loaded: the checkpoint (with its head: a Hub model classifies).
    out: the folder (created; files of the same names are replaced).
    repo_id: the Hub name the card's examples use.
    evaluations: results to list in the card, each with its split.
    training: a paragraph on the training data and config, if known.

  Returns:
    {role: path} of the files written.
  """
  if not loaded.num_classes:
    raise PublishError(f'{loaded.source} has no classification head; a Hub '
                       'model for timm needs one.')
  params = jax.device_get(official_format.unwrap(loaded.params))
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  architecture, model_args = timm_architecture(loaded.model,
                                               loaded.image_size)
  gap = (gelu_gap(loaded.model, params, loaded.image_size)
         if loaded.model.gelu_approximate else {})
  config = timm_config(loaded, architecture, model_args, gap)
  os.makedirs(out, exist_ok=True)
  paths = {'weights': os.path.join(out, hub.WEIGHTS_FILE),
           'config': os.path.join(out, hub.CONFIG_FILE),
           'npz': os.path.join(out, f'Mixer-{config[OUR_FIELD]["variant"]}'
                               '.npz'),
           'card': os.path.join(out, 'README.md')}
  timm_format.export_timm(params, paths['weights'])
  pretrained.export_official(params, paths['npz'])
  with open(paths['config'], 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  with open(paths['card'], 'w', encoding='utf-8') as f:
    f.write(model_card(loaded, config, repo_id=repo_id,
                       num_params=num_params, evaluations=evaluations,
                       training=training,
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
  newest: Dict[str, tuple] = {}
  for record in records:
    for key, value in record.items():
      if key in ('eval_accuracy', 'eval_top5') or (
          '/' in key and key.split('/', 1)[1] in ('accuracy', 'top5')):
        newest[key] = (record.get('step'), value)
  found = []
  evals = config.get('evals') or {}
  for key, (step, value) in sorted(newest.items()):
    if key.startswith('eval_'):
      name, dataset, split = 'eval', config.dataset, config.eval_split
      metric = 'top-1 accuracy' if key == 'eval_accuracy' else 'top-5 accuracy'
    else:
      name, what = key.split('/', 1)
      entry = evals.get(name)
      if entry is None:
        continue
      dataset = entry.get('dataset') or config.dataset
      split = entry.get('split')
      metric = 'top-1 accuracy' if what == 'accuracy' else 'top-5 accuracy'
      if entry.get('kind') == 'real':
        metric = 'ReaL top-1 accuracy'
    found.append(Evaluation(name=name, dataset=str(dataset),
                            split=str(split), metric=metric,
                            value=float(value), step=step))
  return found
