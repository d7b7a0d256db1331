"""Few-shot linear evaluation: how good a representation is, in seconds.

For each k of `config.fewshot.shots`, a ridge regression from the model's
pre-logits features (the input of its `head`) of the first k training
images of every class to ±1 class targets is fitted in closed form and
scored on every image of the test split. This is big_vision's few-shot
evaluator: no gradient steps, one forward pass over the k·classes chosen
images and the test split, so the trainer can run it every `eval_every`
and show how the representation improves while the head is still poor.

The chosen training images (preprocessed for evaluation: resized, not
augmented) stay in host memory, k_max·classes·crop²·3 float32 values
(about 15 GB at 25 shots of ImageNet's 1,000 classes at 224), and no more
while they are read; each host computes the same figures on its own.
"""

import dataclasses
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vit_jax import features as features_lib
from vit_jax import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.input_pipeline import sources


def ridge_fit(
  features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(mean, weights, bias)` of the ridge regression from `features`
  `[n, d]` to ±1 one-hot targets of `labels`.

  Solved on centred features in float64, over the smaller of the two
  sides: `n` × `n` (the dual, few shots) or `d` × `d`. The penalty is
  `l2_reg` times the mean squared norm of the centred features, so one
  value suits any feature scale.
  """
  x = np.asarray(features, np.float64)
  mean = x.mean(axis=0)
  x = x - mean
  targets = 2.0 * np.eye(num_classes)[labels] - 1.0
  bias = targets.mean(axis=0)
  penalty = l2_reg * max(np.sum(x * x) / len(x), 1e-12)
  n, d = x.shape
  if n <= d:
    dual = np.linalg.solve(x @ x.T + penalty * np.eye(n), targets - bias)
    return mean, x.T @ dual, bias
  weights = np.linalg.solve(
    x.T @ x + penalty * np.eye(d), x.T @ (targets - bias)
  )
  return mean, weights, bias


def ridge_accuracy(
  fit: Tuple[np.ndarray, np.ndarray, np.ndarray],
  features: np.ndarray,
  labels: np.ndarray,
) -> float:
  """Accuracy of a `ridge_fit` on `features` with true `labels`."""
  mean, weights, bias = fit
  scores = (np.asarray(features, np.float64) - mean) @ weights + bias
  return float(np.mean(scores.argmax(axis=1) == labels))


def first_per_class(
  labels: np.ndarray, per_class: int, num_classes: int
) -> np.ndarray:
  """Indices of the first `per_class` examples of each class, in order."""
  chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
  return np.concatenate(chosen)


@dataclasses.dataclass
class _Examples:
  """Images and labels on the host (`[n, crop, crop, 3]`, `[n]`)."""

  images: np.ndarray
  labels: np.ndarray


def still_needed(
  labels: np.ndarray, counts: np.ndarray, per_class: int
) -> np.ndarray:
  """Which of `labels` (in order) are among the first `per_class` of their
  class, given `counts` already kept of each; updates `counts`."""
  keep = np.zeros(len(labels), bool)
  for index, label in enumerate(labels):
    if counts[label] < per_class:
      counts[label] += 1
      keep[index] = True
  return keep


def _training_examples(
  data: input_pipeline.EvalData, per_class: int, num_classes: int
) -> _Examples:
  """The first `per_class` examples of every class of `data`, grouped by
  class; reads no further than it needs, and keeps only those examples
  from each batch as it goes (not every image read until the rarest class
  is complete)."""
  images, labels = [], []
  counts = np.zeros(num_classes, np.int64)
  for batch_images, batch_labels in features_lib.examples(data):
    keep = still_needed(batch_labels, counts, per_class)
    images.append(batch_images[keep])
    labels.append(batch_labels[keep])
    if counts.min() >= per_class:
      break
  labels = np.concatenate(labels)
  grouped = first_per_class(labels, per_class, num_classes)
  return _Examples(np.concatenate(images)[grouped], labels[grouped])


def check_shots_fit(
  shots: Sequence[int],
  labels: np.ndarray,
  class_names: Sequence[str],
  split: str,
) -> None:
  """A ConfigError naming config.fewshot.shots if a class has fewer than
  `max(shots)` images among `labels` (the first `max(shots)` of each class
  of the training `split`, read to its end for the rarer ones): a k-shot
  fit would silently see fewer than k images of that class."""
  counts = np.bincount(labels, minlength=len(class_names))
  rarest = int(np.argmin(counts))
  fewest = int(counts[rarest])
  if fewest >= max(shots):
    return
  if not fewest:
    raise ConfigError(
      f'config.fewshot.shots={tuple(shots)!r}: class {rarest} '
      f'({class_names[rarest]!r}) has no image in split {split!r}; few-shot '
      'evaluation needs every class there, or --config.fewshot.shots=().'
    )
  fitting = tuple(k for k in shots if k <= fewest) or (fewest,)
  raise ConfigError(
    f'config.fewshot.shots={tuple(shots)!r} asks for {max(shots)} training '
    f'images per class, but class {rarest} ({class_names[rarest]!r}) has '
    f'only {fewest} in split {split!r}; give shots of at most {fewest}, '
    f'e.g. --config.fewshot.shots="{fitting}".'
  )


class Evaluator:
  """`evaluator(params)` → {'1shot': accuracy, '5shot': ...} on the test
  split, for `config.fewshot` (shots, l2_reg) of a run."""

  def __init__(
    self,
    model: nn.Module,
    source: sources.Source,
    config: ml_collections.ConfigDict,
  ):
    shots = tuple(int(k) for k in config.fewshot.shots)
    if not shots or min(shots) < 1:
      raise ConfigError(
        f'config.fewshot.shots={config.fewshot.shots!r}; give positive '
        'numbers of training images per class, e.g. (1, 5, 10, 25).'
      )
    self.shots = shots
    self.l2_reg = float(config.fewshot.l2_reg)
    self.num_classes = source.info.num_classes
    # Every host computes the whole evaluation on its own devices.
    hosts = input_pipeline.Hosts(0, 1, jax.local_device_count())
    batch = config.batch_eval

    def split(name):
      return input_pipeline.eval_dataset(
        source, config.pp, batch_size=batch, hosts=hosts, split=name
      )

    self.train = _training_examples(
      split(config.pp.train), max(shots), self.num_classes
    )
    check_shots_fit(
      shots, self.train.labels, source.info.class_names, config.pp.train
    )
    self.test = split(config.pp.test)
    self.batch = batch
    self._extract = features_lib.extractor(model)

  def train_features(self, params: Any) -> np.ndarray:
    """Features of the chosen training images, `self.batch` at a time."""
    images = self.train.images
    return np.concatenate(
      [
        self._extract(params, images[i : i + self.batch])
        for i in range(0, len(images), self.batch)
      ]
    )

  def __call__(self, params: Any) -> Dict[str, float]:
    train_features = self.train_features(params)
    test_features, test_labels = features_lib.of_split(
      self._extract, params, self.test
    )
    results = {}
    for k in self.shots:
      keep = first_per_class(self.train.labels, k, self.num_classes)
      fit = ridge_fit(
        train_features[keep],
        self.train.labels[keep],
        self.num_classes,
        self.l2_reg,
      )
      results[f'{k}shot'] = ridge_accuracy(fit, test_features, test_labels)
    return results


def summary(results: Mapping[str, float], shots: Sequence[int]) -> str:
  """'1-shot 0.512, 5-shot 0.873' for a log line."""
  return ', '.join(f'{k}-shot {results[f"{k}shot"]:.3f}' for k in shots)
