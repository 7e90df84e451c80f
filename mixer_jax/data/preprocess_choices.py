"""The preprocessing choices a config can name (`preprocess.py` implements
them), importable by config validation without TensorFlow."""

# config.pp.train_crop: Inception crop, vit_jax's fine-tuning crop
# (sample_distorted_bounding_box), or a plain resize.
TRAIN_CROPS = ('inception', 'finetune', 'resize')
# config.pp.eval_crop: plain resize (the fine-tuning eval), short side to
# eval_resize then central crop (the ImageNet eval), or a square resize to
# eval_resize then central crop (big_vision's few-shot pp).
EVAL_CROPS = ('resize', 'resize_crop', 'squash_crop')
# config.pp.eval_resize_method: tf.image.resize names; big_vision's
# `resize_small` defaults to 'area'.
RESIZE_METHODS = ('area', 'bilinear', 'bicubic', 'nearest')


def imagenet_eval_resize(image_size: int) -> int:
  """The short side before the central crop of the official ImageNet eval:
  256 for 224 (resize_small(256)|central_crop(224)), in that ratio at other
  sizes."""
  return int(round(image_size * 256 / 224))
