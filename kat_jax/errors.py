"""Error types shared across stages."""


class ConfigError(ValueError):
  """A run config field holds a value that cannot work; the message names the field."""
