"""Classifying image files with a trained model: top-k classes and probabilities.

  classifier = classify.from_task('upstream.npz', 'runs/digits/task_params.npz')
  classifier = classify.from_checkpoint(config, 'ViT-B_16.npz')
  classifier = classify.from_published('vit_mnist5k_model')  # a folder
  for prediction in classify.predict(classifier, ['a.jpg', 'b.png'], top_k=3):
    print(prediction.path, prediction.top)

Images are read and preprocessed as evaluation does (`input_pipeline
.read_images`) in batches of a fixed size, so one compiled forward pass
serves any number of files.
"""

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import input_pipeline
from vit_jax import paths
from vit_jax import publish
from vit_jax import views
from vit_jax.checkpoint import pretrained
from vit_jax.finetune import serving


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A model, its parameters, its input size and the names of its outputs.

  Attributes:
    model: a Flax module mapping images `[N, crop, crop, 3]` to logits.
    params: its parameters.
    crop: the image size it was trained at.
    class_names: one name per output, or () where unknown (classes are then
      printed as their indices).
    eval_shift: 0, or the mean softmax over the copies of each image shifted
      by up to this many pixels, as the trainer's `config.eval_shift`.
  """

  model: Any
  params: Any
  crop: int
  class_names: Tuple[str, ...] = ()
  eval_shift: int = 0

  def __post_init__(self):
    views.check_eval_shift(
      self.eval_shift, self.crop, 'Classifier.eval_shift', 'Classifier.crop'
    )

  @functools.cached_property
  def _probabilities(self) -> Callable[[Any, np.ndarray], jax.Array]:
    def probabilities(params, images):
      logits = views.view_logits(
        lambda x: self.model.apply({'params': params}, x, train=False),
        images,
        self.eval_shift,
      )
      if len(logits) == 1:
        return jax.nn.softmax(logits[0].astype(np.float32))
      return jnp.exp(views.mean_log_probabilities(logits))

    return jax.jit(probabilities)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Softmax of the logits, `[N, classes]`, for preprocessed images
    (their mean over the shifted views, with `eval_shift`)."""
    return np.asarray(self._probabilities(self.params, images))

  def name(self, index: int) -> str:
    return self.class_names[index] if self.class_names else str(index)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The `top` (class name, probability) pairs of one image, best first."""

  path: str
  top: Tuple[Tuple[str, float], ...]


def _checked_names(
  names: Optional[Sequence[str]], outputs: int, source: str
) -> Tuple[str, ...]:
  """`names` if there is one per model output; otherwise an error."""
  if not names:
    return ()
  if len(names) != outputs:
    raise ValueError(
      f'{source} names {len(names)} classes, but the model has {outputs} '
      'outputs; give the class names of the data it was trained on (or '
      'none: classes are then printed as indices).'
    )
  return tuple(names)


def _num_outputs(classifier: Classifier) -> int:
  images = jax.ShapeDtypeStruct(
    (1, classifier.crop, classifier.crop, 3), np.float32
  )
  return int(
    jax.eval_shape(
      lambda p, x: classifier.model.apply({'params': p}, x, train=False),
      classifier.params,
      images,
    ).shape[-1]
  )


def from_task(base: Optional[str], task_path: str) -> Classifier:
  """The model of a trainer's task file on its base checkpoint (None when
  the task file holds every parameter), with the class names it recorded."""
  (task,) = serving.load_tasks(base, [task_path]).values()
  return Classifier(task.model, task.params, task.crop, task.class_names)


def from_checkpoint(
  config: ml_collections.ConfigDict,
  path: str,
  class_names: Optional[Sequence[str]] = None,
) -> Classifier:
  """`config.model` with a checkpoint's weights at `config.pp.crop`.

  Class names: `class_names` if given, else those of `config.dataset` when
  its outputs match the checkpoint's head (e.g. not for a 21k-class
  checkpoint under a CIFAR-10 config); otherwise none.
  """
  model, params = pretrained.model_from_checkpoint(
    config.model, path, config.pp.crop
  )
  classifier = Classifier(model, params, config.pp.crop)
  outputs = _num_outputs(classifier)
  if class_names:
    names = _checked_names(class_names, outputs, 'The class names file')
  else:
    names = (
      input_pipeline.class_names(
        config.dataset, tfds_data_dir=config.tfds_data_dir
      )
      or ()
    )
    names = names if len(names) == outputs else ()
  return dataclasses.replace(classifier, class_names=names)


def from_published(folder: str) -> Classifier:
  """The model of a folder written by `vit_jax.publish`."""
  summary = publish.read_summary(folder)
  model, params = pretrained.model_from_checkpoint(
    summary['model'], paths.join(folder, publish.NPZ_FILE), summary['crop']
  )
  classifier = Classifier(model, params, summary['crop'])
  return dataclasses.replace(
    classifier,
    class_names=_checked_names(
      summary['class_names'],
      _num_outputs(classifier),
      paths.join(folder, publish.CONFIG_FILE),
    ),
  )


def predict(
  classifier: Classifier, paths: Sequence[str], top_k: int = 5, batch: int = 64
) -> Iterator[Prediction]:
  """The top `top_k` classes of each image file, `batch` files at a time.

  Every batch is padded to `batch` images, so the forward pass compiles
  once. Unreadable files raise `input_pipeline.DatasetError` naming them.
  """
  if top_k < 1 or batch < 1:
    raise ValueError(f'top_k={top_k}, batch={batch}: both must be >= 1.')
  for start in range(0, len(paths), batch):
    chunk = list(paths[start : start + batch])
    images = input_pipeline.read_images(chunk, classifier.crop)
    padded = np.zeros((batch,) + images.shape[1:], images.dtype)
    padded[: len(chunk)] = images
    probabilities = classifier.probabilities(padded)[: len(chunk)]
    for path, row in zip(chunk, probabilities):
      best = np.argsort(-row, kind='stable')[:top_k]
      yield Prediction(
        path, tuple((classifier.name(int(i)), float(row[i])) for i in best)
      )


def format_prediction(prediction: Prediction) -> str:
  """The file, then one `probability  class` line per class."""
  lines = [prediction.path]
  lines += [
    f'  {probability:7.4f}  {name}' for name, probability in prediction.top
  ]
  return '\n'.join(lines)
