"""Multi-turn tool-use environments: an interface and three environments.

An episode: `reset(task)` gives the opening chat messages (user turn, optionally a system
turn); then each assistant turn, parsed into a `ParsedAction`, goes to `step`, which runs its
tool calls and returns the observation messages (role "tool", one per call, or "user"), whether
the episode is over, and the reward (0 until done). An assistant turn without tool calls ends
the episode (it is the final answer). `finish()` scores an episode cut off by the rollout's
turn limit. Environments are deep-copyable: tree rollouts copy them when a trajectory branches.

- `PythonToolEnv`: a `python` tool that runs code in the sandbox; reward 1 if the final answer
  contains the task's expected answer.
- `RepoRepairEnv`: a generated buggy module + failing tests (`make_repo_task(seed)`), tools
  read_file / edit_file (not the tests) / run_tests; reward 1 if the tests pass at the end,
  judged with the module and the tests in separate sandboxes (`tasks/rewards/code.py`).
- `DigitsEnv`: a very easy multi-turn task for tiny CPU runs (answer with digits, twice).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from kat_jax.agentic.tool_calls import ParsedAction, ToolCall

Message = dict[str, Any]
RunFn = Callable[[str, Mapping[str, str]], tuple[bool, str]]  # (program, files) -> (ok, output)


@dataclasses.dataclass
class StepResult:
  observation: list[Message]
  done: bool
  reward: float = 0.0


def sandbox_runner(timeout_s: float = 5.0) -> RunFn:
  """Runs a program with the project's sandbox (`kat_jax.tasks.rewards.sandbox`)."""
  from kat_jax.tasks.rewards.sandbox import SandboxLimits, run_python  # pylint: disable=g-import-not-at-top
  limits = SandboxLimits(timeout_s=timeout_s)

  def run(program: str, files: Mapping[str, str]) -> tuple[bool, str]:
    result = run_python(program, files=dict(files), limits=limits, site_packages=False)
    output = result.stdout + result.stderr
    if result.status in ("timeout", "error"):
      output += f"\n[{result.status}] {result.detail}".rstrip()
    return result.passed, output

  return run


def _clip(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} chars cut]"


class Environment(abc.ABC):
  """Base class: tool dispatch, turn counting and error observations."""

  tools: list[dict[str, Any]] = []  # JSON-schema tool descriptions for the chat template
  max_turns: int = 8
  max_observation_chars: int = 2000

  def __init__(self):
    self.turns = 0
    self.done = False

  @abc.abstractmethod
  def reset(self, task: Any) -> list[Message]:
    """Starts an episode; returns the opening messages."""

  @abc.abstractmethod
  def final_reward(self, answer: str) -> float:
    """Reward of the episode ended by the final answer `answer`."""

  def finish(self) -> float:
    """Reward of an episode cut off before a final answer (default 0)."""
    self.done = True
    return 0.0

  def call_tool(self, call: ToolCall) -> str:
    """Runs one tool call -> its output text. Unknown tools/arguments give an error text."""
    method = getattr(self, f"tool_{call.name}", None)
    if method is None or call.name not in {t["function"]["name"] for t in self.tools}:
      names = ", ".join(t["function"]["name"] for t in self.tools)
      return f"error: unknown tool {call.name!r}; available: {names}"
    try:
      return str(method(**call.arguments))
    except TypeError as e:
      return f"error: bad arguments for {call.name}: {e}"

  def step(self, action: ParsedAction) -> StepResult:
    if self.done:
      raise ValueError("step() after the episode ended; call reset()")
    self.turns += 1
    if not action.tool_calls and not action.errors:
      self.done = True
      return StepResult([], True, float(self.final_reward(action.content)))
    observation = [{"role": "tool", "content": _clip(self.call_tool(c),
                                                      self.max_observation_chars)}
                   for c in action.tool_calls]
    observation += [{"role": "tool", "content": f"error: {e}"} for e in action.errors]
    if self.turns >= self.max_turns:
      return StepResult(observation, True, float(self.finish()))
    return StepResult(observation, False, 0.0)


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
  return {"type": "function", "function": {
      "name": name, "description": description,
      "parameters": {"type": "object",
                     "properties": {k: {"type": "string", "description": v}
                                    for k, v in params.items()},
                     "required": list(params)}}}


# ----------------------------------------------------------------------------- python tool


class PythonToolEnv(Environment):
  """task: {"question": str, "answer": str}. Tool `python(code)` prints stdout/stderr."""

  tools = [_tool("python", "Run Python code; returns its stdout and stderr.",
                 code="the program")]

  def __init__(self, run: RunFn | None = None, max_turns: int = 6):
    super().__init__()
    self.run = run or sandbox_runner()
    self.max_turns = max_turns
    self.task: Mapping[str, str] = {}

  def reset(self, task: Mapping[str, str]) -> list[Message]:
    if "question" not in task or "answer" not in task:
      raise ValueError(f"python task needs 'question' and 'answer', got keys {sorted(task)}")
    self.task, self.turns, self.done = task, 0, False
    return [{"role": "user", "content": task["question"]}]

  def tool_python(self, code: str) -> str:
    _, output = self.run(code, {})
    return output or "(no output)"

  def final_reward(self, answer: str) -> float:
    return float(str(self.task["answer"]).strip() in answer)


