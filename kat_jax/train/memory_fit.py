"""Does a step fit the device: its usable bytes, and the first of several step configurations
(best first) whose bytes, from the compiled program's memory analysis, fit them.

A step that does not fit should be turned down with its arithmetic before anything is
allocated, not found out by the allocator in the middle of a run.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Sequence

import numpy as np


def device_bytes_limit(device: Any) -> int | None:
  """The bytes XLA may allocate on `device` (None where the backend does not say, e.g. CPU)."""
  return (device.memory_stats() or {}).get("bytes_limit")


def tree_bytes(tree: Any) -> int:
  """Bytes of a pytree's arrays, concrete or abstract (jax.ShapeDtypeStruct leaves)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def gib(n: int) -> str:
  """Bytes as GiB with two decimals, e.g. '1.44 GiB' (as MiB below 0.1 GiB, '5.3 MiB')."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 // 10 else f"{n / 2**20:.1f} MiB"


class Fit(NamedTuple):
  """first_fit's answer.

  choice: the option to use; None: none fits.
  line: '' when the first option is used unquestioned (it fits, or the limit is unknown);
    else one line: why a later option was chosen, that nothing was checked (no memory
    analysis), or why none fits.
  scratch: option -> the scratch bytes measured for it (options measured, in order).
  tried: each measured option's arithmetic, '<name>: <terms> = <total>', in order.
  """
  choice: Any
  line: str
  scratch: dict
  tried: list


def first_fit(label: str, options: Sequence[tuple[str, Hashable]], limit: int | None,
              scratch: Callable[[Any], int | None],
              need: Callable[[Any, int], tuple[int, str]], why_not: str = "") -> Fit:
  """The first of `options` ((name, option) pairs, best first) whose step fits `limit` bytes.

  scratch(option) -> the step's scratch bytes (e.g. `temp_size_in_bytes` of its compiled
  program; None: the backend reports no memory analysis). need(option, scratch) -> (the
  bytes the step needs with it, the sum that makes them as text, e.g. '1.0 GiB state +
  0.3 GiB scratch'). Options after the first that fits are not measured (each measurement
  may be a compile). why_not: appended to the does-not-fit line (e.g. what else the device
  must hold). An unknown limit (None or 0) takes the first option without measuring.
  """
  if not limit:
    return Fit(options[0][1], "", {}, [])
  measured, tried = {}, []
  for name, option in options:
    temp = scratch(option)
    if temp is None:
      return Fit(option, (f"{label}: the backend reports no memory analysis, the update's "
                          "scratch is not checked"), {}, [])
    measured[option] = temp
    total, terms = need(option, temp)
    tried.append(f"{name}: {terms} = {gib(total)}")
    if total <= limit:
      reason = "" if len(tried) == 1 else (
          f"{label} uses {name}: "
          + "; ".join(f"{t} > {gib(limit)} usable" for t in tried[:-1])
          + f"; {tried[-1]} fits")
      return Fit(option, reason, measured, tried)
  return Fit(None, (f"{label} does not fit: " + "; ".join(tried) +
                    f" > {gib(limit)} usable{why_not}"), measured, tried)
