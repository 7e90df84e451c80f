"""Input data: TFDS sources and the built-in digits set, tf.data pipelines, image ops, RandAugment, data checks.

Knows nothing of models or training.
"""
