"""Errors a user can fix: the message names the bad value and what was expected."""


class ConfigError(ValueError):
  """A config value that cannot run."""
