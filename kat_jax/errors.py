"""Error types shared across stages.

`InputError` and its subclasses mean "something the user controls is wrong, the program is not"
(a config field, a data file, a checkpoint, the disk): the message names the field, file, line
or checkpoint step at fault and is the whole story, so `experiments.run` prints it as one
`error:` line instead of a traceback.
"""


class InputError(Exception):
  """Bad input or environment the user can fix; the message names the field, path or line."""


class ConfigError(InputError, ValueError):
  """A run config field holds a value that cannot work; the message names the field."""


class DataError(InputError, ValueError):
  """A data file cannot be read as records; the message names the file (and line)."""


class CheckpointError(InputError):
  """A run checkpoint cannot be written or read; the message names the directory and step."""


class RewardInfrastructureError(RuntimeError):
  """A reward infrastructure cannot run (the code sandbox, or the math reward's SymPy workers,
  failed its start-up self-check or too many times in a row), so every reward of that kind
  would be a meaningless 0; the message says why."""
