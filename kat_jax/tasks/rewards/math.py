"""Math reward: extract the final answer, normalise it, decide equivalence with SymPy.

KAT-V1 §4.2.2 (seed 001): math answers are scored by symbolic equivalence (algebraic
simplification and numeric approximation), 1 if correct else 0. The forms handled follow the
kinds of cases HF Math-Verify checks (spec §6.1): \\boxed{} (last wins), \\frac/\\dfrac/\\frac13,
\\sqrt3, \\left/\\right, \\text{units}, degrees, percentages, thousands separators, `k = 1/3`,
intervals and tuples, comma-separated answer lists. The code is our own.

Equivalence order (cheap first): normalised string equality, then structure (interval / tuple /
set / list / equation), then SymPy: exact difference simplifies to 0 or numbers agree to a
relative 1e-6.

SymPy can hang or blow up (`10^{10^{10}}`), so `math_equal` runs the SymPy step in a worker
process with a time limit (`MathChecker`); the worker is killed and replaced on timeout.
SymPy's `parse_expr` evaluates Python, so every expression is first reduced to a whitelist of
characters and names (digits, operators, single-letter symbols, a few functions).
"""

from __future__ import annotations

import atexit
import multiprocessing
import re
import threading
from collections.abc import Mapping
from typing import Any

from kat_jax.data.chat_template import parse_autothink_response

