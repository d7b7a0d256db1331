"""The one error type of the input pipeline."""


class DatasetError(ValueError):
  """A dataset cannot be found, read or split as configured.

  Messages name the dataset, split, directory or file at fault, and the
  command or setting that fixes the problem.
  """
