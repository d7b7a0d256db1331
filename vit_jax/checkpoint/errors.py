"""The one error type of the checkpoint package."""


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, of an unknown format, or does not fit.

  Messages name the file at fault, the offending keys or shapes, and how to
  fix the problem.
  """