_REL_TOL = 1e-6


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(
    r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n|I hope)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` that closes the `{` at open_index (None if unbalanced)."""
  depth = 0
  for i in range(open_index, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return i
  return None


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (nested braces kept), or of `\\boxed 5`."""
  found = None
  for m in _BOXED.finditer(text):
    start = m.end()
    if start < len(text) and text[start] == "{":
      end = _matching_brace(text, start)
      if end is not None:
        found = text[start + 1:end]
    else:
      word = re.match(r"[^\s$.,]+", text[start:])
      if word:
        found = word.group(0)
  return found


def answer_region(response: str) -> str:
  """The part of a response that holds the final answer: inside `<answer>` when present."""
  if "<answer>" in response:
    answer = parse_autothink_response(response)["answer"]
    if answer is not None:
      return answer
  return response


def extract_math_answer(response: str) -> str | None:
  """Final answer string of a response: last \\boxed{}, else "answer is X", else last number.

  Only the `<answer>` block is searched when the response has one.
  """
  if not isinstance(response, str):
    raise ValueError(f"response must be str, got {type(response).__name__}")
  text = answer_region(response)
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  matches = list(_ANSWER_IS.finditer(text))
  if matches:
    return matches[-1].group(1).strip().strip("$").strip()
  stripped = text.strip()
  if stripped and len(stripped) <= 40 and "\n" not in stripped:
    return stripped  # a bare short answer such as "x = 5" or "\frac{1}{2}"
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------
# Normalisation (string level)
# ---------------------------------------------------------------------------

_DELETE = (r"\displaystyle", r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "\\$",
           r"\(", r"\)", r"\[", r"\]", "$", r"\limits", r"\mathrm", r"\mathbf", r"\bigl",
           r"\bigr", r"\Bigl", r"\Bigr", r"\big", r"\Big")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{")
_PERCENT = re.compile(r"(\\%|%|\s*percent\b|\s*pct\b)")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])")


def _unwrap_text_commands(s: str) -> tuple[str, list[str]]:
  """Replace \\text{..} etc. by a placeholder-free form; returns (rest, list of texts)."""
  texts = []
  while True:
    m = _TEXT_CMD.search(s)
    if not m:
      return s, texts
    end = _matching_brace(s, m.end() - 1)
    if end is None:
      return s[:m.start()] + s[m.end():], texts
    texts.append(s[m.end():end])
    s = s[:m.start()] + "\x00" + s[end + 1:]


def normalize_answer(answer: str) -> tuple[str, bool]:
  """(normalised string, had_percent). Units in \\text{} after a value are dropped."""
  s = answer.strip()
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
  s = s.replace("{,}", ",").replace("\\{", "\x01").replace("\\}", "\x02")
  s, texts = _unwrap_text_commands(s)
  outside = s.replace("\x00", "").strip()
  if outside and re.search(r"[\w\\]", outside):
    s = s.replace("\x00", "")  # value + \text{units}: drop the units
    s = re.sub(r"\^\s*\{?\d\}?\s*$", "", s) if texts else s  # "cm}^2" leaves a bare ^2
  else:
    s = " ".join(t.strip() for t in texts) if texts else outside
  for token in _DELETE:
    s = s.replace(token, "")
  s = _DEGREE.sub("", s)
  had_percent = bool(_PERCENT.search(s))
  s = _PERCENT.sub("", s)
  s = s.replace("\x01", "\\{").replace("\x02", "\\}")
  s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
  s = " ".join(s.split()).strip().rstrip(".").strip()
  return s, had_percent


# ---------------------------------------------------------------------------
# LaTeX-lite -> SymPy source (whitelisted)
# ---------------------------------------------------------------------------

_FUNCS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "log",
          "ln", "exp", "pi", "oo", "abs", "factorial"}
_LATEX_WORDS = {r"\pi": " pi ", r"\infty": " oo ", r"\cdot": "*", r"\times": "*",
                r"\div": "/", r"\ln": " log ", r"\log": " log ", r"\exp": " exp ",
                r"\sin": " sin ", r"\cos": " cos ", r"\tan": " tan ", r"\cot": " cot ",
                r"\sec": " sec ", r"\csc": " csc ", r"\arcsin": " asin ",
                r"\arccos": " acos ", r"\arctan": " atan ", "−": "-", "π": " pi ",
                "∞": " oo ", "×": "*", "·": "*", "√": r"\sqrt"}
_SAFE_CHARS = re.compile(r"^[0-9a-zA-Z+\-*/^().,!\s]*$")


def _braced_arg(s: str, i: int) -> tuple[str, int]:
  """Argument of a LaTeX command at index i: `{...}` or a single character (`\\frac13`)."""
  while i < len(s) and s[i] == " ":
    i += 1
  if i >= len(s):
    raise ValueError("missing argument")
  if s[i] == "{":
    end = _matching_brace(s, i)
    if end is None:
      raise ValueError("unbalanced braces")
    return s[i + 1:end], end + 1
  return s[i], i + 1


def _convert_commands(s: str) -> str:
  r"""\frac{a}{b} -> ((a)/(b)), \sqrt[n]{a} -> ((a)**(1/(n))), \sqrt{a} -> sqrt(a)."""
  out, i = [], 0
  while i < len(s):
    if s.startswith("\\frac", i):
      num, i = _braced_arg(s, i + 5)
      den, i = _braced_arg(s, i)
      out.append(f"(({_convert_commands(num)})/({_convert_commands(den)}))")
    elif s.startswith("\\sqrt", i):
      i += 5
      if i < len(s) and s[i] == "[":
        close = s.index("]", i)
        root = s[i + 1:close]
        arg, i = _braced_arg(s, close + 1)
        out.append(f"(({_convert_commands(arg)})**(1/({_convert_commands(root)})))")
      else:
        arg, i = _braced_arg(s, i)
        out.append(f"sqrt({_convert_commands(arg)})")
    else:
      out.append(s[i])
      i += 1
  return "".join(out)


def to_sympy_source(s: str) -> str | None:
  """Whitelisted SymPy source for a normalised scalar expression, or None if not parseable."""
  for word, repl in sorted(_LATEX_WORDS.items(), key=lambda kv: -len(kv[0])):
    s = s.replace(word, repl)
  try:
    s = _convert_commands(s)
  except (ValueError, IndexError):
    return None
  s = s.replace("{", "(").replace("}", ")").replace("^", "**")
  if "\\" in s or not _SAFE_CHARS.match(s) or len(s) > 400 or "," in s:
    return None
  for name in re.findall(r"[A-Za-z]+", s):
    if len(name) > 1 and name not in _FUNCS:
      return None  # unknown words: not an expression (compare as text instead)
  return s


# ---------------------------------------------------------------------------
# Structure: intervals, tuples, sets, lists, equations
# ---------------------------------------------------------------------------


def _split_top_level(s: str, sep: str = ",") -> list[str]:
  parts, depth, cur = [], 0, []
  for ch in s:
    if ch in "([{\x01":
      depth += 1
    elif ch in ")]}\x02":
      depth -= 1
    if ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts]


def _enclosing_pair(s: str) -> tuple[str, str, str] | None:
  """(open, close, inner) when the whole of s is one bracketed group."""
  s = s.strip()
  if s.startswith("\\{") and s.endswith("\\}"):
    return "{", "}", s[2:-2]
  if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
    return None
  depth = 0
  for i, ch in enumerate(s):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if depth == 0 and i < len(s) - 1:
      return None  # e.g. "(1)+(2)"
  return s[0], s[-1], s[1:-1]


def _strip_variable_prefix(s: str) -> str:
  """"x = 3" -> "3", "x \\in [1, 2]" -> "[1, 2]" (a single variable on the left only)."""
  m = re.match(r"^\s*[A-Za-z](?:_\{?\w+\}?)?(?:\([a-z]\))?\s*(?:=|\\in)\s*(.+)$", s)
  return m.group(1) if m else s


def structured_equal(gold: str, pred: str, scalar_equal) -> bool | None:
  """Compare by structure; None when neither side has structure (caller compares scalars)."""
  g_union, p_union = gold.split("\\cup"), pred.split("\\cup")
  if len(g_union) > 1 or len(p_union) > 1:
    return len(g_union) == len(p_union) and all(
        structured_equal(a.strip(), b.strip(), scalar_equal) is True
        for a, b in zip(g_union, p_union))
  g_pair, p_pair = _enclosing_pair(gold), _enclosing_pair(pred)
  if g_pair and p_pair:
    g_items, p_items = _split_top_level(g_pair[2]), _split_top_level(p_pair[2])
    if len(g_items) == 1 and len(p_items) == 1 and g_pair[0] != "{" and p_pair[0] != "{":
      return None  # just parentheses around a scalar
    if len(g_items) != len(p_items):
      return False
    if g_pair[0] == "{" or p_pair[0] == "{":  # sets: unordered
      return g_pair[0] == p_pair[0] and _unordered_equal(g_items, p_items, scalar_equal)
    if (g_pair[0], g_pair[1]) != (p_pair[0], p_pair[1]):
      return False  # open vs closed interval ends, tuple vs interval
    return all(scalar_equal(a, b) for a, b in zip(g_items, p_items))
  if g_pair or p_pair:
    g_inner = g_pair[2] if g_pair and g_pair[0] == "(" else gold
    p_inner = p_pair[2] if p_pair and p_pair[0] == "(" else pred
    if "," in g_inner or "," in p_inner or (g_pair and g_pair[0] != "(") or (
        p_pair and p_pair[0] != "("):
      return False  # one side bracketed/structured, the other not
    return None
  g_items, p_items = _split_top_level(gold), _split_top_level(pred)
  if len(g_items) > 1 or len(p_items) > 1:  # answer lists such as "-2, 1": order-free
    return len(g_items) == len(p_items) and _unordered_equal(g_items, p_items, scalar_equal)
  return None


def _unordered_equal(golds: list[str], preds: list[str], scalar_equal) -> bool:
  remaining = list(preds)
  for g in golds:
    for j, p in enumerate(remaining):
      if scalar_equal(g, p):
        del remaining[j]
        break
    else:
      return False
  return not remaining


# ---------------------------------------------------------------------------
# SymPy comparison (runs inside the worker, or in-process without a time limit)
# ---------------------------------------------------------------------------


def _sympy_parse(source: str):
  import sympy  # pylint: disable=g-import-not-at-top  (heavy; only where used)
  from sympy.parsing import sympy_parser as sp  # pylint: disable=g-import-not-at-top
  names = {n: getattr(sympy, n) for n in ("sqrt", "sin", "cos", "tan", "cot", "sec", "csc",
                                           "asin", "acos", "atan", "log", "exp", "pi", "oo",
                                           "factorial", "Integer", "Float", "Rational",
                                           "Symbol")}
  names.update(ln=sympy.log, abs=sympy.Abs, __builtins__={})
  local = {c: sympy.Symbol(c) for c in "abcdfghjklmnopqrstuvwxyzABCDFGHJKLMNOPQRTUVWXYZ"}
  local.update(e=sympy.E, E=sympy.E, i=sympy.I, I=sympy.I, S=sympy.Symbol("S"))
  transforms = sp.standard_transformations + (sp.implicit_multiplication_application,
                                              sp.convert_xor)
  return sp.parse_expr(source, local_dict=local, global_dict=names,
                       transformations=transforms, evaluate=True)


def _numbers_close(a, b) -> bool:
  """Exact for rationals; relative 1e-6 when a side is a decimal; ~exact for surds, pi, ..."""
  import sympy  # pylint: disable=g-import-not-at-top
  if a.is_Rational and b.is_Rational:
    return a == b
  tol = _REL_TOL if (a.atoms(sympy.Float) or b.atoms(sympy.Float)) else 1e-12
  try:
    x, y = complex(a.evalf(30)), complex(b.evalf(30))
  except (TypeError, ValueError, AttributeError):
    return False
  return abs(x - y) <= tol * max(1.0, abs(x), abs(y))


def sympy_equal(gold_src: str, pred_src: str, percent: bool = False) -> bool:
  """SymPy equivalence of two whitelisted sources (see `to_sympy_source`)."""
  import sympy  # pylint: disable=g-import-not-at-top
  try:
    g, p = _sympy_parse(gold_src), _sympy_parse(pred_src)
  except Exception:  # pylint: disable=broad-except  (SymPy raises many kinds)
    return False
  candidates = [p] + ([p / 100, p * 100] if percent else [])
  for c in candidates:
    try:
      if g == c:
        return True
      if not g.free_symbols and not c.free_symbols:
        if _numbers_close(g, c):
          return True
        continue
      if sympy.simplify(g - c) == 0:
        return True
    except Exception:  # pylint: disable=broad-except
      continue
  return False


def _equation_sides(s: str) -> tuple[str, str] | None:
  parts = s.split("=")
  return (parts[0], parts[1]) if len(parts) == 2 and parts[0].strip() and parts[1].strip() \
      else None


def equivalent(gold: str, pred: str, *, sympy_fn=sympy_equal) -> bool:
  """Normalise both answers and decide equivalence (SymPy via `sympy_fn(g_src, p_src, pct)`)."""
  g, g_pct = normalize_answer(gold)
  p, p_pct = normalize_answer(pred)
  if not g or not p:
    return False
  if g == p:
    return True
  g_eq, p_eq = _equation_sides(g), _equation_sides(p)
  if g_eq and p_eq:  # two equations: same up to moving terms / sign
    g_src = [to_sympy_source(x) for x in g_eq]
    p_src = [to_sympy_source(x) for x in p_eq]
    if None in g_src or None in p_src:
      return False
    g_diff, p_diff = f"({g_src[0]})-({g_src[1]})", f"({p_src[0]})-({p_src[1]})"
    return sympy_fn(g_diff, p_diff) or sympy_fn(g_diff, f"-({p_diff})")
  g, p = _strip_variable_prefix(g), _strip_variable_prefix(p)
  if g == p:
    return True

  def scalar(a: str, b: str) -> bool:
    a, b = _strip_variable_prefix(a.strip()), _strip_variable_prefix(b.strip())
    if a == b:
      return True
    if a.lower() == b.lower() and not to_sympy_source(a):
      return True  # words such as "Evelyn" / "evelyn"
    a_src, b_src = to_sympy_source(a), to_sympy_source(b)
    if a_src is None or b_src is None:
      return _letter(a) is not None and _letter(a) == _letter(b)
    return sympy_fn(a_src, b_src, g_pct or p_pct)

  structured = structured_equal(g, p, scalar)
  return scalar(g, p) if structured is None else structured


def _letter(s: str) -> str | None:
  m = re.fullmatch(r"\(?([A-Ea-e])\)?", s.strip())
  return m.group(1).upper() if m else None


# ---------------------------------------------------------------------------
# Worker process with a time limit
# ---------------------------------------------------------------------------


def _worker_loop(conn, memory_bytes: int) -> None:
  import resource  # pylint: disable=g-import-not-at-top
  try:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  except (ValueError, OSError):
    pass
  try:  # import SymPy and its parser before saying "ready": start-up is not a job's time
    sympy_equal("1", "1")
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"worker start-up: {type(e).__name__}: {e}"))
    return
  conn.send(("ready", None))
  while True:
    try:
      job = conn.recv()
    except (EOFError, OSError):
      return
    try:
      conn.send(("ok", sympy_equal(*job)))
    except MemoryError:
      conn.send(("ok", False))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(("error", f"{type(e).__name__}: {e}"))


class MathChecker:
  """Answer equivalence with the SymPy step in a worker process bounded by `timeout_s`.

  Thread-safe; several threads share one worker (calls are serialised), so use one
  checker per scoring thread for parallelism (`pool.py` does). A timed-out or crashed worker
  is killed and replaced; that comparison counts as not equivalent.

  `timeout_s` bounds one comparison only: a new worker first reports "ready" (interpreter up,
  SymPy imported) within its own `startup_timeout_s`, so a slow start under CPU load does
  not turn correct answers into zeros. A worker that cannot start in time is killed; that
  comparison counts as not equivalent and `startup_failures` goes up.
  """

  def __init__(self, timeout_s: float = 5.0, memory_bytes: int = 2 << 30,
               startup_timeout_s: float = 120.0):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if startup_timeout_s <= 0:
      raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
    self.timeout_s = timeout_s
    self.startup_timeout_s = startup_timeout_s
    self.memory_bytes = memory_bytes
    self._lock = threading.Lock()
    self._proc = None
    self._conn = None
    self.timeouts = 0  # how many comparisons hit the time limit
    self.startup_failures = 0  # workers that did not report ready in startup_timeout_s
    atexit.register(self.close)

  def _start(self) -> bool:
    """Starts a worker and waits until it is ready; False (worker killed) if it is not."""
    # spawn, not fork: the trainer has threads, and a forked child can inherit a held lock.
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    self._proc = ctx.Process(target=_worker_loop, args=(child, self.memory_bytes), daemon=True)
    self._proc.start()
    child.close()
    self._conn = parent
    try:
      if parent.poll(self.startup_timeout_s) and parent.recv()[0] == "ready":
        return True
    except (EOFError, OSError):
      pass
    self.startup_failures += 1
    self.close()
    return False

  def close(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.join(timeout=1.0)
      self._conn.close()
    self._proc = self._conn = None

  def _sympy_with_timeout(self, gold_src: str, pred_src: str, percent: bool = False) -> bool:
    with self._lock:
      if self._proc is None or not self._proc.is_alive():
        self.close()
        if not self._start():
          return False
      try:
        self._conn.send((gold_src, pred_src, percent))
        if self._conn.poll(self.timeout_s):  # the worker is ready: only the job is timed
          kind, value = self._conn.recv()
          return kind == "ok" and bool(value)
      except (EOFError, OSError, BrokenPipeError):
        self.close()
        return False
      self.timeouts += 1
      self.close()  # stuck in SymPy: kill it; the next call starts a fresh worker
      return False

  def equal(self, gold: str, pred: str) -> bool:
    """Is `pred` equivalent to `gold`? Never raises for string inputs."""
    try:
      return equivalent(gold, pred, sympy_fn=self._sympy_with_timeout)
    except Exception:  # pylint: disable=broad-except
      return False


_DEFAULT_CHECKER: MathChecker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_checker() -> MathChecker:
  global _DEFAULT_CHECKER
  with _DEFAULT_LOCK:
    if _DEFAULT_CHECKER is None:
      _DEFAULT_CHECKER = MathChecker()
    return _DEFAULT_CHECKER


def math_equal(gold: str, pred: str, *, checker: MathChecker | None = None,
               in_process: bool = False) -> bool:
  """Answer equivalence. in_process=True skips the worker (no time limit: trusted inputs)."""
  for name, value in (("gold", gold), ("pred", pred)):
    if not isinstance(value, str):
      raise ValueError(f"{name} must be str, got {type(value).__name__}")
  if in_process:
    try:
      return equivalent(gold, pred)
    except Exception:  # pylint: disable=broad-except
      return False
  return (checker or default_checker()).equal(gold, pred)


def math_reward(response: str, gold: str, *, checker: MathChecker | None = None,
                in_process: bool = False) -> float:
  """1.0 if the response's final answer is equivalent to `gold`, else 0.0."""
  pred = extract_math_answer(response)
  if pred is None:
    return 0.0
  return 1.0 if math_equal(gold, pred, checker=checker, in_process=in_process) else 0.0


def gold_from_verifier(verifier: Mapping[str, Any]) -> str:
  """Reference answer of a math verifier spec: field 'answer' (ours) or 'value' (autothink)."""
  for key in ("answer", "value"):
    if key in verifier:
      return str(verifier[key])
  raise ValueError(f"math verifier needs 'answer' or 'value': {dict(verifier)!r}")
