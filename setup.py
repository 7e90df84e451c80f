"""Install mixer_jax: `pip install -e .` (add `[test]` for the test suite)."""

import setuptools

# Lower bounds are the versions the test suite was run with.
INSTALL_REQUIRES = [
    'absl-py>=2.1',
    'clu>=0.0.12',
    'flax>=0.12.8',
    'importlib_resources>=6.0',  # Needed by TFDS to build any data set.
    'jax>=0.10.2',
    'keras>=3.15',  # RandAugment layer used inside tf.data.
    'ml_collections>=1.1.0',
    'numpy>=2.0',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'pillow>=10.0',
    'safetensors>=0.8.0',  # timm-format export, NumPy API (no torch).
    'scikit-learn>=1.5',  # Ships the images of the built-in digits data set.
    'tensorflow-cpu>=2.21; platform_system == "Linux"',
    'tensorflow>=2.21; platform_system != "Linux"',
    'tensorflow-datasets>=4.9.10',
    'tensorboard>=2.21',  # clu's metric writers import it.
]

_NOTEBOOKS = ['matplotlib>=3.8']
EXTRAS_REQUIRE = {
    'notebooks': _NOTEBOOKS,
    'test': ['pytest>=8.0', 'nbclient>=0.10', 'papermill>=2.6',
             'ipykernel>=6.29', 'nbformat>=5.10'] + _NOTEBOOKS,
}

setuptools.setup(
    name='mixer_jax',
    version='0.1.0',
    description='MLP-Mixer in JAX/Flax: official checkpoints, training, '
                'fine-tuning and serving.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['mixer_jax', 'mixer_jax.*']),
    package_data={'mixer_jax': ['data/*']},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license='Apache 2.0',
)
