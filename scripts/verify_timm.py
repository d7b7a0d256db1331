"""Checks checkpoint interchange with timm and transformers themselves.

  pip install torch timm transformers
  python scripts/verify_timm.py [--model vit_tiny_patch16_224] [--hf] \
      [--published FOLDER] [--swin swin_tiny_patch4_window7_224]

1. timm → here: a timm ViT's `state_dict`, saved as safetensors, is read by
   `checkpoint.read`; our model built with the returned options computes the
   same logits as timm.
2. here → timm (safetensors): `checkpoint.save(..., '.safetensors')` is
   loaded by `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`
   and computes our logits.
3. here → timm (Google .npz): `checkpoint.save(..., '.npz')` is loaded by
   timm's own npz loader (`model.load_pretrained`); timm computes exact GELU,
   so it is compared with our model in that mode.
4. (--published FOLDER) a folder written by `python -m vit_jax.publish` is
   built and loaded by `timm.create_model('local-dir:FOLDER',
   pretrained=True)` (the Hub's loading path, from config.json alone) and
   computes the logits of the folder's vit_jax model.
5. (--swin ARCHITECTURE) a timm Swin's `state_dict` is read here and our
   `SwinTransformer` computes its logits; our tree saved as safetensors is
   loaded by timm and computes them too.
6. (--hf) Hugging Face transformers → here: a `ViTForImageClassification`
   of the same size, saved both as its `state_dict()` (transformers 5 names)
   and by `save_pretrained` (the Hub's names), computes the same logits here.

Prints the largest absolute logit difference of each check; exits non-zero
if one exceeds the tolerance.
"""

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np
from safetensors.torch import save_file
import timm
import torch

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoint import pretrained

# timm architecture → (our registered model, heads)
ARCHITECTURES = {
  'vit_tiny_patch16_224': ('ViT-Ti_16', 3),
  'vit_small_patch16_224': ('ViT-S_16', 6),
  'vit_base_patch16_224': ('ViT-B_16', 12),
}


def timm_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def our_logits(name: str, params, images: np.ndarray, **options) -> np.ndarray:
  model = models.get_model(name, num_classes=1000, **options)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  return np.asarray(apply(params, images))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--model', default='vit_tiny_patch16_224', choices=sorted(ARCHITECTURES)
  )
  parser.add_argument('--tolerance', type=float, default=1e-3)
  parser.add_argument(
    '--hf',
    action='store_true',
    help='also check a transformers ViT (needs transformers)',
  )
  parser.add_argument(
    '--published',
    default=None,
    metavar='FOLDER',
    help='also load a folder written by `python -m '
    "vit_jax.publish` with timm's own loader",
  )
  parser.add_argument(
    '--swin',
    default=None,
    metavar='ARCHITECTURE',
    help='also check a timm Swin, e.g. '
    'swin_tiny_patch4_window7_224, both directions',
  )
  args = parser.parse_args()
  name, heads = ARCHITECTURES[args.model]
  torch.manual_seed(0)
  source = timm.create_model(args.model, pretrained=False).eval()
  # timm zero-initialises the head; give it weights so logits differ.
  torch.nn.init.normal_(source.head.weight, std=0.02)
  images = (
    np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  )
  reference = timm_logits(source, images)
  failures = 0

  with tempfile.TemporaryDirectory() as tmp:
    timm_file = f'{tmp}/timm.safetensors'
    save_file(
      {k: v.contiguous() for k, v in source.state_dict().items()}, timm_file
    )
    ckpt = checkpoint.read(timm_file, num_heads=heads)
    ours = our_logits(name, ckpt.params, images, **ckpt.model_options)
    failures += report(
      'timm safetensors → vit_jax', ours, reference, args.tolerance
    )

    exported = f'{tmp}/exported.safetensors'
    checkpoint.save(exported, ckpt.params, num_heads=heads)
    loaded = timm.create_model(
      args.model, pretrained=True, pretrained_cfg_overlay=dict(file=exported)
    ).eval()
    failures += report(
      'vit_jax → timm safetensors',
      timm_logits(loaded, images),
      ours,
      args.tolerance,
    )

    npz = f'{tmp}/exported.npz'
    checkpoint.save(npz, ckpt.params)
    from_npz = timm.create_model(args.model, pretrained=False).eval()
    from_npz.load_pretrained(npz)
    failures += report(
      'vit_jax → Google npz → timm npz loader',
      timm_logits(from_npz, images),
      ours,
      args.tolerance,
    )

    if args.hf:
      failures += check_hf(
        source, name, heads, images, f'{tmp}/hf', args.tolerance
      )
  if args.published:
    failures += check_published(args.published, args.tolerance)
  if args.swin:
    failures += check_swin(args.swin, args.tolerance)
  return 1 if failures else 0


