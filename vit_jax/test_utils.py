"""Fixtures that vit_jax's tests import: `from vit_jax import test_utils`."""

from typing import Any, Mapping

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoint import pretrained

# The image side the checkpoint's model is initialised at: one 16x16 patch.
# `checkpoint.load_pretrained` resizes the position embeddings to any
# model's grid, as for a published checkpoint.
_INIT_SIDE = 16


def create_checkpoint(model_config: Mapping[str, Any], path: str) -> None:
  """Writes a randomly initialised `VisionTransformer(**model_config)`
  (one class) to `path` as a Google-format `.npz`, the file a test's
  `config.pretrained_dir` then provides."""
  model = models.VisionTransformer(num_classes=1, **model_config)
  params = pretrained.init_params(model, _INIT_SIDE, seed=0)
  checkpoint.save(path, params)
