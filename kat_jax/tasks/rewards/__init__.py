"""Verifiable rewards for RL (KAT-V1 §4.2.2; docs/spec.md §6): math, code, choice, format, general.

  math.py     final-answer extraction + SymPy equivalence (time-limited worker)
  code.py     unit tests in their own sandbox, calling the candidate in another through a
              plain-value channel (`channel.py`); `sandbox.py`: limits, results, and the
              launcher (`sandbox_launcher.py`: namespaces, minimal root, rlimits, one-off uid)
  choice.py   first option letter vs key
  format.py   AutoThink template well-formedness
  general.py  binary heuristic (length, repetition, keyword overlap)
  pool.py     registry `get_reward_fn(kind)` and `RewardPool.score_async(items)`
  health.py   infrastructure checks (self-check, failure bound) and the item clock
"""

from kat_jax.tasks.rewards.choice import choice_reward, extract_choice
from kat_jax.tasks.rewards.code import (RewardInfrastructureError, code_result, code_reward,
                                     extract_code, run_code_tests)
from kat_jax.tasks.rewards.format import format_problems, format_reward
from kat_jax.tasks.rewards.general import general_problems, general_reward
from kat_jax.tasks.rewards.math import (MathChecker, MathVerdict, extract_math_answer,
                                     math_equal, math_reward, math_verdict)
from kat_jax.tasks.rewards.pool import (KINDS, RewardPool, RewardResult, check_infrastructure,
                                        get_reward_fn, register_reward_fn, score_item)
from kat_jax.tasks.rewards.sandbox import SandboxLimits, SandboxResult, run_python
