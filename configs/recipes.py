"""Published ImageNet-1k training recipes: `--config=configs/recipes.py:RECIPE`.

  python -m vit_jax.main --config=configs/recipes.py:vit_s16_i1k \
      --workdir=/tmp/vit_s16_i1k --config.tfds_manual_dir=DIR
  python -m vit_jax.main --config=configs/recipes.py:beit_b16_ft_i1k \
      --workdir=/tmp/beit_b16_ft_i1k --config.tfds_manual_dir=DIR \
      --config.pretrained_dir=gs://vit_models/imagenet21k

RECIPE is one of `RECIPES`:

- `vit_s16_i1k`: ViT-S/16 from scratch in 90 epochs, big_vision's "Better
  plain ViT baselines" (Beyer et al. 2022, arXiv 2205.01580): 76.5% top-1
  published.
- `beit_b16_ft_i1k`: ViT-B/16 fine-tuned for 100 epochs with BEiT's
  recipe (Bao et al. 2021, arXiv 2106.08254): layer-wise learning-rate
  decay, stochastic depth, Mixup/CutMix, RandAugment, random erasing.
  BEiT publishes 83.7% top-1 for it from BEiT's own weights, which this
  ViT cannot load; here it starts from a vit_jax checkpoint.

Both read tfds's `imagenet2012`, which tfds prepares from the archives
downloaded by hand into `config.tfds_manual_dir`, and evaluate on its
validation split. The figures are those of the papers and their code, with
their models and pipelines; none was measured with this project. Each
recipe's docstring says where this project's run differs from the
published one.
"""

import ml_collections

from configs import common
from vit_jax.models import registry

# tfds's imagenet2012 'train' split, and the 'train[:99%]' slice that
# big_vision trains on (tfds rounds a percent boundary to the closest
# example: round(0.99 * 1,281,167)); the last 1% is big_vision's minival.
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_TRAIN_99_IMAGES = 1_268_355


def vit_s16_i1k() -> ml_collections.ConfigDict:
  """ViT-S/16 from scratch on ImageNet-1k in 90 epochs: 76.5% published.

    python -m vit_jax.main --config=configs/recipes.py:vit_s16_i1k \
        --workdir=/tmp/vit_s16_i1k --config.tfds_manual_dir=DIR

  Target: 76.5% top-1 on ImageNet's validation split after 90 epochs,
  Beyer, Zhai and Kolesnikov, "Better plain ViT baselines for ImageNet-1k"
  (arXiv 2205.01580), the figure big_vision's `configs/vit_s16_i1k.py`
  states for its run (6-7 hours on a TPU v3-8). Not measured here.

  The values are that config's: batch 1024; Adam with a bfloat16 first
  moment, gradients clipped to norm 1; learning rate 1e-3, 10k warm-up
  steps, then cosine to 0; decoupled weight decay 1e-4 on the kernels;
  inception crop at 224, flip, RandAugment (2, 10); big_vision's Mixup
  with p = 0.2; plain softmax cross-entropy; no dropout or stochastic
  depth; a GAP head behind a tanh pre-logits layer of the model's width
  (big_vision's `rep_size=True`); fixed 2-D sin-cos position embeddings.

  Where this run differs: evaluation resizes each whole image to 224x224
  (vit_jax's pipeline), where big_vision resizes its shorter side to 256
  and takes the central 224x224; Mixup draws its weight once per device's
  batch, big_vision once per global batch.
  """
  config = common.with_dataset(common.get_config(), 'imagenet2012')
  model = registry.get_config('s16')
  model.classifier = 'gap'
  model.posemb = 'sincos2d'
  model.representation_size = model.hidden_size
  config.model = model
  # The preset's splits are big_vision's: train[:99%] and validation.
  config.pp.crop = 224
  config.pp.randaug = (2, 10)

  config.batch = 1024
  # The whole batch at once, as big_vision; a larger value splits it into
  # micro-batches for memory, with the same update.
  config.accum_steps = 1
  # 90 epochs of train[:99%] at batch 1024, rounded to the closest step as
  # big_vision's `u.steps`: round(90 * 1,268,355 / 1024) = 111,477.
  config.total_steps = 111_477
  config.warmup_steps = 10_000
  config.decay_type = 'cosine'
  config.base_lr = 1e-3
  config.optimizer = 'adamw'
  config.optim_dtype = 'bfloat16'  # big_vision's `mu_dtype='bfloat16'`.
  config.grad_norm_clip = 1.0
  # big_vision subtracts wd * sched(t) * w per step, sched peaking at 1
  # (decoupled from the learning rate); optax's AdamW subtracts
  # lr(t) * weight_decay * w with lr(t) = base_lr * sched(t). Equal for
  # weight_decay = wd / base_lr = 1e-4 / 1e-3 = 0.1.
  config.weight_decay = 0.1
  # big_vision decays the kernels alone (its default `.*/kernel$`). AdamW
  # here decays every leaf of two or more dimensions, among them the
  # attention's query, key and value biases ([heads, head_dim]): zeroed
  # here. With GAP and fixed position embeddings, the kernels remain.
  config.wd_mults = (('.*/bias', 0.0),)
  config.label_smoothing = 0.0
  config.mix.mixup_p = 0.2

  # big_vision's intervals: evaluations every 2,500 steps, checkpoints
  # every 1,000, training metrics every 50.
  config.eval_every = 2_500
  config.checkpoint_every = 1_000
  config.progress_every = 50
  return config


