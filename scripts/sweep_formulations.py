"""Ways to compute the ViT encoder's layers, timed side by side.

The same attention and MLP can be written in several ways that compute the
same function with the same parameters, and the backend's speed differs
between them. Each formulation below replaces `vit.Encoder1DBlock`,
`vit.MultiHeadSelfAttention` and/or `vit.MlpBlock` while one workload is
built (same module and parameter
names, so the same checkpoint runs in each); every workload is then timed
alternating with the others (`timing.time_rounds`). Prints, per work and
formulation, seconds per batch, its speed relative to the first formulation
and its largest logit difference from the model's own on the same weights.
The formulations leave out dropout (the benchmarked models have none).

  model                  the model as it is (Dense layers on rows)
  tokens_3d              Dense layers on `[batch, tokens, features]`
  sigmoid_gelu           the tanh-approximated GELU computed as
                         x * sigmoid(2u) (= x / 2 * (1 + tanh(u)))
  fused_qkv              one `[width, 3 * width]` projection for query,
                         key and value, from their three kernels
  token_major_attention  the attention's matmuls on `[batch, tokens,
                         heads, head_dim]`, without head-major transposes
  dot_product_attention  `jax.nn.dot_product_attention` on the same layout
  softmax_logsumexp      the attention's softmax as exp(x - logsumexp(x))
  layernorm_rows         the block's layer norms and residual sums on rows

  PYTHONPATH=. python scripts/sweep_formulations.py [--model ViT-Ti_16] \
      [--batch 32] [--work inference,train] [--rounds 8] \
      [--formulations model,tokens_3d,...]
"""

import argparse
import contextlib
import statistics
from typing import Dict, Iterator, List, Tuple

import benchmark
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.benchmarks import timing
from vit_jax.models import vit

Block = vit.Encoder1DBlock
Attention = vit.MultiHeadSelfAttention
Mlp = vit.MlpBlock


class _Params(nn.Module):
  """The `kernel` and `bias` of a layer, created as the layer's own, for a
  formulation that uses them in another product."""

  kernel_shape: Tuple[int, ...]
  bias_shape: Tuple[int, ...]

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), self.kernel_shape
    )
    return kernel, self.param('bias', nn.initializers.zeros, self.bias_shape)


def _project_out(module: Attention, out: jax.Array) -> jax.Array:
  """The `out` projection of `[batch, tokens, heads, head_dim]`."""
  return nn.DenseGeneral(
    out.shape[-2] * out.shape[-1],
    axis=(-2, -1),
    dtype=module.dtype,
    name='out',
  )(out)


def _token_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v on `[batch, tokens, heads, head_dim]`."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