# ----------------------------------------------------------------------------- repo repair

# (function source with one `{op}`, correct op, wrong ops, test lines). Bugs are single
# operator/argument slips, so a fix is one `edit_file` string replacement.
_FUNCTIONS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("def total(xs):\n    s = 0\n    for x in xs:\n        s {op} x\n    return s\n",
     "+=", ("-=", "*="), ("total([1, 2, 3]) == 6", "total([]) == 0", "total([5]) == 5")),
    ("def is_even(n):\n    return n % 2 {op} 0\n", "==", ("!=", ">"),
     ("is_even(4)", "not is_even(3)", "is_even(0)")),
    ("def clamp(x, lo, hi):\n    return {op}(lo, min(x, hi))\n", "max", ("min",),
     ("clamp(5, 0, 3) == 3", "clamp(-2, 0, 3) == 0", "clamp(2, 0, 3) == 2")),
    ("def count_below(xs, limit):\n    return sum(1 for x in xs if x {op} limit)\n", "<",
     ("<=", ">"), ("count_below([1, 2, 3], 2) == 1", "count_below([], 1) == 0",
                   "count_below([0, 5], 5) == 1")),
    ("def last(xs):\n    return xs[{op}]\n", "-1", ("0", "1"),
     ("last([1, 2, 3]) == 3", "last([7]) == 7")),
    ("def factorial(n):\n    r = 1\n    for i in range(1, n {op}):\n        r *= i\n    return r\n",
     "+ 1", ("- 1", "+ 0"), ("factorial(0) == 1", "factorial(4) == 24", "factorial(1) == 1")),
    ("def maximum(xs):\n    best = xs[0]\n    for x in xs:\n        if x {op} best:\n"
     "            best = x\n    return best\n", ">", ("<",),
     ("maximum([3, 9, 2]) == 9", "maximum([-1, -5]) == -1")),
    ("def reverse_words(s):\n    return ' '.join(s.split(){op})\n", "[::-1]", ("[1:]", ""),
     ("reverse_words('a b c') == 'c b a'", "reverse_words('x') == 'x'")),
)
_TEST_RUNNER = """\
import sys, traceback
import {tests} as t
failed = 0
for name in sorted(n for n in dir(t) if n.startswith("test_")):
    try:
        getattr(t, name)()
        print("PASS", name)
    except Exception as e:
        failed += 1
        print("FAIL", name, "-", type(e).__name__, e)
print(f"{{failed}} failed")
sys.exit(1 if failed else 0)
"""

_CALL_TESTS = """

for _name, _test in sorted(list(globals().items())):
    if _name.startswith("test_") and callable(_test):
        _test()
"""


@dataclasses.dataclass(frozen=True)
class RepoTask:
  """A generated repository: files {name: text}, the tests module, and the known fix."""

  seed: int
  files: Mapping[str, str]
  module: str
  tests_module: str
  description: str
  fix: tuple[str, str, str]  # (path, old, new) that repairs the bug


def make_repo_task(seed: int, num_functions: int = 3) -> RepoTask:
  """A deterministic buggy module (one wrong operator) and its unit tests, from `seed`."""
  if not 1 <= num_functions <= len(_FUNCTIONS):
    raise ValueError(f"num_functions must be in [1, {len(_FUNCTIONS)}], got {num_functions}")
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.choice(len(_FUNCTIONS), num_functions, replace=False).tolist())
  buggy = int(rng.choice(chosen))
  module = str(rng.choice(["utils", "helpers", "core", "mathlib"]))
  sources, tests = [], []
  fix = ("", "", "")
  for i in chosen:
    template, good, bads, checks = _FUNCTIONS[i]
    op = good
    if i == buggy:
      op = str(rng.choice(bads))
      fix = (f"{module}.py", template.format(op=op).splitlines()[_op_line(template)],
             template.format(op=good).splitlines()[_op_line(template)])
    sources.append(template.format(op=op))
    name = template.split("(")[0].removeprefix("def ")
    body = "".join(f"    assert {c}\n" for c in checks)
    tests.append(f"def test_{name}():\n{body}")
  tests_module = f"test_{module}"
  names = ", ".join(t.split("(")[0].removeprefix("def ") for t in
                    (_FUNCTIONS[i][0] for i in chosen))
  files = {f"{module}.py": "\n\n".join(sources),
           f"{tests_module}.py": f"from {module} import {names}\n\n\n" + "\n\n".join(tests)}
  description = (f"The repository has {module}.py and its tests {tests_module}.py. Some tests "
                 f"fail. Find the bug in {module}.py, fix it with edit_file, check with "
                 "run_tests, then reply with a short summary (no tool call) when done.")
  return RepoTask(seed, files, module, tests_module, description, fix)


def _op_line(template: str) -> int:
  return next(i for i, line in enumerate(template.splitlines()) if "{op}" in line)


