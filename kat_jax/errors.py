"""Error types shared across stages."""


class ConfigError(ValueError):
  """A run config field holds a value that cannot work; the message names the field."""


class RewardInfrastructureError(RuntimeError):
  """A reward infrastructure cannot run (the code sandbox, or the math reward's SymPy workers,
  failed its start-up self-check or too many times in a row), so every reward of that kind
  would be a meaningless 0; the message says why."""
