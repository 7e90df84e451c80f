"""Serving export: `python -m mixer_jax.export`.

  python -m mixer_jax.export --checkpoint=workdirs/quickstart --out=/tmp/qs \
      --format=stablehlo
  python -m mixer_jax.export \
      --checkpoint=hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k \
      --out=/tmp/b16_savedmodel --format=savedmodel

docs/export.md describes each format and `serving_info.json`.
"""

import json
import os
from typing import Optional

from absl import app
from absl import flags
import numpy as np

# Before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line
from mixer_jax.training import errors

STABLEHLO_FILE = 'model.jax_export'
INFO_FILE = 'serving_info.json'
FORMATS = ('stablehlo', 'savedmodel', 'onnx', 'hub')
ONNX_FILE = 'model.onnx'


def _host_params(loaded):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.params)


def serving_info(loaded, fmt: str, preprocess: bool) -> dict:
  return {
      'format': fmt, 'checkpoint': loaded.portable_source,
      'image_size': loaded.image_size, 'input_range': [-1.0, 1.0],
      'eval_crop': loaded.eval_crop, 'eval_resize': loaded.eval_resize,
      'preprocessing_inside': fmt == 'savedmodel' and preprocess,
      'num_classes': loaded.num_classes, 'class_names': loaded.class_names,
  }


def export_stablehlo(loaded, out: str) -> str:
  """Writes `out/model.jax_export` (batch dimension symbolic); its path."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mixer_jax.training import compiled
  size = loaded.image_size
  batch, = jax.export.symbolic_shape('batch')
  params = _host_params(loaded)
  forward = compiled.forward(loaded.model)
  exported = jax.export.export(jax.jit(lambda x: forward(params, x)))(
      jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, STABLEHLO_FILE)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return path


def export_savedmodel(loaded, out: str, *,
                      preprocess: bool = True) -> str:
  """Writes a TF SavedModel to `out` (docs/export.md); `out`."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from jax.experimental import jax2tf
  from mixer_jax.data import preprocess as pp
  from mixer_jax.training import compiled

  size = loaded.image_size
  crop, resize = loaded.eval_crop, loaded.eval_resize
  converted = jax2tf.convert(
      compiled.forward(loaded.model), with_gradient=False,
      polymorphic_shapes=[None, f'(b, {size}, {size}, 3)'])
  module = tf.Module()
  module.params = tf.nest.map_structure(
      lambda x: tf.Variable(x, trainable=False), _host_params(loaded))

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.float32, name='images')])
  def serving_float(images):
    return {'logits': converted(module.params, images)}

  def from_uint8(images):
    if preprocess:
      images = tf.map_fn(
          lambda image: pp.eval_image(image, size, crop=crop,
                                      resize_size=resize),
          images, fn_output_signature=tf.TensorSpec([size, size, 3],
                                                    tf.float32))
    else:
      images = pp.normalize(images)
    return {'logits': converted(module.params, images)}

  shape = [None, None, None, 3] if preprocess else [None, size, size, 3]
  serving_default = tf.function(from_uint8, autograph=False, input_signature=[
      tf.TensorSpec(shape, tf.uint8, name='images')])
  module.serving_float = serving_float
  module.serving_default = serving_default
  tf.saved_model.save(module, out, signatures={
      'serving_default': serving_default.get_concrete_function(),
      'serving_float': serving_float.get_concrete_function()})
  return out


def export_onnx(loaded, out: str) -> str:
  """Writes `out/model.onnx` (see `weights.onnx_format`)."""
  from mixer_jax.weights import onnx_format  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  return onnx_format.save_onnx(loaded.model, _host_params(loaded),
                               loaded.image_size,
                               os.path.join(out, ONNX_FILE))


def _training_text(loaded, weights: str) -> Optional[str]:
  """The model card's training paragraph, from a workdir's config."""
  from mixer_jax.weights import loaded as loaded_module  # pylint: disable=g-import-not-at-top
  config = loaded.config
  if config is None:
    return None
  init_from = (f', initialised from '
               f'`{loaded_module.portable_name(config.init_from)}`'
               if config.init_from else '')
  return (f'Trained with mixer_jax on `{config.dataset}` split '
          f'`{config.train_split}` at {config.image_size}x{config.image_size}'
          f' for {loaded.step} steps of batch {config.batch_size} '
          f'({config.optimizer}, learning rate {config.learning_rate:g}, '
          f'{config.lr_schedule} schedule, weight decay '
          f'{config.weight_decay:g}' + init_from
          + ('; these are the EMA weights (decay '
             f'{config.ema_decay:g})' if weights == 'ema' else '') + ').')


def export_hub(loaded, out: str, *, workdir: Optional[str] = None,
               weights: str = 'params', push_to: Optional[str] = None) -> str:
  """Writes the Hub folder (and uploads it with `push_to`); with the
  training `workdir`, its card lists the run's evaluations."""
  from mixer_jax.training import reporting  # pylint: disable=g-import-not-at-top
  from mixer_jax.weights import hub_publish  # pylint: disable=g-import-not-at-top
  evaluations = []
  if workdir is not None and weights == 'params':
    # The run's own records: each value with the split it was measured on.
    records = [r for r in reporting.read_metrics(workdir)
               if r.get('step') is None or r['step'] <= loaded.step]
    evaluations = hub_publish.evaluations_from_records(records, loaded.config)
  hub_publish.write_folder(loaded, out, repo_id=push_to or 'OWNER/NAME',
                           evaluations=evaluations,
                           training=_training_text(loaded, weights))
  if push_to:
    print(f'Uploaded to {hub_publish.push_folder(out, push_to)}')
  return out


