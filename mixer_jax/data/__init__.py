"""Input data: TFDS sources and the built-in digits set, tf.data pipelines,
image ops, RandAugment. Knows nothing of models or training."""
