"""`digits`: scikit-learn's handwritten digits as a TFDS data set.

The built-in default data set: it needs no network, the 1,797 8x8 grey
images ship inside scikit-learn. Splits (fixed by index, so they never
change) and the pixel mapping: docs/recipes.md.
"""

import numpy as np
import tensorflow_datasets as tfds

# One image in every TEST_EVERY goes to the test split.
TEST_EVERY = 5
NUM_EXAMPLES = 1797
NUM_TEST = len(range(TEST_EVERY - 1, NUM_EXAMPLES, TEST_EVERY))  # 359
NUM_TRAIN = NUM_EXAMPLES - NUM_TEST  # 1438


def to_uint8(pixels):
  """Maps scikit-learn's 0..16 digit pixels to uint8 0..255."""
  return np.round(np.asarray(pixels, np.float64) * (255.0 / 16.0)).astype(
      np.uint8)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, 10 classes, offline."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: 80/20 split by index.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            '1,797 8x8 greyscale handwritten digits shipped with '
            'scikit-learn (UCI optdigits test set). Test split: indices '
            'i with i % 5 == 4; train: the rest.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the images ship with scikit-learn.
    test = np.arange(NUM_EXAMPLES) % TEST_EVERY == TEST_EVERY - 1
    return {
        'train': self._generate_examples(np.flatnonzero(~test)),
        'test': self._generate_examples(np.flatnonzero(test)),
    }

  def _generate_examples(self, indices):
    # Imported here so that registering the builder stays cheap.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    if len(digits.images) != NUM_EXAMPLES:
      raise ValueError(
          f'scikit-learn returned {len(digits.images)} digit images, expected '
          f'{NUM_EXAMPLES}; the fixed splits assume the standard data.')
    images = to_uint8(digits.images)
    for i in indices:
      yield int(i), {'image': images[i][..., None],
                     'label': int(digits.target[i])}
