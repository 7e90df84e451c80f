"""Install mixer_jax: `pip install -e '.[tf]'` (`[test]` for the test suite,
`[plots]` for `mixer_jax.visualize`).

Where TensorFlow is already installed (Colab), leave out `[tf]`.
"""

import setuptools

# The version is defined once, in the package (mixer_jax/version.py).
_VERSION = {}
with open('mixer_jax/version.py', encoding='utf-8') as _f:
  exec(_f.read(), _VERSION)  # pylint: disable=exec-used

# Lower bounds are the versions the test suite was run with.
INSTALL_REQUIRES = [
    'absl-py>=2.1',
    'clu>=0.0.12',
    'flax>=0.12.8',
    'importlib_resources>=6.0',  # Needed by TFDS to build any data set.
    'jax>=0.10.2',
    'ml_collections>=1.1.0',
    'numpy>=2.0',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'pillow>=10.0',
    'safetensors>=0.8.0',  # timm-format export, NumPy API (no torch).
    'scikit-learn>=1.5',  # Ships the images of the built-in digits data set.
    'huggingface_hub>=0.24',  # hf-hub: names (download, cache); run with 2.4.
    'tensorflow-datasets>=4.9.10',
    'tensorboard>=2.21',  # clu's metric writers import it.
]

# TensorFlow (tf.data, tf.io.gfile, the SavedModel export) is needed, but is
# an extra so that a runtime that already has one (Colab ships `tensorflow`)
# keeps it: tensorflow-cpu installed beside tensorflow would be a second
# distribution owning the same `tensorflow` package. `pip install
# mixer_jax[tf]` on a fresh machine; plain `pip install mixer_jax` where a
# TensorFlow is installed (the notebooks' install cell decides).
_TENSORFLOW = [
    'tensorflow-cpu>=2.21; platform_system == "Linux"',
    'tensorflow>=2.21; platform_system != "Linux"',
]
_NOTEBOOKS = ['matplotlib>=3.8']
_ONNX = ['onnx>=1.17', 'onnxruntime>=1.20']  # `export --format=onnx`.
EXTRAS_REQUIRE = {
    'tf': _TENSORFLOW,
    'notebooks': _NOTEBOOKS,
    'plots': _NOTEBOOKS,  # `mixer_jax.visualize` draws with matplotlib.
    # Real timm (PyTorch) for the tests that compare our timm-format weights
    # with timm's own MlpMixer; not in `test`: torch is a multi-GB install.
    'timm': ['torch>=2.4', 'timm>=1.0'],
    'onnx': _ONNX,
    'test': ['pytest>=8.0', 'pytest-xdist>=3.8', 'nbclient>=0.10',
             'papermill>=2.6', 'ipykernel>=6.29', 'nbformat>=5.10',
             'scipy>=1.11'] + _NOTEBOOKS + _TENSORFLOW + _ONNX,
}

# The repository's address, named here only: the notebooks' Colab badges and
# install cells use the same one (tests/test_notebooks.py checks). OWNER is
# the GitHub account that publishes it: replace it here, then run
# `python tests/test_notebooks.py notebooks/*.ipynb` to write it there.
URL = 'https://github.com/OWNER/mixer_jax'

setuptools.setup(
    name='mixer_jax',
    url=URL,
    version=_VERSION['__version__'],
    description='MLP-Mixer in JAX/Flax: official checkpoints, training, '
                'fine-tuning and serving.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['mixer_jax', 'mixer_jax.*']),
    package_data={'mixer_jax.data': ['*.txt']},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license='Apache 2.0',
)
