"""Errors a user can fix: the message names the bad value and what was expected."""


class ConfigError(ValueError):
  """A config value that cannot run."""


class CheckpointError(ConfigError):
  """A checkpoint that cannot be read or does not match what it is loaded into: a converted or PyTorch
  model (corrupt, or not the requested model) or a calibration checkpoint (from another config). The
  user fixes it by pointing at another file or deleting it, so main prints one line for it."""