class RepoRepairEnv(Environment):
  """Tools read_file(path), edit_file(path, old, new), run_tests(); reward: tests pass."""

  tools = [
      _tool("read_file", "Return the text of a file.", path="file name"),
      _tool("edit_file", "Replace the one occurrence of `old` in a file by `new`.",
            path="file name", old="exact text to replace", new="replacement text"),
      {"type": "function", "function": {
          "name": "run_tests", "description": "Run the unit tests; returns their report.",
          "parameters": {"type": "object", "properties": {}, "required": []}}},
  ]

  def __init__(self, run: RunFn | None = None, max_turns: int = 8,
               verdict_timeout_s: float = 5.0):
    super().__init__()
    self.run = run or sandbox_runner()
    self.max_turns = max_turns
    self.verdict_timeout_s = verdict_timeout_s
    self.files: dict[str, str] = {}
    self.task: RepoTask | None = None

  def reset(self, task: RepoTask | int) -> list[Message]:
    self.task = make_repo_task(task) if isinstance(task, (int, np.integer)) else task
    self.files = dict(self.task.files)
    self.turns, self.done = 0, False
    listing = "\n".join(sorted(self.files))
    return [{"role": "user", "content": f"{self.task.description}\n\nFiles:\n{listing}"}]

  def tool_read_file(self, path: str) -> str:
    if path not in self.files:
      return f"error: no file {path!r}; files: {', '.join(sorted(self.files))}"
    return self.files[path]

  def tool_edit_file(self, path: str, old: str, new: str) -> str:
    if path not in self.files:
      return f"error: no file {path!r}"
    if path == f"{self.task.tests_module}.py":
      return f"error: {path} is the task's tests; fix {self.task.module}.py instead"
    count = self.files[path].count(old) if old else 0
    if count != 1:
      return f"error: `old` must occur exactly once in {path}, found {count} times"
    self.files[path] = self.files[path].replace(old, new)
    return f"edited {path}"

  def tool_run_tests(self) -> str:
    return self.run_tests()[1]

  def run_tests(self) -> tuple[bool, str]:
    return self.run(_TEST_RUNNER.format(tests=self.task.tests_module), self.files)

  def final_reward(self, answer: str) -> float:
    return self.verdict()

  def finish(self) -> float:
    self.done = True
    return self.verdict()

  def verdict(self) -> float:
    """1.0 if the task's tests pass on the edited module. Unlike `run_tests` (the agent's
    feedback), the tests run in a process of their own and call the module's functions through
    the code reward's plain-value channel, so the module cannot fake a pass (exit 0 at import,
    patched builtins)."""
    from kat_jax.tasks.rewards.code import run_code_tests  # pylint: disable=g-import-not-at-top
    from kat_jax.tasks.rewards.sandbox import SandboxLimits  # pylint: disable=g-import-not-at-top
    tests = self.task.files[f"{self.task.tests_module}.py"] + _CALL_TESTS
    result = run_code_tests(self.files[f"{self.task.module}.py"], tests,
                            module_name=self.task.module,
                            limits=SandboxLimits(timeout_s=self.verdict_timeout_s))
    return 1.0 if result.passed else 0.0


# ----------------------------------------------------------------------------- digits


class DigitsEnv(Environment):
  """A very easy multi-turn task: answer with digits in each of `rounds` turns.

  Every assistant turn is an answer (no tools); after each of the first `rounds - 1` turns
  the user asks again. Reward = mean over turns of the fraction of digit characters in the
  answer (first `width` characters), so it is dense enough for a random tiny model to climb.
  `success` (reward >= threshold) is the rate the tiny CPU run reports.
  """

  tools = []

  def __init__(self, rounds: int = 2, width: int = 4, threshold: float = 0.5):
    super().__init__()
    self.rounds, self.width, self.threshold = rounds, width, threshold
    self.max_turns = rounds
    self.scores: list[float] = []

  def reset(self, task: Any = None) -> list[Message]:
    self.turns, self.done, self.scores = 0, False, []
    return [{"role": "user", "content": f"Reply with digits only. ({task})"}]

  def _score(self, text: str) -> float:
    head = text[:self.width]
    return sum(c.isdigit() for c in head) / self.width

  def step(self, action: ParsedAction) -> StepResult:
    if self.done:
      raise ValueError("step() after the episode ended; call reset()")
    self.turns += 1
    self.scores.append(self._score(action.content))
    if self.turns >= self.rounds:
      self.done = True
      return StepResult([], True, float(np.mean(self.scores)))
    return StepResult([{"role": "user", "content": "Again."}], False, 0.0)

  def final_reward(self, answer: str) -> float:
    return float(np.mean(self.scores)) if self.scores else 0.0


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {
    "digits": DigitsEnv, "python": PythonToolEnv, "repo_repair": RepoRepairEnv}


def make_environment(name: str, **kwargs) -> Environment:
  if name not in ENVIRONMENTS:
    raise ValueError(f"unknown environment {name!r}; valid: {sorted(ENVIRONMENTS)}")
  return ENVIRONMENTS[name](**kwargs)