class _Tokens3dAttention(Attention):
  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    heads = (self.num_heads, x.shape[-1] // self.num_heads)
    query, key, value = (
      nn.DenseGeneral(heads, dtype=self.dtype, name=name)(x).swapaxes(1, 2)
      for name in ('query', 'key', 'value')
    )
    out = self._attention(query, key, value, deterministic)
    return _project_out(self, out.swapaxes(1, 2))


class _Tokens3dMlp(Mlp):
  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
    x = nn.Dense(self.mlp_dim, dtype=self.dtype)(inputs)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    return nn.Dense(inputs.shape[-1], dtype=self.dtype)(x)


def _sigmoid_gelu(x: jax.Array) -> jax.Array:
  """The tanh-approximated GELU, x / 2 * (1 + tanh(u)), as x * sigmoid(2u)
  for u = sqrt(2 / pi) * (x + 0.044715 x^3)."""
  return x * jax.nn.sigmoid(np.sqrt(8 / np.pi) * (x + 0.044715 * x**3))


class _SigmoidGeluMlp(Mlp):
  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
    x = nn.Dense(self.mlp_dim, dtype=self.dtype)(vit.as_rows(inputs))
    x = nn.Dense(inputs.shape[-1], dtype=self.dtype)(_sigmoid_gelu(x))
    return x.reshape(inputs.shape)


class _FusedQkvAttention(Attention):
  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    batch, tokens, width = x.shape
    heads = (self.num_heads, width // self.num_heads)
    kernels, biases = zip(
      *(
        _Params((width,) + heads, heads, name=name)()
        for name in ('query', 'key', 'value')
      )
    )
    kernel = jnp.concatenate([k.reshape(width, width) for k in kernels], 1)
    bias = jnp.concatenate([b.reshape(width) for b in biases])
    qkv = vit.as_rows(x) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
    qkv = qkv.reshape(batch, tokens, 3, *heads).transpose(2, 0, 3, 1, 4)
    out = self._attention(qkv[0], qkv[1], qkv[2], deterministic)
    return _project_out(self, out.swapaxes(1, 2))


class _TokenMajorAttention(Attention):
  attend = staticmethod(_token_major)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    batch, tokens, width = x.shape
    heads = (self.num_heads, width // self.num_heads)
    query, key, value = (
      nn.DenseGeneral(heads, dtype=self.dtype, name=name)(
        vit.as_rows(x)
      ).reshape(batch, tokens, *heads)
      for name in ('query', 'key', 'value')
    )
    return _project_out(self, self.attend(query, key, value))


class _DotProductAttention(_TokenMajorAttention):
  attend = staticmethod(jax.nn.dot_product_attention)


class _LogsumexpSoftmaxAttention(Attention):
  def _attention(self, query, key, value, deterministic):
    query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    logits = jnp.einsum('bhqd,bhkd->bhqk', query, key).astype(jnp.float32)
    weights = jnp.exp(logits - jax.nn.logsumexp(logits, -1, keepdims=True))
    return jnp.einsum('bhqk,bhkd->bhqd', weights.astype(value.dtype), value)


class _LayerNormRowsBlock(Block):
  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
    rows = vit.as_rows(inputs)
    norm = lambda: nn.LayerNorm(epsilon=self.layernorm_epsilon)
    x = vit.MultiHeadSelfAttention(
      num_heads=self.num_heads, name='MultiHeadDotProductAttention_0'
    )(norm()(rows).reshape(inputs.shape), deterministic=deterministic)
    x = vit.as_rows(x) + rows
    y = vit.MlpBlock(
      mlp_dim=self.mlp_dim,
      approximate_gelu=self.approximate_gelu,
      name='MlpBlock_0',
    )(norm()(x), deterministic=deterministic)
    return (x + y).reshape(inputs.shape)


FORMULATIONS: Dict[str, Tuple[type, type, type]] = {
  'model': (Block, Attention, Mlp),
  'tokens_3d': (Block, _Tokens3dAttention, _Tokens3dMlp),
  'sigmoid_gelu': (Block, Attention, _SigmoidGeluMlp),
  'fused_qkv': (Block, _FusedQkvAttention, Mlp),
  'token_major_attention': (Block, _TokenMajorAttention, Mlp),
  'dot_product_attention': (Block, _DotProductAttention, Mlp),
  'softmax_logsumexp': (Block, _LogsumexpSoftmaxAttention, Mlp),
  'layernorm_rows': (_LayerNormRowsBlock, Attention, Mlp),
}


@contextlib.contextmanager
def formulation(name: str) -> Iterator[None]:
  """Models built inside use formulation `name`'s block, attention and
  MLP (the encoder looks its layers up in `vit` when it runs)."""
  vit.Encoder1DBlock, vit.MultiHeadSelfAttention, vit.MlpBlock = FORMULATIONS[
    name
  ]
  try:
    yield
  finally:
    vit.Encoder1DBlock, vit.MultiHeadSelfAttention, vit.MlpBlock = (
      Block,
      Attention,
      Mlp,
    )


def logit_differences(config, names: List[str]) -> Dict[str, float]:
  """Largest |logit| difference between each formulation and the model, on
  the model's initial weights (a random head) and 4 random images."""
  model, params = benchmark.initial_model(config)
  params['head']['kernel'] = 0.02 * jax.random.normal(
    jax.random.key(1), params['head']['kernel'].shape
  )
  images = np.random.default_rng(0).uniform(
    -1, 1, (4, config.pp.crop, config.pp.crop, 3)
  )
  logits = lambda: model.apply({'params': params}, images, train=False)
  reference = logits()
  differences = {}
  for name in names:
    with formulation(name):
      differences[name] = float(np.abs(logits() - reference).max())
  return differences


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--work', default='inference,train')
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--formulations', default=','.join(FORMULATIONS))
  args = parser.parse_args()
  names = args.formulations.split(',')
  unknown = sorted(set(names) - set(FORMULATIONS))
  if unknown:
    parser.error(
      f'unknown formulations {unknown}; choose from {list(FORMULATIONS)}'
    )
  config = benchmark.experiment_config(args.model, args.crop, args.batch)
  print(benchmark.machine())
  print(
    f'{args.model} at {args.crop}, batch {args.batch}, float32, one '
    f'device; median of {args.rounds} alternating rounds'
  )
  print(
    f'{"work":<10} {"formulation":<22} {"s/batch":>8} {"speed":>6} '
    f'{"max |logit diff|":>17}'
  )
  difference = logit_differences(config, names)
  for work in args.work.split(','):
    runs = {}
    for name in names:
      with formulation(name):
        runs[name] = benchmark.make_workload(
          work, config, jax.local_devices()[:1]
        ).run
    seconds = timing.time_rounds(runs, args.rounds)
    first = statistics.median(seconds[names[0]])
    for name in names:
      median = statistics.median(seconds[name])
      print(
        f'{work:<10} {name:<22} {median:8.3f} {first / median:5.2f}x '
        f'{difference[name]:17.1e}',
        flush=True,
      )


if __name__ == '__main__':
  main()