def _earlier_format(out: str) -> Optional[str]:
  """The format of an earlier export in `out` (None: not one)."""
  # pylint: disable=g-import-not-at-top
  from mixer_jax.weights import hub
  from mixer_jax.weights import hub_publish
  for name in (INFO_FILE, hub.CONFIG_FILE):
    try:
      with open(os.path.join(out, name), encoding='utf-8') as f:
        info = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(info, dict):
      return 'hub' if hub_publish.OUR_FIELD in info else info.get('format')
  return None


def check_out(out: str, fmt: str, overwrite: bool = False) -> None:
  """UsageError unless `out` is new, empty or an earlier `fmt` export (any
  folder but a training workdir with `overwrite`)."""
  # pylint: disable=g-import-not-at-top
  from mixer_jax.checkpointing.checkpoints import CHECKPOINT_DIR
  from mixer_jax.weights import run_info
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise errors.UsageError(f'--out={out} is a file; name a folder.')
  if (os.path.isdir(os.path.join(out, CHECKPOINT_DIR)) or
      os.path.exists(os.path.join(out, run_info.RUN_INFO_FILE))):
    raise errors.UsageError(
        f'--out={out} is a training workdir: the export would mix with the '
        "run's files. Choose another --out. Nothing was written.")
  entries = sorted(os.listdir(out))
  if entries and not overwrite and _earlier_format(out) != fmt:
    raise errors.UsageError(
        f'--out={out} is not empty ({", ".join(entries[:3])}'
        f'{", ..." if len(entries) > 3 else ""}) and holds no earlier '
        f'--format={fmt} export: the files would mix (and --push_to would '
        'upload them all). Choose a new or empty folder, or pass '
        '--overwrite to write into it anyway. Nothing was written.')


def export(checkpoint, out: str, fmt: str, *, step: Optional[int] = None,
           preprocess: bool = True, weights: str = 'params',
           push_to: Optional[str] = None, overwrite: bool = False) -> str:
  """Writes `checkpoint` to `out` as `fmt`; the path of the artifact."""
  if push_to and fmt != 'hub':
    raise errors.UsageError('--push_to uploads a Hub folder: use it with '
                            '--format=hub.')
  try:
    if fmt == 'onnx':
      import onnx  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise errors.UsageError("--format=onnx needs the onnx package: pip "
                            "install 'mixer_jax[onnx]'. Nothing was "
                            'written.') from None
  check_out(os.fspath(out), fmt, overwrite)
  # pylint: disable=g-import-not-at-top
  from mixer_jax.weights import any_checkpoint
  from mixer_jax.weights import workdir_checkpoint
  loaded = any_checkpoint.load(checkpoint, step=step, weights=weights)
  if fmt == 'hub':
    workdir = (workdir_checkpoint.locate_workdir(checkpoint, step)[0]
               if loaded.kind == 'workdir' else None)
    return export_hub(loaded, out, workdir=workdir, weights=weights,
                      push_to=push_to)
  if fmt == 'savedmodel':
    path = export_savedmodel(loaded, out, preprocess=preprocess)
  else:
    path = {'stablehlo': export_stablehlo, 'onnx': export_onnx}[fmt](
        loaded, out)
  with open(os.path.join(out, INFO_FILE), 'w', encoding='utf-8') as f:
    json.dump(serving_info(loaded, fmt, preprocess), f, indent=1)
  return path


FLAGS = flags.FLAGS


def _define_flags():
  command_line.define_checkpoint_flags()
  flags.DEFINE_string('out', None, 'Output directory.', required=True)
  flags.DEFINE_enum('format', 'savedmodel', list(FORMATS),
                    'See docs/export.md.')
  flags.DEFINE_string('push_to', None, 'With --format=hub: upload the folder '
                      'to this Hub model repository (OWNER/NAME).')
  flags.DEFINE_bool('overwrite', False, 'Write into a non-empty --out that '
                    'holds no earlier export of this format.')
  flags.DEFINE_bool('preprocess', True, 'savedmodel: serving_default takes '
                    'uint8 images of any size (eval preprocessing inside).')
  command_line.define_verbose_flag()


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  if len(argv) > 1:
    raise SystemExit(command_line.one_line(errors.UsageError(
        f'Unexpected arguments: {argv[1:]}.')))
  with command_line.user_errors_as_one_line(
      f'Cannot export --checkpoint={FLAGS.checkpoint}: '):
    # It writes SavedModels and reads every kind of checkpoint.
    command_line.load_tensorflow_quietly()
    path = export(FLAGS.checkpoint, FLAGS.out, FLAGS.format, step=FLAGS.step,
                  preprocess=FLAGS.preprocess, weights=FLAGS.weights,
                  push_to=FLAGS.push_to, overwrite=FLAGS.overwrite)
  print(f'Wrote {path}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
