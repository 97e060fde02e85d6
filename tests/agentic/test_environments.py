"""Tool-call parsers (both formats, malformed input), environment transitions, scripted agents."""

import copy

import pytest

from kat_jax.agentic.environments import (DigitsEnv, PythonToolEnv, RepoRepairEnv,
                                          make_environment, make_repo_task)
from kat_jax.agentic.tool_calls import ParsedAction, ToolCall, format_tool_call, parse_tool_calls
from kat_jax.data.chat_template import render_chat


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3_coder"])
def test_format_then_parse_round_trips(fmt):
  calls = (ToolCall("edit_file", {"path": "m.py", "old": "a < b", "new": "a <= b\n  x"}),
           ToolCall("run_tests", {}))
  text = "I will fix it.\n" + "\n".join(format_tool_call(c, fmt) for c in calls)
  parsed = parse_tool_calls(text, fmt)
  assert parsed == ParsedAction("I will fix it.", calls, ())


def test_qwen25_text_matches_the_chat_template():
  call = {"name": "read_file", "arguments": {"path": "m.py"}}
  rendered = render_chat([{"role": "user", "content": "x"},
                          {"role": "assistant", "content": None, "tool_calls": [call]}],
                         template="qwen2.5")
  assert format_tool_call(ToolCall(**call)) in rendered
  assert parse_tool_calls(rendered).tool_calls == (ToolCall(**call),)


def test_qwen3_coder_exact_layout():
  text = ("<tool_call>\n<function=read_file>\n<parameter=path>\nm.py\n</parameter>\n"
          "</function>\n</tool_call>")
  assert parse_tool_calls(text, "qwen3_coder").tool_calls == (
      ToolCall("read_file", {"path": "m.py"}),)


@pytest.mark.parametrize("text,fmt,error", [
    ('<tool_call>\n{"name": "x", "arguments": {1}\n</tool_call>', "qwen2.5", "not valid JSON"),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', "qwen2.5", 'string "name"'),
    ('<tool_call>\n{"name": "x", "arguments": [1]}\n</tool_call>', "qwen2.5", "JSON object"),
    ('<tool_call>\n{"name": "x", "arguments": {}}', "qwen2.5", "unclosed"),
    ("<tool_call>\n<function=x>\nstray\n</function>\n</tool_call>", "qwen3_coder", "outside"),
    ("<tool_call>\nread_file(m.py)\n</tool_call>", "qwen3_coder", "<function=NAME>"),
])
def test_malformed_calls_become_errors(text, fmt, error):
  parsed = parse_tool_calls(text, fmt)
  assert parsed.tool_calls == () and len(parsed.errors) == 1 and error in parsed.errors[0]
  with pytest.raises(ValueError, match="unknown tool-call format"):
    parse_tool_calls(text, "hermes")


def test_openai_style_string_arguments():
  parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>')
  assert parsed.tool_calls == (ToolCall("f", {"a": 1}),)


def test_repo_tasks_are_deterministic_and_fail_before_the_fix():
  assert make_repo_task(3) == make_repo_task(3)
  assert make_repo_task(3).files != make_repo_task(4).files
  env = RepoRepairEnv()
  env.reset(5)
  ok, report = env.run_tests()
  assert not ok and "FAIL" in report


def _act(*calls, content=""):
  return ParsedAction(content, tuple(calls))


def test_scripted_agent_repairs_the_repo_and_gets_reward_one():
  task = make_repo_task(11)
  env = make_environment("repo_repair")
  opening = env.reset(task)
  assert opening[0]["role"] == "user" and task.module in opening[0]["content"]
  path, old, new = task.fix
  step = env.step(_act(ToolCall("read_file", {"path": path})))
  assert not step.done and step.observation[0]["content"] == task.files[path]
  step = env.step(_act(ToolCall("edit_file", {"path": path, "old": old, "new": new})))
  assert step.observation[0]["content"] == f"edited {path}"
  step = env.step(_act(ToolCall("run_tests", {})))
  assert "0 failed" in step.observation[0]["content"]
  step = env.step(_act(content="Fixed the bug."))
  assert step.done and step.reward == 1.0
  with pytest.raises(ValueError, match="after the episode ended"):
    env.step(_act(content="again"))


def test_repo_env_errors_and_unfixed_reward_zero():
  env = RepoRepairEnv(max_turns=3)
  env.reset(make_repo_task(2))
  obs = env.step(ParsedAction("", (ToolCall("rm", {}),), ("tool call is not valid JSON",)))
  texts = [m["content"] for m in obs.observation]
  assert "unknown tool 'rm'" in texts[0] and "not valid JSON" in texts[1]
  obs = env.step(_act(ToolCall("edit_file", {"path": "nope.py", "old": "a", "new": "b"})))
  assert "no file" in obs.observation[0]["content"]
  forked = copy.deepcopy(env)  # tree rollouts copy environments at a branch
  obs = env.step(_act(ToolCall("read_file", {"path": "x", "extra": 1})))
  assert obs.done and obs.reward == 0.0 and "bad arguments" in obs.observation[0]["content"]
  assert forked.turns == 2 and not forked.done


def test_python_tool_env_runs_code_in_the_sandbox():
  env = PythonToolEnv()
  env.reset({"question": "What is 6*7?", "answer": "42"})
  step = env.step(_act(ToolCall("python", {"code": "print(6 * 7)"})))
  assert step.observation == [{"role": "tool", "content": "42\n"}] and not step.done
  step = env.step(_act(ToolCall("python", {"code": "raise SystemExit('boom')"})))
  assert "boom" in step.observation[0]["content"]
  assert env.step(_act(content="The answer is 42.")).reward == 1.0


def test_digits_env_scores_each_round():
  env = DigitsEnv(rounds=2, width=4)
  env.reset(0)
  first = env.step(_act(content="12ab"))
  assert not first.done and first.observation == [{"role": "user", "content": "Again."}]
  last = env.step(_act(content="1234"))
  assert last.done and last.reward == pytest.approx(0.75)
  with pytest.raises(ValueError, match="unknown environment"):
    make_environment("chess")


def test_repo_env_reward_cannot_be_forged_by_the_module_or_by_editing_the_tests():
  task = make_repo_task(11)
  path = f"{task.module}.py"
  module = task.files[path]
  for cheat in ("import os\nos._exit(0)\n",  # exit 0 when the tests import it
                "import builtins\nbuiltins.AssertionError = type('Q', (BaseException,), {})\n"):
    env = RepoRepairEnv()
    env.reset(task)
    first_line = module.splitlines()[0]
    env.step(_act(ToolCall("edit_file", {"path": path, "old": first_line,
                                         "new": cheat + first_line})))
    assert env.step(_act(content="done")).reward == 0.0, cheat
  env = RepoRepairEnv()
  env.reset(task)
  tests_path = f"{task.tests_module}.py"
  step = env.step(_act(ToolCall("edit_file", {"path": tests_path, "old": "assert",
                                              "new": "assert True or"})))
  assert "is the task's tests" in step.observation[0]["content"]
  assert env.files[tests_path] == task.files[tests_path]
  assert env.step(_act(content="done")).reward == 0.0
