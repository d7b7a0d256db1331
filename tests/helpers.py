"""Shared test utilities."""

import functools
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from vit_jax import evaluation
from vit_jax import experiment
from vit_jax import models
from vit_jax import results

_QKV = ('query', 'key', 'value')
_POOL_SIZE = 1 << 20


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


REPO = pathlib.Path(__file__).resolve().parent.parent


def xla_flags(devices: int) -> str:
  """The session's XLA flags (tests/conftest.py) with `devices` CPU
  devices instead of 8."""
  flags = re.sub(
    r'--xla_force_host_platform_device_count=\d+',
    '',
    os.environ.get('XLA_FLAGS', ''),
  )
  return f'{flags.strip()} --xla_force_host_platform_device_count={devices}'


def cpu_env(devices: int = 1) -> dict:
  """This process's environment, for a subprocess on `devices` CPU devices
  (not the session's 8): it compiles and runs faster."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(devices)}


# Variables by which JAX would detect a cluster instead of reading the
# coordinator variables the tests set; of JAX's own, the compilation cache
# (tests/conftest.py) is kept.
_CLUSTER_ENV = re.compile(r'^(SLURM_|OMPI_|PMI_|TPU_|KUBERNETES_|JAX_)')
_KEPT_JAX_ENV = (
  'JAX_COMPILATION_CACHE_DIR',
  'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
)


def process_env(devices: int) -> dict:
  """`cpu_env(devices)` without cluster variables: the environment of one
  process of a local multi-process run, to which the test adds JAX's
  coordinator variables."""
  env = {
    k: v
    for k, v in cpu_env(devices).items()
    if k in _KEPT_JAX_ENV or k == 'JAX_PLATFORMS' or not _CLUSTER_ENV.match(k)
  }
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


def tiny_digits_main(workdir, total_steps: int) -> list:
  """The command `python -m vit_jax.main` training a 1-layer ViT-Micro on
  digits at 8x8 for `total_steps`, checkpointing every 2 steps (run it
  with `env=cpu_env()`, `cwd=REPO`)."""
  return [
    sys.executable,
    '-m',
    'vit_jax.main',
    f'--config={REPO}/configs/scratch.py:digits',
    f'--workdir={workdir}',
    f'--config.total_steps={total_steps}',
    '--config.checkpoint_every=2',
    '--config.batch=32',
    '--config.pp.crop=8',
    '--config.model.transformer.num_layers=1',
  ]


def signal_on_line(
  process: subprocess.Popen, marker: str, signum: signal.Signals
) -> str:
  """Reads `process`'s stderr (text) to its end, sending `signum` when a
  line holds `marker`; kills it after 300 s. Returns the stderr."""
  watchdog = threading.Timer(300, process.kill)
  watchdog.start()
  lines = []
  try:
    for line in process.stderr:
      lines.append(line)
      if marker in line:
        process.send_signal(signum)
    process.wait()
  finally:
    watchdog.cancel()
  return ''.join(lines)


@functools.lru_cache(maxsize=None)
def _normal_pool(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(_POOL_SIZE, np.float32)


def random_variables(model, images, seed: int = 0):
  """Variables of `model` for `images`, filled from NumPy, not `model.init`.

  Initialising the largest models with JAX's counter-based RNG takes tens of
  seconds on a 2-core CPU. Here each leaf is a window of one pre-drawn pool of
  standard normals (starting at a leaf-dependent offset, repeated as needed),
  which costs a memory copy. Kernels are scaled to N(0, 1/fan_in) so
  activations and logits stay O(1), norm scales are near 1, every other leaf
  is small. Unlike `init`, zero-initialised heads get non-zero weights, so
  logits are informative.
  """
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  pool = _normal_pool(seed)
  leaves = []

  def draw(path, leaf):
    names = [getattr(p, 'key', '') for p in path]
    offset = (7919 * len(leaves)) % _POOL_SIZE
    noise = np.resize(np.roll(pool, -offset), leaf.shape)
    leaves.append(names)
    if names[-1] == 'kernel':
      is_qkv = len(names) > 1 and names[-2] in _QKV
      fan_in = leaf.shape[0] if is_qkv else np.prod(leaf.shape[:-1])
      return jnp.asarray(noise / np.sqrt(fan_in))
    if names[-1] == 'scale':
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(0.1 * noise)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def vit_tree_shapes(
  *,
  hidden: int,
  mlp: int,
  heads: int,
  layers: int,
  patch: int,
  tokens: int,
  num_classes: int,
  representation: int = 0,
  in_channels: int = 3,
) -> dict:
  """A ViT's {path: shape} written from its dimensions and vit_jax's names.

  `tokens` counts the class token. Written independently of the model code,
  so tests can check the model (and checkpoint files) against it.
  """
  d, head_dim = hidden, hidden // heads
  tree = {
    'embedding/kernel': (patch, patch, in_channels, d),
    'embedding/bias': (d,),
    'cls': (1, 1, d),
    'Transformer/posembed_input/pos_embedding': (1, tokens, d),
    'Transformer/encoder_norm/scale': (d,),
    'Transformer/encoder_norm/bias': (d,),
    'head/kernel': (representation or d, num_classes),
    'head/bias': (num_classes,),
  }
  if representation:
    tree['pre_logits/kernel'] = (d, representation)
    tree['pre_logits/bias'] = (representation,)
  for i in range(layers):
    block = f'Transformer/encoderblock_{i}'
    attention = f'{block}/MultiHeadDotProductAttention_0'
    for norm in ('LayerNorm_0', 'LayerNorm_1'):
      tree[f'{block}/{norm}/scale'] = (d,)
      tree[f'{block}/{norm}/bias'] = (d,)
    for projection in ('query', 'key', 'value'):
      tree[f'{attention}/{projection}/kernel'] = (d, heads, head_dim)
      tree[f'{attention}/{projection}/bias'] = (heads, head_dim)
    tree[f'{attention}/out/kernel'] = (heads, head_dim, d)
    tree[f'{attention}/out/bias'] = (d,)
    tree[f'{block}/MlpBlock_0/Dense_0/kernel'] = (d, mlp)
    tree[f'{block}/MlpBlock_0/Dense_0/bias'] = (mlp,)
    tree[f'{block}/MlpBlock_0/Dense_1/kernel'] = (mlp, d)
    tree[f'{block}/MlpBlock_0/Dense_1/bias'] = (d,)
  return tree


def bit_root_shapes(stages, width: int = 64) -> dict:
  """{path: shape} of vit_jax's hybrid ResNet root (BiT, bottleneck x4)."""
  tree = {
    'conv_root/kernel': (7, 7, 3, width),
    'gn_root/scale': (width,),
    'gn_root/bias': (width,),
  }
  channels = width
  for s, units in enumerate(stages):
    features = width * 2**s
    for u in range(units):
      unit = f'block{s + 1}/unit{u + 1}'
      if u == 0:
        tree[f'{unit}/conv_proj/kernel'] = (1, 1, channels, 4 * features)
        tree[f'{unit}/gn_proj/scale'] = (4 * features,)
        tree[f'{unit}/gn_proj/bias'] = (4 * features,)
      tree[f'{unit}/conv1/kernel'] = (
        1,
        1,
        channels if u == 0 else 4 * features,
        features,
      )
      tree[f'{unit}/conv2/kernel'] = (3, 3, features, features)
      tree[f'{unit}/conv3/kernel'] = (1, 1, features, 4 * features)
      for norm, size in (
        ('gn1', features),
        ('gn2', features),
        ('gn3', 4 * features),
      ):
        tree[f'{unit}/{norm}/scale'] = (size,)
        tree[f'{unit}/{norm}/bias'] = (size,)
    channels = 4 * features
  return tree


