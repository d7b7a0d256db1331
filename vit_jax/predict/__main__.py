"""Top-k classes of image files.

  python -m vit_jax.predict --config=configs/vit.py:b16,cifar10 \\
      --checkpoint=b16_cifar10.npz cat.jpg dog.png
  python -m vit_jax.predict --checkpoint=upstream.npz \\
      --task=runs/digits_ia3/task_params.npz digit_*.png
  python -m vit_jax.predict --task=/tmp/vit_mnist5k/task_params.npz 7.png
  python -m vit_jax.predict --checkpoint=/tmp/vit_mnist5k_model 7.png

Prints, for each image, its top --top_k classes with their probabilities
(with --eval_shift, their mean over shifted copies, as the trainer's
`config.eval_shift` scores them).
With --config, the checkpoint (any file `vit_jax.checkpoint` reads) runs as
the config's model at its `pp.crop`, and classes are named after
`config.dataset` (or --class_names, one name per line). With --task, the
model, crop and class names come from the trainer's task file, on top of
--checkpoint, its base (not needed for a task file of `finetune.mode=full`,
which holds every parameter). A --checkpoint that is a folder written by
`python -m vit_jax.publish` needs nothing else.
"""

import dataclasses

from absl import app
from absl import flags
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import paths
from vit_jax import predict
from vit_jax import views

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config (model, pp.crop, dataset); not needed with --task.',
  lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  'Model checkpoint (.npz, .safetensors), or the base checkpoint of --task.',
)
_TASK = flags.DEFINE_string('task', None, 'A task file written by the trainer.')
_CLASS_NAMES = flags.DEFINE_string(
  'class_names',
  None,
  'A text file with one class name per line, in the '
  "order of the model's outputs (with --config).",
)
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per forward pass.')
_EVAL_SHIFT = flags.DEFINE_integer(
  'eval_shift',
  0,
  'Average the softmax over the copies of each image shifted by up to this '
  "many pixels (the trainer's config.eval_shift); 0: one view.",
)


def _read_class_names(path: str):
  lines = paths.read_text(path).splitlines()
  return [line.strip() for line in lines if line.strip()]


def main(argv) -> None:
  images = argv[1:]
  if not images:
    raise app.UsageError('Give image files (JPEG/PNG) after the flags.')
  if _TASK.value:
    classifier = predict.from_task(_CHECKPOINT.value, _TASK.value)
  elif _CHECKPOINT.value and paths.is_dir(_CHECKPOINT.value):
    classifier = predict.from_published(_CHECKPOINT.value)
  elif _CONFIG.value is None or not _CHECKPOINT.value:
    raise app.UsageError(
      'Give --config and --checkpoint, --task (with '
      '--checkpoint, its base, if it has one), or a '
      'published folder as --checkpoint.'
    )
  else:
    names = _CLASS_NAMES.value and _read_class_names(_CLASS_NAMES.value)
    classifier = predict.from_checkpoint(
      _CONFIG.value, _CHECKPOINT.value, names
    )
  views.check_eval_shift(
    _EVAL_SHIFT.value, classifier.crop, '--eval_shift', "the model's input size"
  )
  classifier = dataclasses.replace(classifier, eval_shift=_EVAL_SHIFT.value)
  for prediction in predict.predict(
    classifier, images, _TOP_K.value, _BATCH.value
  ):
    print(predict.format_prediction(prediction))


if __name__ == '__main__':
  cli.run(main)
