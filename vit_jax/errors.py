"""The errors a user can cause, and fix: one message, no traceback.

Every expected failure (a bad config value, an unreadable or mismatched
checkpoint, a missing or malformed dataset) raises a subclass of `Error`
whose message names the key, file or shape at fault and says how to fix it.
The command-line entry points (`vit_jax.cli`) print such messages as one
line and exit with status 1; any other exception is a bug and keeps its
traceback.
"""


class Error(ValueError):
  """An expected user error; its message is the whole report."""


class ConfigError(Error):
  """A config value is unknown, out of range or inconsistent with another."""


class CheckpointError(Error):
  """A checkpoint file is unreadable, of an unknown format, or does not fit.

  Messages name the file at fault, the offending keys or shapes, and how to
  fix the problem.
  """


class DatasetError(Error):
  """A dataset cannot be found, read or split as configured.

  Messages name the dataset, split, directory or file at fault, and the
  command or setting that fixes the problem.
  """


class Interrupted(Error):
  """SIGTERM or Ctrl-C stopped training.

  The message says which step was saved and where, so the same command
  resumes from it.
  """


class WorkdirInUse(Error):
  """Another run holds the workdir's lock (`vit_jax.workdir_lock`).

  Messages name the holder (host, process id, start time) and the lock.
  """


class OutputError(Error):
  """A file of the run cannot be written (a full disk, no permission).

  Messages name the file, the reason, and that its previous version is
  intact (writes are atomic, `vit_jax.paths`).
  """
