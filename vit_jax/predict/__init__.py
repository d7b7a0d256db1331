"""Running a trained model on image files: top-k classes with their names.

See `classify` for the library; `python -m vit_jax.predict` is its command
line.
"""

from vit_jax.predict.classify import Classifier
from vit_jax.predict.classify import Prediction
from vit_jax.predict.classify import format_prediction
from vit_jax.predict.classify import from_checkpoint
from vit_jax.predict.classify import from_published
from vit_jax.predict.classify import from_task
from vit_jax.predict.classify import predict

__all__ = [
  'Classifier',
  'Prediction',
  'format_prediction',
  'from_checkpoint',
  'from_published',
  'from_task',
  'predict',
]
