"""Error types shared across stages."""


class ConfigError(ValueError):
  """A run config field holds a value that cannot work; the message names the field."""


class RewardInfrastructureError(RuntimeError):
  """The code-reward sandbox cannot run programs (failed its start-up self-check, or too many
  runs in a row), so every code reward would be a meaningless 0; the message says why."""