def check_swin(architecture: str, tolerance: float) -> int:
  """A random timm Swin ↔ our SwinTransformer, both directions."""
  torch.manual_seed(2)
  source = timm.create_model(architecture, pretrained=False).eval()
  torch.nn.init.normal_(source.head.fc.weight, std=0.02)
  images = (
    np.random.default_rng(2).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  )
  reference = timm_logits(source, images)
  failures = 0
  with tempfile.TemporaryDirectory() as tmp:
    timm_file = f'{tmp}/swin.safetensors'
    save_file(
      {k: v.contiguous() for k, v in source.state_dict().items()}, timm_file
    )
    ckpt = checkpoint.read(timm_file)
    model = models.SwinTransformer(**ckpt.architecture)
    ours = np.asarray(
      jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
        ckpt.params, images
      )
    )
    failures += report(
      f'timm {architecture} → vit_jax', ours, reference, tolerance
    )
    exported = f'{tmp}/exported.safetensors'
    checkpoint.save(exported, ckpt.params)
    loaded = timm.create_model(
      architecture, pretrained=True, pretrained_cfg_overlay=dict(file=exported)
    ).eval()
    failures += report(
      f'vit_jax → timm {architecture}',
      timm_logits(loaded, images),
      ours,
      tolerance,
    )
  return failures


def check_published(folder: str, tolerance: float) -> int:
  """timm builds and loads a published folder from its config.json alone
  (as from the Hub) and computes the logits of its vit_jax model."""
  with open(os.path.join(folder, 'config.json')) as f:
    summary = json.load(f)['vit_jax']
  crop = summary['crop']
  images = (
    np.random.default_rng(1)
    .uniform(-1, 1, (4, crop, crop, 3))
    .astype(np.float32)
  )
  model, params = pretrained.model_from_checkpoint(
    summary['model'], os.path.join(folder, 'model.npz'), crop
  )
  ours = np.asarray(model.apply({'params': params}, images, train=False))
  loaded = timm.create_model(
    f'local-dir:{os.path.abspath(folder)}', pretrained=True
  ).eval()
  print(
    f'published folder: timm built {type(loaded).__name__} with '
    f'{sum(p.numel() for p in loaded.parameters()):,} parameters, '
    f'{loaded.num_classes} classes, labels '
    f'{loaded.pretrained_cfg.get("label_names", [])[:3]}...'
  )
  return report(
    'published folder → timm local-dir: (as hf-hub:)',
    timm_logits(loaded, images),
    ours,
    tolerance,
  )


def check_hf(
  like: torch.nn.Module,
  name: str,
  heads: int,
  images: np.ndarray,
  path: str,
  tolerance: float,
) -> int:
  """A random transformers ViT of `like`'s size, imported here."""
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.ViTConfig(
    hidden_size=like.embed_dim,
    num_hidden_layers=len(like.blocks),
    num_attention_heads=heads,
    intermediate_size=like.blocks[0].mlp.fc1.out_features,
    image_size=224,
    patch_size=16,
    num_labels=1000,
  )
  torch.manual_seed(1)
  hf = transformers.ViTForImageClassification(config).eval()
  file = path + '.safetensors'
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, file)
  with torch.no_grad():
    want = hf(
      pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))
    ).logits.numpy()
  hf.save_pretrained(path)  # Hub layout: transformers 4 names.
  failures = 0
  for what, saved in (
    ('transformers state_dict (v5 names)', file),
    ('transformers save_pretrained (Hub names)', path + '/model.safetensors'),
  ):
    ckpt = checkpoint.read(saved, num_heads=heads)
    got = our_logits(name, ckpt.params, images, **ckpt.model_options)
    failures += report(f'{what} → vit_jax', got, want, tolerance)
  return failures


def report(
  what: str, got: np.ndarray, want: np.ndarray, tolerance: float
) -> int:
  diff = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  ok = diff <= tolerance * max(scale, 1.0)
  print(
    f'{what:<52} max |Δlogit| = {diff:.2e} (logit scale {scale:.2f}) '
    f'{"OK" if ok else "FAIL"}'
  )
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
