"""Up-front checks of a run config's fields: a bad value ends the run before anything is
built, with one `ConfigError` naming the field, instead of a traceback from deep inside.

    check_section(config.get("rl"), "rl", {"updates_per_batch": at_least(1),
                                           "pack": one_of("tree", "unrolled")})
"""

from __future__ import annotations

from typing import Any, Callable

from kat_jax.errors import ConfigError

Check = tuple[Callable[[Any], bool], str]  # (is the value good, what it must be)

POSITIVE: Check = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")
FRACTION: Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
BETA: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


def at_least(low: int) -> Check:
  """An integer field's lower bound."""
  return (lambda v: v >= low, f">= {low}")


def one_of(*choices: str) -> Check:
  return (lambda v: v in choices, f"one of {list(choices)}")


def check_section(values: Any, section: str, checks: dict[str, Check]) -> None:
  """Raises ConfigError for the first field of `values` (the config's `section`, e.g. "rl" or
  "agentic"; None: nothing to check) that fails its check, in the order of `checks`.

  Fields `values` does not have are skipped (stages share only part of the base config).
  """
  if values is None:
    return
  for name, (ok, must_be) in checks.items():
    if name not in values:
      continue
    value = values[name]
    try:
      good = ok(value)
    except TypeError:
      good = False
    if not good:
      raise ConfigError(f"config.{section}.{name} must be {must_be}, got {value!r}")
