"""The PyTorch reference of `scripts/benchmark.py --compare timm`.

Builds timm's model of a registered ViT with the very weights of ours
(written in Google's `.npz` layout by `checkpoint.save` and read by timm's
own npz loader), so both sides compute the same function, and returns its
forward pass and full fine-tuning step as callables for
`timing.time_rounds`. The train step does what the trainer's does: forward,
cross-entropy, backward, global-norm clipping, SGD with float32 momentum.

Needs torch and timm (`pip install -e '.[bench]'`); nothing else in the
project imports this module.
"""

import contextlib
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F

from vit_jax import checkpoint

# Our registered name → timm's architecture.
ARCHITECTURES = {
  'ViT-Ti_16': 'vit_tiny_patch16_224',
  'ViT-S_16': 'vit_small_patch16_224',
  'ViT-B_16': 'vit_base_patch16_224',
  'ViT-L_16': 'vit_large_patch16_224',
}


def architecture(model: str) -> str:
  """timm's name of our `model`; a clear error for the others."""
  if model not in ARCHITECTURES:
    raise ValueError(
      f'--compare timm knows {sorted(ARCHITECTURES)}, not {model!r}.'
    )
  return ARCHITECTURES[model]


def build(
  model: str, params: Any, crop: int, num_classes: int, approximate_gelu: bool
) -> torch.nn.Module:
  """timm's `model` at `crop` holding our `params`."""
  net = timm.create_model(
    architecture(model),
    pretrained=False,
    img_size=crop,
    num_classes=num_classes,
    act_layer='gelu_tanh' if approximate_gelu else 'gelu',
  )
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'weights.npz')
    checkpoint.save(path, params)
    net.load_pretrained(path)
  return net


def to_torch(images: np.ndarray) -> torch.Tensor:
  """NHWC float32 images as timm's NCHW tensor."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def logits(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """Evaluation-mode logits of NHWC `images`."""
  net.eval()
  with torch.inference_mode():
    return net(to_torch(images)).numpy()


def compute(autocast: bool):
  """The context the model runs in: float32, or bfloat16 compute by
  `torch.autocast` (PyTorch's mixed precision on the CPU)."""
  if autocast:
    return torch.autocast('cpu', dtype=torch.bfloat16)
  return contextlib.nullcontext()


def forward_run(
  net: torch.nn.Module, images: np.ndarray, autocast: bool = False
) -> Callable[[], None]:
  """One evaluation forward pass per call."""
  net.eval()
  x = to_torch(images)

  def run() -> None:
    with torch.inference_mode(), compute(autocast):
      net(x)

  return run


def train_run(
  net: torch.nn.Module,
  images: np.ndarray,
  labels: np.ndarray,
  learning_rate: float,
  grad_norm_clip: float,
  autocast: bool = False,
) -> Callable[[], None]:
  """One full fine-tuning step per call (SGD momentum 0.9, clipping); with
  `autocast`, the forward pass computes in bfloat16 (weights, gradients
  and the update stay float32)."""
  net.train()
  x, y = to_torch(images), torch.from_numpy(labels.astype(np.int64))
  optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=0.9)

  def run() -> None:
    optimizer.zero_grad(set_to_none=True)
    with compute(autocast):
      loss = F.cross_entropy(net(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_norm_clip)
    optimizer.step()

  return run


def matmul_peak(
  sizes: Sequence[int], rounds: int = 5, dtype: str = 'float32'
) -> Dict[str, float]:
  """The best median FLOP/s of PyTorch's square matmuls of `sizes` in
  `dtype` (the other measurement of this machine's matmul peak)."""
  best = {'flops_per_s': 0.0, 'size': 0}
  for size in sizes:
    a, b = (
      torch.ones(size, size, dtype=getattr(torch, dtype)) / size
      for _ in range(2)
    )
    torch.matmul(a, b)
    seconds = []
    for _ in range(rounds):
      start = time.perf_counter()
      torch.matmul(a, b)
      seconds.append(time.perf_counter() - start)
    achieved = 2 * size**3 / statistics.median(seconds)
    if achieved > best['flops_per_s']:
      best = {'flops_per_s': achieved, 'size': size}
  return best


def describe() -> Dict[str, str]:
  """Versions and threads of the reference, for the printed header."""
  return {
    'torch': torch.__version__,
    'timm': timm.__version__,
    'threads': str(torch.get_num_threads()),
  }
