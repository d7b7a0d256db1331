"""Shared test utilities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_QKV = ('query', 'key', 'value')
_POOL_SIZE = 1 << 20


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
      lambda x: model.init(jax.random.key(0), x, train=False), images)
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
