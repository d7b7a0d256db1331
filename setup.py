"""vit_jax: Vision Transformers in JAX/Flax, compatible with Google's vit_jax."""

import setuptools

TEST_REQUIRES = [
  'pytest>=8',
  'pytest-xdist>=3.5',
  'chex>=0.1.90',
  # A local GCS API for the gs:// tests (tests/gcs_emulator.py).
  'gcp-storage-emulator>=2026.7',  # Its routes are patched there.
  'pillow>=10',
  'ruff>=0.17,<0.18',
]

setuptools.setup(
  name='vit_jax',
  version='0.1.0',
  description=(
    'Vision Transformer (ViT), hybrid and MLP-Mixer models in '
    'JAX/Flax with Google vit_jax checkpoint compatibility.'
  ),
  long_description=open('README.md').read(),
  long_description_content_type='text/markdown',
  python_requires='>=3.10',
  # `configs` (the experiment configs, `from configs import common` as in
  # the repository): `--config=configs/vit.py:...` finds the installed copy
  # outside the repository root (vit_jax.cli.with_installed_configs).
  # `vit_jax.configs` is a link to it (vit_jax's path of the same files);
  # the wheel holds a copy of each file under both names.
  packages=setuptools.find_packages(
    include=['vit_jax', 'vit_jax.*', 'configs']
  ),
  install_requires=[
    'absl-py>=2.1',
    # Every path, local or gs://, goes through etils.epath (vit_jax/paths.py);
    # gcsfs is its gs:// backend.
    'etils[epath]>=1.7',
    'gcsfs>=2024.2',
    'flax>=0.12,<0.13',
    'jax>=0.10,<0.11',
    'matplotlib>=3.8',  # Attention-map figures.
    'ml_collections>=1.0',
    'mlxtend>=0.23',
    'numpy>=1.26',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12,<0.13',
    'safetensors>=0.4',
    'scikit-learn>=1.3',
    'scipy>=1.11',
    # TensorFlow runs only the input pipeline, on the CPU.
    'tensorflow-cpu>=2.16',
    'tensorboard>=2.16',  # tf.summary's writer of the training metrics.
    'tensorflow-datasets>=4.9',
    # tfds 4.9 imports it to prepare datasets but declares it only for
    # Python < 3.9.
    'importlib_resources>=6',
  ],
  extras_require={
    'test': TEST_REQUIRES,
    # scripts/benchmark.py --compare timm: the PyTorch reference.
    'bench': ['torch>=2.4', 'torchvision>=0.19', 'timm>=1.0'],
  },
  license='Apache-2.0',
)
