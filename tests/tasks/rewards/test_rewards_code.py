"""Code reward: extraction, pass/fail/syntax error/timeout outcomes, the tests-candidate channel,
the self-check and error bound, interpreters under /tmp and home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from kat_jax.tasks.rewards import code as code_lib
from kat_jax.tasks.rewards.sandbox import SandboxLimits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
FAST = SandboxLimits(timeout_s=2.0)


def _autothink(answer: str) -> str:
  return f"<judge>\ncode\n</judge>\n\n<think_off>\n<answer>\n{answer}\n</answer>"


def test_extract_last_python_fence_inside_answer():
  response = _autothink("First try:\n```python\ndef add(a, b): return 0\n```\n"
                        "Better:\n```python\ndef add(a, b):\n  return a + b\n```\nDone.")
  assert code_lib.extract_code(response) == "def add(a, b):\n  return a + b\n"


def test_extract_prefers_python_fence_and_handles_bare_code():
  assert code_lib.extract_code("```python\nx = 1\n```\n```text\noutput\n```") == "x = 1\n"
  assert code_lib.extract_code(_autothink("def f(a, b): return a + b")) == (
      "def f(a, b): return a + b")
  assert code_lib.extract_code(_autothink("   ")) is None


def test_pass():
  response = _autothink("```python\ndef add(a, b):\n  return a + b\n```")
  assert code_lib.code_reward(response, TESTS, limits=FAST) == 1.0


def test_failing_test_gives_zero():
  response = _autothink("```python\ndef add(a, b):\n  return a - b\n```")
  result = code_lib.run_code_tests(code_lib.extract_code(response), TESTS, limits=FAST)
  assert result.status == "fail" and "AssertionError" in result.stderr
  assert code_lib.code_reward(response, TESTS, limits=FAST) == 0.0


def test_syntax_error_fails():
  result = code_lib.run_code_tests("def add(a, b) return a + b", TESTS, limits=FAST)
  assert result.status == "fail" and "SyntaxError" in result.stderr


def test_timeout():
  code = "def add(a, b):\n  while True:\n    pass\n"
  result = code_lib.run_code_tests(code, TESTS, limits=SandboxLimits(timeout_s=1.0))
  assert result.status == "timeout"
  assert code_lib.code_reward(code, TESTS, limits=SandboxLimits(timeout_s=1.0)) == 0.0


def test_code_result_reports_crashes_and_missing_code():
  segfault = _autothink("import ctypes\nctypes.string_at(0)")
  crash = code_lib.code_result(segfault, TESTS, limits=FAST)
  assert crash.status == "fail" and crash.signal == 11
  missing = code_lib.code_result(_autothink("  "), TESTS, limits=FAST)
  assert missing.status == "fail" and missing.detail == "no code in the response"


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
                                       "raise SystemExit"])
def test_exiting_before_the_tests_is_not_a_pass(exit_call):
  # The candidate's process ends before it answers the tests' calls: the tests' process
  # fails (only it can print the pass token), and the detail says the candidate ended.
  result = code_lib.run_code_tests(exit_call + "\n", TESTS, limits=FAST)
  assert result.status == "fail", result
  assert code_lib.code_reward(exit_call, TESTS, limits=FAST) == 0.0


def test_printing_and_demo_blocks_do_not_interfere():
  code = ("def add(a, b):\n  return a + b\nprint('x' * 100_000)\n"
          "if __name__ == '__main__':\n  input()\n")
  result = code_lib.run_code_tests(code, TESTS, limits=FAST)
  assert result.status == "pass" and result.stdout_truncated
  assert "KAT_TESTS_DONE" not in result.stdout


def test_human_eval_style_entry_point():
  tests = "def check(candidate):\n  assert candidate(2, 3) == 5\n"
  assert code_lib.code_reward("def add(a, b): return a + b", tests, entry_point="add",
                              limits=FAST) == 1.0
  assert code_lib.code_reward("def add(a, b): return a * b", tests, entry_point="add",
                              limits=FAST) == 0.0
  with pytest.raises(ValueError, match="identifier"):
    code_lib.run_code_tests("x", tests, entry_point="add; import os")


def test_stdin_stdout_cases():
  code = "a, b = map(int, input().split())\nprint(a + b)\n"
  tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]
  assert code_lib.code_reward(code, tests, limits=FAST) == 1.0
  assert code_lib.code_reward(code, [{"input": "1 2", "output": "4"}], limits=FAST) == 0.0
  with pytest.raises(ValueError, match="'input' and 'output'"):
    code_lib.run_code_tests(code, [{"stdin": "1 2"}])


def test_class_based_tests_use_candidate_objects_through_handles():
  code = ("class Stack:\n  def __init__(self):\n    self.items = []\n"
          "  def push(self, x):\n    self.items.append(x)\n"
          "  def pop(self):\n    return self.items.pop()\n"
          "  def __len__(self):\n    return len(self.items)\n")
  tests = ("s = Stack()\ns.push(3)\ns.push((1, 'a'))\nassert len(s) == 2\n"
           "assert s.pop() == (1, 'a')\nassert s.items == [3]\nassert s.pop() == 3\n")
  result = code_lib.run_code_tests(code, tests, limits=FAST)
  assert result.status == "pass", result


def test_linked_list_tests_walk_candidate_nodes_through_handles():
  code = ("class Node:\n  def __init__(self, val, next=None):\n"
          "    self.val, self.next = val, next\n"
          "def reverse(head):\n  prev = None\n  while head:\n"
          "    head.next, prev, head = prev, head, head.next\n  return prev\n")
  tests = ("def to_list(node):\n  out = []\n  while node:\n    out.append(node.val)\n"
           "    node = node.next\n  return out\n"
           "assert to_list(reverse(Node(1, Node(2, Node(3))))) == [3, 2, 1]\n"
           "assert reverse(None) is None\n")
  assert code_lib.run_code_tests(code, tests, limits=FAST).status == "pass"


def test_tests_can_import_the_candidate_as_a_module():
  tests = "import mymod\nfrom mymod import twice\nassert mymod.twice(2) == twice(2) == 4\n"
  result = code_lib.run_code_tests("def twice(x):\n  return 2 * x\n", tests, limits=FAST,
                                   module_name="mymod")
  assert result.status == "pass", result
  with pytest.raises(ValueError, match="module_name"):
    code_lib.run_code_tests("x = 1", tests, module_name="my-mod")


def test_values_cross_the_channel_as_plain_types():
  code = ("import collections, math\n"
          "P = collections.namedtuple('P', 'x y')\n"
          "def f():\n"
          "  return [(1, 2), {3, 4}, frozenset([5]), {(1, 2): b'ab'}, math.inf, 10 ** 40, 1j,\n"
          "          P(1, 2), collections.Counter('aab'), True, None, bytearray(b'x')]\n"
          "def g():\n  return (i * i for i in range(3))\n")
  tests = ("v = f()\n"
           "assert v == [(1, 2), {3, 4}, frozenset([5]), {(1, 2): b'ab'}, float('inf'), 10 ** 40,"
           " 1j, (1, 2), {'a': 2, 'b': 1}, True, None, bytearray(b'x')]\n"
           "assert [type(x).__name__ for x in v[:8]] == ['tuple', 'set', 'frozenset', 'dict',"
           " 'float', 'int', 'complex', 'tuple']\n"
           "assert list(g()) == [0, 1, 4]\n")
  result = code_lib.run_code_tests(code, tests, limits=FAST)
  assert result.status == "pass", result


def test_candidate_exceptions_keep_their_builtin_type():
  code = "def root(x):\n  if x < 0:\n    raise ValueError('negative')\n  return x ** 0.5\n"
  tests = ("try:\n  root(-1)\nexcept ValueError as e:\n  assert 'negative' in str(e)\n"
           "else:\n  raise AssertionError('no error')\nassert root(4) == 2.0\n")
  assert code_lib.run_code_tests(code, tests, limits=FAST).status == "pass"


def test_prelude_helpers_are_the_tasks_not_the_candidates():
  prelude = "def encode(s):\n  return s[::-1]\n"
  tests = "assert decode(encode('abc')) == 'abc'\n"
  cheat = "def encode(s):\n  return s\ndef decode(s):\n  return s\n"
  honest = prelude + "def decode(s):\n  return s[::-1]\n"
  assert code_lib.run_code_tests(cheat, tests, limits=FAST).status == "pass"  # no prelude
  assert code_lib.run_code_tests(cheat, tests, limits=FAST, prelude=prelude).status == "fail"
  assert code_lib.run_code_tests(honest, tests, limits=FAST, prelude=prelude).status == "pass"


def test_channel_decode_accepts_only_plain_values():
  from kat_jax.tasks.rewards import channel  # pylint: disable=g-import-not-at-top
  no_handles = lambda ref: pytest.fail("no handle expected")
  assert channel.decode({"$t": [1, {"$s": ["a"]}]}, no_handles) == (1, {"a"})
  for bad in ({"$eval": "1"}, {"$t": 1}, {"a": 1, "b": 2}, {"$f": "1e999999"},
              {"$d": [[[1], 2]]}, {"$i": "zz"}):
    with pytest.raises(channel.ChannelError):
      channel.decode(bad, no_handles)
  deep: object = 1
  for _ in range(channel.MAX_DEPTH + 5):
    deep = [deep]
  with pytest.raises(channel.ChannelError, match="nested"):
    channel.decode(deep, no_handles)
  with pytest.raises(TypeError, match="plain values"):
    channel.encode(object())  # the tests' side sends nothing but plain values


def _broken_sandbox(*args, **kwargs):
  from kat_jax.tasks.rewards.sandbox import SandboxResult  # pylint: disable=g-import-not-at-top
  for fd in kwargs.get("channel_fds") or ():
    os.close(fd)
  return SandboxResult(status="error", detail="launcher ended without reporting")


def test_a_sandbox_that_fails_its_self_check_stops_the_caller(monkeypatch):
  from kat_jax.tasks.rewards import pool as pool_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(code_lib, "_HEALTH", code_lib._new_health())  # pylint: disable=protected-access
  monkeypatch.setattr(code_lib, "run_python", _broken_sandbox)
  with pytest.raises(code_lib.RewardInfrastructureError, match="known-good unit test"):
    code_lib.code_reward("def add(a, b): return a + b", TESTS, limits=FAST)
  item = {"response": "def add(a, b): return a + b", "verifier": {"type": "code",
                                                                    "tests": TESTS}}
  with pool_lib.RewardPool(max_workers=2) as pool:
    future = pool.score_async([item, {"response": "B", "verifier": {"type": "choice",
                                                                     "answer": "B"}}])
    with pytest.raises(code_lib.RewardInfrastructureError, match="launcher ended"):
      future.result(timeout=60)


def test_sandbox_errors_in_a_row_stop_the_caller_after_the_bound(monkeypatch):
  health = code_lib._new_health()  # pylint: disable=protected-access
  monkeypatch.setattr(code_lib, "_HEALTH", health)
  monkeypatch.setattr(code_lib, "_self_check", lambda: None)  # healthy at start-up
  monkeypatch.setattr(code_lib, "run_python", _broken_sandbox)
  for _ in range(code_lib.MAX_ERRORS_IN_A_ROW - 1):
    assert code_lib.run_code_tests("x = 1", TESTS, limits=FAST).status == "error"
  with pytest.raises(code_lib.RewardInfrastructureError,
                     match=f"{code_lib.MAX_ERRORS_IN_A_ROW} times in a row"):
    code_lib.run_code_tests("x = 1", TESTS, limits=FAST)
  with pytest.raises(code_lib.RewardInfrastructureError):  # and it stays stopped
    code_lib.run_code_tests([{"input": "", "output": ""}], TESTS, limits=FAST)


@pytest.mark.parametrize("where", ["tmp", "home"])
def test_code_reward_works_with_a_venv_under_tmp_or_home(where):
  # The common layout (venv in the home dir, or under /tmp) used to fail every program.
  parent = tempfile.gettempdir() if where == "tmp" else os.path.expanduser("~")
  venv = tempfile.mkdtemp(prefix=".kat_venv_test_", dir=parent)
  os.chmod(venv, 0o755)  # as `python -m venv` leaves it (mkdtemp makes it 0700)
  try:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    venv], check=True)
    script = ("from kat_jax.tasks.rewards import code_reward\n"
              "print(code_reward('def add(a, b): return a + b', 'assert add(2, 3) == 5'),\n"
              "      code_reward('def add(a, b): return a - b', 'assert add(2, 3) == 5'))\n")
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", script],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert out.stdout.split() == ["1.0", "0.0"], out.stderr
  finally:
    shutil.rmtree(venv, ignore_errors=True)


def test_a_venv_the_sandbox_uid_cannot_read_fails_with_one_error_naming_it():
  if os.getuid() != 0:
    pytest.skip("only root switches programs to a one-off uid")
  venv = tempfile.mkdtemp(prefix=".kat_venv_private_")  # mode 0700, as mkdtemp makes it
  try:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    venv], check=True)
    script = ("from kat_jax.tasks.rewards import code_reward\n"
              "code_reward('def add(a, b): return a + b', 'assert add(2, 3) == 5')\n")
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", script],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("kat_jax.errors.RewardInfrastructureError: "), out.stderr
    assert "Permission denied" in last and f"cannot read ['{venv}']" in last, last
  finally:
    shutil.rmtree(venv, ignore_errors=True)


def test_code_that_does_not_compile_fails_without_a_sandbox(monkeypatch):
  code_lib.run_code_tests("x = 1", TESTS, limits=FAST)  # start-up self-check done
  monkeypatch.setattr(code_lib, "run_python", lambda *a, **k: pytest.fail("sandbox started"))
  for code in ("def add(a, b) return a + b", "x = '\0'", "(" * 300 + ")" * 300):
    for tests in (TESTS, [{"input": "", "output": ""}]):
      result = code_lib.run_code_tests(code, tests, limits=FAST)
      assert result.status == "fail" and "does not compile" in result.detail, result
      assert "SyntaxError" in result.stderr


def test_candidate_annotations_are_evaluated_as_in_plain_python():
  # the harness's own `from __future__ import annotations` must not leak into the candidate
  code = "def add(a: Undefined, b) -> int:\n  return a + b\n"
  result = code_lib.run_code_tests(code, TESTS, limits=FAST)
  assert result.status == "fail" and "NameError" in result.stderr, result