def beit_b16_ft_i1k() -> ml_collections.ConfigDict:
  """ViT-B/16 fine-tuned on ImageNet-1k with BEiT's recipe: 83.7%
  published, from BEiT's weights.

    python -m vit_jax.main --config=configs/recipes.py:beit_b16_ft_i1k \
        --workdir=/tmp/beit_b16_ft_i1k --config.tfds_manual_dir=DIR \
        --config.pretrained_dir=gs://vit_models/imagenet21k

  Target: 83.7% top-1 on ImageNet's validation split at 224 is what BEiT's
  README (microsoft/unilm, beit/) reports for BEiT-base fine-tuned from
  `beit_base_patch16_224_pt22k` (self-supervised on ImageNet-22k) with
  these hyper-parameters. That figure needs BEiT's weights and BEiT's
  model (relative position biases, layer scale, mean pooling), which this
  ViT has not, so it is no target for this run: this run fine-tunes
  vit_jax's supervised ImageNet-21k `ViT-B_16.npz` (`pretrained_dir`, as
  configs/vit.py; `--config.pretrained_path` takes another file, e.g. an
  AugReg ViT-B/16). No figure for that pairing was published with this
  recipe, and none was measured here.

  The values are those of BEiT's fine-tuning command for BEiT-base from
  `pt22k` (8 GPUs x 128 images) and its script's defaults: batch 1024;
  AdamW at 4e-3 (BEiT does not rescale it by the batch), betas (0.9,
  0.999), weight decay 0.05, no gradient clipping; 20 warm-up epochs then
  cosine over 100 epochs of 1,251 steps (1,281,167 // 1024); layer decay
  0.65; stochastic depth 0.1; Mixup 0.8 and CutMix 1.0 on every batch,
  switching with probability 0.5; label smoothing 0.1; random erasing
  0.25; RandAugment 'rand-m9-mstd0.5-inc1'.

  Where this run differs:
  - RandAugment is big_vision's at (2, 9): two ops at magnitude 9, whose
    rotations, shears and shifts are about timm's at m9 (27 degrees,
    0.27, 90 px at 224 here and 91 px in timm). timm's applies each op
    with probability 0.5, draws the magnitude from N(9, 0.5), uses its
    'increasing' ops (Posterize and Solarize stronger with m, enhancers
    pushed either way) and has no Cutout.
  - The inception crop keeps 5% to 100% of the image (vit_jax's), timm's
    8% to 100%, with bicubic resizing; evaluation resizes the whole image
    to 224x224, where BEiT resizes the shorter side to 256 and takes the
    central 224x224.
  - The learning rate decays to 0, BEiT's to 1e-6.
  - The class token stays the classifier (the checkpoint has one); BEiT
    averages the patch tokens.
  """
  config = common.with_dataset(common.get_config(), 'imagenet2012')
  model = registry.get_config('b16')
  model.transformer.stochastic_depth = 0.1
  config.model = model
  # vit_jax's convention: DIR/ViT-B_16.npz (default DIR: '.').
  config.pretrained_dir = '.'
  # BEiT trains on the whole train split and evaluates on validation.
  config.pp.train = 'train'
  config.pp.crop = 224
  config.pp.randaug = (2, 9)

  config.batch = 1024
  config.accum_steps = 1
  # 100 epochs of 1,251 steps, the first 20 of them warm-up.
  config.total_steps = 125_100
  config.warmup_steps = 25_020
  config.decay_type = 'cosine'
  config.base_lr = 4e-3
  config.optimizer = 'adamw'
  config.optim_dtype = 'float32'
  config.grad_norm_clip = None
  # PyTorch's AdamW decays by lr * weight_decay, as optax's: the same
  # value. The layer decay scales the decay with the update, as BEiT's
  # per-group learning rates do.
  config.weight_decay = 0.05
  config.layer_decay = 0.65
  # BEiT decays neither biases and norm scales nor the class token and
  # position embeddings. AdamW here skips the leaves of one dimension, not
  # the attention's 2-D query, key and value biases nor the embeddings.
  config.wd_mults = (
    ('cls', 0.0),
    ('Transformer/posembed_input/.*', 0.0),
    ('.*/bias', 0.0),
  )
  config.label_smoothing = 0.1
  config.mix.update(
    {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'switch_prob': 0.5, 'prob': 1.0}
  )
  config.random_erase.prob = 0.25

  # BEiT evaluates after every epoch.
  config.eval_every = 1_251
  config.checkpoint_every = 1_251
  config.progress_every = 50
  return config


RECIPES = {
  'vit_s16_i1k': vit_s16_i1k,
  'beit_b16_ft_i1k': beit_b16_ft_i1k,
}


def get_config(recipe: str = 'vit_s16_i1k') -> ml_collections.ConfigDict:
  """Returns the config of the recipe named `recipe` (a key of `RECIPES`)."""
  if recipe not in RECIPES:
    raise ValueError(
      f'configs/recipes.py knows the recipes {sorted(RECIPES)}, got {recipe!r}.'
    )
  return RECIPES[recipe]()
