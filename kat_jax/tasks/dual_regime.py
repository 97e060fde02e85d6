"""Procedural dual-regime tasks: easy queries that need no reasoning and hard ones that do.

Every task carries its domain, regime, difficulty, a reference answer and a verifier spec, plus
what the cold-start SFT data needs without a teacher LLM (KAT-V1 report §4.1.1 uses DeepSeek-R1/V3
for these): a worked reasoning trace (`think`) and a judge rationale for each mode.

  easy (difficulty 1): fact lookup (general), one-step arithmetic (math), one-line code edit (code)
  hard (difficulty 2-3): chained arithmetic and linear equations (math, sympy-checked), small
       functions with unit tests (code), formula-based multiple choice (science)

Texts are short (prompts ~20-120 characters, traces one or two lines) so the byte-tokenized tiny
model fits a whole example in a few hundred tokens. Generation is deterministic in (seed, index).

Also here: minimal user task records (`Task.from_record`: prompt, answer, verifier type) for
tagging your own queries, and `task_text`, a task as a plain-text pre-training document
(`config.data.source='autothink'`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

REGIMES = ("easy", "hard")
DOMAINS = ("general", "math", "code", "science")
_SEED_STRIDE = 1_000_003  # (seed, index) -> one integer seed; prime so nearby seeds differ
# The judge line of a think-on/off example without its own (imported rows, user task records).
DEFAULT_JUDGE = {"think_on": "The query needs step-by-step reasoning.",
                 "think_off": "The query can be answered directly."}


@dataclasses.dataclass(frozen=True)
class Task:
  """One verifiable query.

  verifier: {"type": "exact", "accept": [str, ...]} | {"type": "math", "value": str}
    | {"type": "code", "tests": str} | {"type": "choice", "key": "A".."D"}.
  judge: {"think_on": str, "think_off": str}, a rationale for choosing each mode.
  """
  id: str
  kind: str
  domain: str
  regime: str | None  # None: a user task of unknown regime
  difficulty: int | None
  prompt: str
  answer: str
  verifier: dict[str, Any]
  think: str | None  # None: a user task without a reasoning trace
  judge: dict[str, str]

  def to_record(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_record(cls, record: Mapping[str, Any], default_id: str = "user") -> Task:
    """A task from a generator record (every field) or a minimal user record.

    Minimal user record: {"prompt": str, "answer": str, "verifier": type | spec,
    "domain"?, "id"?, "regime"?, "difficulty"?, "think"?, "judge"?: str | {mode: str}}.
    A verifier type string is completed from the answer (see `user_verifier`); missing
    fields get: id `default_id`, kind 'user', domain '' (tagging infers it), regime and
    difficulty None (unknown), think None (no trace: not renderable as think-on), judge the
    generic rationale of each mode.
    """
    if not isinstance(record, Mapping):
      raise ValueError(f"task record must be an object, got {type(record).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    if all(n in record for n in names):
      return cls(**{n: record[n] for n in names})
    return _user_task(record, default_id)


def user_verifier(verifier: Any, answer: str) -> dict[str, Any]:
  """A user record's verifier: a full spec, or a type completed from the answer
  ('exact' -> accept [answer], 'math' -> value answer, 'choice' -> key answer; 'code' needs
  a spec with 'tests')."""
  from kat_jax.tasks import verifiers  # pylint: disable=g-import-not-at-top (pulls rl)
  if isinstance(verifier, str):
    if verifier == "code":
      raise ValueError("field 'verifier': 'code' needs a spec {'type': 'code', 'tests': str}")
    field = {"exact": ("accept", [answer]), "math": ("value", answer),
             "choice": ("key", answer.strip())}.get(verifier)
    if field is None:
      raise ValueError(f"field 'verifier': {verifier!r} not in {verifiers.VERIFIER_TYPES}")
    verifier = {"type": verifier, field[0]: field[1]}
  try:
    verifiers.check_spec(verifier)
  except ValueError as e:
    raise ValueError(f"field 'verifier': {e}") from None
  if verifier["type"] == "choice" and verifier["key"] not in ("A", "B", "C", "D"):
    raise ValueError(f"field 'verifier': choice key must be A-D, got {verifier['key']!r}")
  return dict(verifier)


def _user_task(record: Mapping[str, Any], default_id: str) -> Task:
  """A minimal user record -> Task (see `Task.from_record`); ValueError naming the field."""
  for field in ("prompt", "answer"):
    if not isinstance(record.get(field), str) or not record[field].strip():
      raise ValueError(f"field {field!r}: missing or not a non-empty string")
  if "verifier" not in record:
    raise ValueError("field 'verifier': missing (a type such as 'math' or a full spec)")
  optional_str = {"id": str, "domain": str, "think": str, "kind": str}
  for field, kind in optional_str.items():
    if record.get(field) is not None and not isinstance(record[field], kind):
      raise ValueError(f"field {field!r}: must be a string, got {type(record[field]).__name__}")
  regime = record.get("regime")
  if regime is not None and regime not in REGIMES:
    raise ValueError(f"field 'regime': {regime!r} not in {REGIMES}")
  difficulty = record.get("difficulty")
  if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, int)):
    raise ValueError(f"field 'difficulty': must be an integer, got {difficulty!r}")
  judge = record.get("judge")
  if judge is None:
    judge = dict(DEFAULT_JUDGE)
  elif isinstance(judge, str):
    judge = {"think_on": judge, "think_off": judge}
  elif not (isinstance(judge, Mapping) and all(isinstance(judge.get(m), str)
                                               for m in DEFAULT_JUDGE)):
    raise ValueError("field 'judge': a string or {'think_on': str, 'think_off': str}")
  return Task(id=record.get("id") or default_id, kind=record.get("kind") or "user",
              domain=record.get("domain") or "", regime=regime, difficulty=difficulty,
              prompt=record["prompt"], answer=record["answer"],
              verifier=user_verifier(record["verifier"], record["answer"]),
              think=record.get("think"), judge=dict(judge))


# ---------------------------------------------------------------------------
# Easy generators
# ---------------------------------------------------------------------------

_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
             "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima",
             "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw",
             "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon"}
_SYMBOLS = {"gold": "Au", "iron": "Fe", "sodium": "Na", "oxygen": "O", "carbon": "C",
            "silver": "Ag", "helium": "He", "copper": "Cu", "neon": "Ne", "lead": "Pb"}
_OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "early": "late",
              "open": "closed", "light": "dark", "full": "empty", "wet": "dry", "old": "new"}

_JUDGE = {
    # kind -> (think_off rationales, think_on rationales)
    "lookup": (["A fact lookup; answer directly.", "Simple recall; no reasoning needed."],
               ["A fact, but worth a check; think first."]),
    "arith": (["One-step arithmetic; answer directly.", "A single operation; no reasoning."],
              ["Easy, but verify the result; think first."]),
    "edit": (["A one-line edit; answer directly.", "Trivial code change; no reasoning."],
             ["Check the edit carefully; think first."]),
    "chain": (["Arithmetic I can do at once; answer directly."],
              ["Several operations in a row; think step by step.",
               "Multi-step arithmetic; work it out."]),
    "linear": (["A simple equation; answer directly."],
               ["An equation to solve; think step by step.",
                "Algebra with several steps; reason first."]),
    "program": (["A short function; answer directly."],
                ["Code that must pass tests; plan it first.",
                 "A small program; reason about the logic."]),
    "mcq": (["A quick formula; answer directly."],
            ["Needs a formula and a calculation; think first.",
             "Science question with arithmetic; reason it out."]),
}


def _judges(kind: str, rng: random.Random) -> dict[str, str]:
  off, on = _JUDGE[kind]
  return {"think_off": rng.choice(off), "think_on": rng.choice(on)}


def _lookup(rng: random.Random) -> dict[str, Any]:
  table, question, fact = rng.choice([
      (_CAPITALS, "What is the capital of {}?", "the capital of {} is {}."),
      (_SYMBOLS, "What is the chemical symbol for {}?", "the symbol for {} is {}."),
      (_OPPOSITES, "What is the opposite of '{}'?", "the opposite of {} is {}."),
  ])
  key = rng.choice(sorted(table))
  value = table[key]
  return dict(kind="lookup", domain="general", difficulty=1, prompt=question.format(key),
              answer=value, verifier={"type": "exact", "accept": [value]},
              think="Recall: " + fact.format(key, value))


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _arith(rng: random.Random) -> dict[str, Any]:
  op = rng.choice(sorted(_OPS))
  a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (
      rng.randint(1, 99), rng.randint(1, 99))
  value = _OPS[op](a, b)
  return dict(kind="arith", domain="math", difficulty=1, prompt=f"What is {a} {op} {b}?",
              answer=str(value), verifier={"type": "math", "value": str(value)},
              think=f"{a} {op} {b} = {value}.")


_EDITS = (
    # (instruction, before, after, tests, think); {c}/{d} are random constants.
    ("Fix f so it adds", "def f(a, b): return a - b", "def f(a, b): return a + b",
     "assert f(2, 3) == 5\nassert f(-1, 4) == 3", "Only the operator changes: - to +."),
    ("Fix f so it multiplies", "def f(a, b): return a + b", "def f(a, b): return a * b",
     "assert f(2, 3) == 6\nassert f(4, 0) == 0", "Only the operator changes: + to *."),
    ("Make f add {d} instead", "def f(x): return x + {c}", "def f(x): return x + {d}",
     "assert f(1) == 1 + {d}\nassert f(0) == {d}", "Replace the constant {c} with {d}."),
    ("Rename g to h", "def g(x): return x * {c}", "def h(x): return x * {c}",
     "assert h(2) == 2 * {c}", "Only the name changes: g becomes h."),
)


def _edit(rng: random.Random) -> dict[str, Any]:
  instruction, before, after, tests, think = rng.choice(_EDITS)
  c = rng.randint(2, 9)
  d = rng.choice([v for v in range(2, 10) if v != c])

  def fill(s):
    return s.format(c=c, d=d)

  return dict(kind="edit", domain="code", difficulty=1,
              prompt=f"{fill(instruction)}: {fill(before)}", answer=fill(after),
              verifier={"type": "code", "tests": fill(tests)}, think=fill(think))


# ---------------------------------------------------------------------------
# Hard generators
# ---------------------------------------------------------------------------


def _chain(rng: random.Random) -> dict[str, Any]:
  """(((a op b) op c) op d): 2-3 operations, every partial result a small integer."""
  num_ops = rng.randint(2, 3)
  value = rng.randint(2, 20)
  expr, steps = str(value), []
  for i in range(num_ops):
    op = rng.choice(["+", "-", "*"] if abs(value) <= 30 else ["+", "-"])
    n = rng.randint(2, 9) if op == "*" else rng.randint(2, 40)
    new = _OPS[op](value, n)
    steps.append(f"{value} {op} {n} = {new}.")
    expr = f"({expr} {op} {n})" if i < num_ops - 1 else f"{expr} {op} {n}"
    value = new
  return dict(kind="chain", domain="math", difficulty=num_ops, prompt=f"Compute {expr}.",
              answer=str(value), verifier={"type": "math", "value": str(value)},
              think=" ".join(steps))


def _linear(rng: random.Random) -> dict[str, Any]:
  x = rng.randint(-9, 12)
  a = rng.randint(2, 9)
  if rng.random() < 0.5:  # a*x + b = c
    b = rng.randint(-20, 20)
    c = a * x + b
    prompt = f"Solve for x: {a}*x {_signed(b)} = {c}."
    think = f"Move {b}: {a}*x = {c - b}. Divide by {a}: x = {x}."
    difficulty = 2
  else:  # a*x + b = c*x + d
    c = rng.choice([v for v in range(1, 9) if v != a])
    b = rng.randint(-20, 20)
    d = (a - c) * x + b
    prompt = f"Solve for x: {a}*x {_signed(b)} = {c}*x {_signed(d)}."
    think = (f"Collect x: {a - c}*x = {d - b}. Divide by {a - c}: x = {x}.")
    difficulty = 3
  return dict(kind="linear", domain="math", difficulty=difficulty, prompt=prompt,
              answer=f"x = {x}", verifier={"type": "math", "value": str(x)}, think=think)


def _signed(n: int) -> str:
  return f"+ {n}" if n >= 0 else f"- {-n}"


# (description, args, reference code, input maker, plan); the reference computes the tests.
_PROGRAMS = (
    ("the sum of the digits of n", "n", "def f(n): return sum(int(d) for d in str(n))",
     lambda r: (r.randint(0, 9999),), "Turn n into a string and add the digits."),
    ("the number of vowels in s", "s", "def f(s): return sum(c in 'aeiou' for c in s)",
     lambda r: ("".join(r.choice("abeiotuxyz") for _ in range(r.randint(1, 7))),),
     "Count the characters that are in 'aeiou'."),
    ("max(xs) minus min(xs)", "xs", "def f(xs): return max(xs) - min(xs)",
     lambda r: ([r.randint(-9, 20) for _ in range(r.randint(1, 5))],),
     "Use max and min, then subtract."),
    ("n factorial", "n",
     "def f(n):\n  r = 1\n  for i in range(2, n + 1):\n    r *= i\n  return r",
     lambda r: (r.randint(0, 7),), "Multiply 2..n in a loop, starting from 1."),
    ("True if s is a palindrome", "s", "def f(s): return s == s[::-1]",
     lambda r: (r.choice(["abba", "abc", "racecar", "xy", "a", "noon", "tree"]),),
     "Compare s with its reverse s[::-1]."),
    ("the sum of the even numbers in xs", "xs",
     "def f(xs): return sum(x for x in xs if x % 2 == 0)",
     lambda r: ([r.randint(0, 20) for _ in range(r.randint(0, 5))],),
     "Keep x with x % 2 == 0 and sum them."),
    ("the count of multiples of k in 1..n", "n, k", "def f(n, k): return n // k",
     lambda r: (r.randint(1, 50), r.randint(1, 9)), "Multiples of k up to n: n // k."),
    ("s with its words reversed", "s", "def f(s): return ' '.join(s.split()[::-1])",
     lambda r: (" ".join(r.sample(["a", "big", "cat", "dog", "ran", "up"], r.randint(1, 4))),),
     "Split on spaces, reverse the list, join."),
)


def _program(rng: random.Random) -> dict[str, Any]:
  index = rng.randrange(len(_PROGRAMS))
  description, args, code, make_input, plan = _PROGRAMS[index]
  namespace: dict[str, Any] = {}
  exec(code, namespace)  # trusted reference code written above  # pylint: disable=exec-used
  inputs = []
  for _ in range(20):  # up to three distinct test inputs
    candidate = make_input(rng)
    if candidate not in inputs:
      inputs.append(candidate)
    if len(inputs) == 3:
      break
  tests = "\n".join(
      f"assert f({', '.join(map(repr, x))}) == {namespace['f'](*x)!r}" for x in inputs)
  example = inputs[0]
  think = (f"{plan} Check: f({', '.join(map(repr, example))}) = "
           f"{namespace['f'](*example)!r}.")
  return dict(kind="program", domain="code", difficulty=2 + (index in (3, 7)),
              prompt=f"Write a Python function f({args}) returning {description}.",
              answer=code, verifier={"type": "code", "tests": tests}, think=think)


# (question, unit, formula text, compute, input maker); answers are exact integers.
_FORMULAS = (
    ("A car covers {0} km in {1} h. Its speed in km/h?", "v = d / t",
     lambda d, t: d // t, lambda r: (lambda t: (t * r.randint(10, 60), t))(r.randint(2, 5))),
    ("A {0} kg mass accelerates at {1} m/s^2. The force in N?", "F = m * a",
     lambda m, a: m * a, lambda r: (r.randint(2, 20), r.randint(2, 9))),
    ("A {0} ohm resistor carries {1} A. The voltage in V?", "V = R * I",
     lambda R, i: R * i, lambda r: (r.randint(2, 50), r.randint(2, 6))),
    ("{0} g of a metal fills {1} cm^3. Its density in g/cm^3?", "rho = m / V",
     lambda m, v: m // v, lambda r: (lambda v: (v * r.randint(2, 19), v))(r.randint(2, 9))),
    ("A {0} kg ball moves at {1} m/s. Its kinetic energy in J?", "E = m * v^2 / 2",
     lambda m, v: m * v * v // 2, lambda r: (2 * r.randint(1, 5), r.randint(2, 9))),
)
_LETTERS = "ABCD"


def _mcq(rng: random.Random) -> dict[str, Any]:
  question, formula, compute, make_input = rng.choice(_FORMULAS)
  x, y = make_input(rng)
  value = compute(x, y)
  distractors = {x * y, x + y, value * 2, value + rng.randint(1, 9), abs(value - y)} - {value}
  while len(distractors) < 3:
    distractors = (distractors | {value + rng.randint(10, 30)}) - {value}
  options = rng.sample(sorted(distractors), 3) + [value]
  rng.shuffle(options)
  key = _LETTERS[options.index(value)]
  choices = " ".join(f"{letter}) {o}" for letter, o in zip(_LETTERS, options))
  think = f"{formula} with {x} and {y} gives {value}. That is option {key}."
  return dict(kind="mcq", domain="science", difficulty=2,
              prompt=f"{question.format(x, y)} {choices}", answer=key,
              verifier={"type": "choice", "key": key}, think=think)


GENERATORS: dict[str, dict[str, Callable[[random.Random], dict[str, Any]]]] = {
    "easy": {"lookup": _lookup, "arith": _arith, "edit": _edit},
    "hard": {"chain": _chain, "linear": _linear, "program": _program, "mcq": _mcq},
}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def make_task(seed: int, index: int, *, hard_fraction: float = 0.5,
              id_prefix: str = "task") -> Task:
  """Task number `index` of the stream `seed` (same arguments -> same task)."""
  if not 0.0 <= hard_fraction <= 1.0:
    raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
  rng = random.Random(seed * _SEED_STRIDE + index)
  regime = "hard" if rng.random() < hard_fraction else "easy"
  kind = rng.choice(sorted(GENERATORS[regime]))
  fields = GENERATORS[regime][kind](rng)
  return Task(id=f"{id_prefix}-{seed}-{index}", regime=regime, judge=_judges(kind, rng),
              **fields)


def generate_tasks(num_tasks: int, seed: int, *, hard_fraction: float = 0.5,
                   id_prefix: str = "task") -> list[Task]:
  """`num_tasks` tasks of stream `seed`; the first n of a longer list are the same tasks."""
  if num_tasks < 0:
    raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
  return [make_task(seed, i, hard_fraction=hard_fraction, id_prefix=id_prefix)
          for i in range(num_tasks)]


def iter_task_records(num_tasks: int, seed: int, **kwargs) -> Iterator[dict[str, Any]]:
  for task in generate_tasks(num_tasks, seed, **kwargs):
    yield task.to_record()


def write_tasks(path: str | os.PathLike, num_tasks: int, seed: int, *,
                hard_fraction: float = 0.5, fmt: str | None = None) -> int:
  """Writes tasks as JSONL (`.jsonl`) or ArrayRecord (`.array_record`); returns the count.

  ArrayRecord rows are JSON too, but task records have no `text`/`messages`, so they are
  written unvalidated; read them back with `read_tasks`.
  """
  from kat_jax.data import sources  # pylint: disable=g-import-not-at-top
  fmt = fmt or ("array_record" if os.fspath(path).endswith(".array_record") else "jsonl")
  records = iter_task_records(num_tasks, seed, hard_fraction=hard_fraction)
  if fmt == "jsonl":
    return sources.write_jsonl(records, path)
  if fmt == "array_record":
    return sources.write_array_record(records, path, validate=False)
  raise ValueError(f"fmt must be 'jsonl' or 'array_record', got {fmt!r}")


def task_text(task: Task) -> str:
  """A task as a plain-text document for pre-training / calibration (no chat template):
  the question, the worked reasoning for hard tasks only (easy ones need none), the answer."""
  lines = [f"Question: {task.prompt}"]
  if task.regime == "hard" and task.think:
    lines.append(f"Reasoning: {task.think}")
  lines.append(f"Answer: {task.answer}")
  return "\n".join(lines)


def write_text_corpus(path: str | os.PathLike, num_docs: int, seed: int, *,
                      hard_fraction: float = 0.5) -> int:
  """Writes `num_docs` tasks of stream `seed` as {"text": task_text, "id", "domain",
  "regime"} JSON lines (atomically); returns the count. Source 'autothink' of
  `train.loop.build_sources`."""
  from kat_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.write_jsonl(
      ({"text": task_text(t), "id": t.id, "domain": t.domain, "regime": t.regime}
       for t in generate_tasks(num_docs, seed, hard_fraction=hard_fraction)), path)


def read_tasks(path: str | os.PathLike) -> list[Task]:
  """Tasks from a JSONL or ArrayRecord file: `write_tasks` output or minimal user records
  (`Task.from_record`; a user record without id gets '<file name>:<line or record>')."""
  import json  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  name = os.path.basename(path)
  if path.endswith(".array_record"):
    import grain  # pylint: disable=g-import-not-at-top
    reader = grain.sources.ArrayRecordDataSource([path])
    rows = [(f"{path} record {i + 1}", f"{name}:{i + 1}", reader[i])
            for i in range(len(reader))]
  else:
    with open(path, "rb") as f:
      rows = [(f"{path} line {i}", f"{name}:{i}", line)
              for i, line in enumerate(f, 1) if line.strip()]
  tasks = []
  for where, default_id, raw in rows:
    try:
      tasks.append(Task.from_record(json.loads(raw), default_id))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: {e}") from None
  return tasks