def pre_linen(path: str) -> str:
  """Our encoder-block path → the name in Google's first published files."""
  for new, old in (
    ('MultiHeadDotProductAttention_0', 'MultiHeadDotProductAttention_1'),
    ('LayerNorm_1', 'LayerNorm_2'),
    ('MlpBlock_0', 'MlpBlock_3'),
  ):
    if 'encoderblock_' in path:
      path = path.replace(f'/{new}/', f'/{old}/')
  return path


# Image side of `job_config`: a 2x2 patch grid for ViT-Micro_4.
CROP = 8


def micro_model_config():
  """ViT-Micro_4 cut to two layers: every code path, half the compile time."""
  config = models.MODEL_CONFIGS['ViT-Micro_4'].copy_and_resolve_references()
  config.transformer.num_layers = 2
  return config


def job_config(**overrides):
  """Two-layer ViT-Micro_4 on mnist5k at 8x8 (4 tokens): quick to compile
  and run."""
  config = common.with_dataset(common.get_config(), 'mnist5k')
  config.model = micro_model_config()
  config.pp.update({'crop': CROP, 'pad': 1})
  config.update(
    {
      'total_steps': 6,
      'warmup_steps': 1,
      'batch': 32,
      'batch_eval': 256,
      'accum_steps': 1,
      'eval_every': 3,
      'progress_every': 1,
      'checkpoint_every': 3,
      'shuffle_buffer': 500,
      'optimizer': 'adamw',
      'base_lr': 1e-3,
      'optim_dtype': 'float32',
    }
  )
  config.update(overrides)
  return config


def four_step_config():
  """`job_config` cut to 4 steps of batch 16, evaluated and checkpointed at
  the end: the fine-tuning runs of the tests."""
  return job_config(
    total_steps=4,
    batch=16,
    eval_every=4,
    progress_every=2,
    checkpoint_every=4,
    base_lr=1e-2,
  )


def create_setup(config, num_classes: int) -> experiment.Experiment:
  """What `train.train_and_evaluate` builds for `config` before its first
  step (`experiment.build`, from the config's pretrained checkpoint)."""
  return experiment.build(config, num_classes, results.pretrained_path(config))


def evaluate(setup: experiment.Experiment, params, data) -> dict:
  """`evaluation.evaluate` of `params` on `data` by the setup's engine, as
  the trainer evaluates."""
  engine = setup.engine
  return evaluation.evaluate(
    engine, engine.eval_step(setup.eval_step), engine.place(params), data, 1
  )


def numpy_shift(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """Reference: each output pixel (i, j) reads input pixel (i - rows,
  j - cols), clamped into the image (the edge repeats)."""
  height, width = images.shape[1:3]
  source_rows = np.clip(np.arange(height) - rows, 0, height - 1)
  source_cols = np.clip(np.arange(width) - cols, 0, width - 1)
  return images[:, source_rows][:, :, source_cols]
