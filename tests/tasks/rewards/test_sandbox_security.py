"""The sandbox contains hostile programs, reports the right status, and leaves nothing behind.

Each attack runs with a short wall-clock limit; after each run no process of the run's
one-off uid or process group may be left, and the test process itself keeps going.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest

from kat_jax.tasks.rewards import sandbox as sb

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
FAST = sb.SandboxLimits(timeout_s=2.0)


def _assert_cleaned_up(result: sb.SandboxResult) -> None:
  assert result.pgid is not None
  assert sb.pids_in_group(result.pgid) == []
  if result.uid is not None:
    assert sb.pids_of_uid(result.uid) == []


def _run(program: str, limits: sb.SandboxLimits = FAST) -> sb.SandboxResult:
  result = sb.run_python(program, limits=limits)
  _assert_cleaned_up(result)
  return result


def _needs(result: sb.SandboxResult, *keys: str) -> None:
  missing = [k for k in keys if not result.isolation.get(k)]
  if missing:
    pytest.skip(f"this host does not allow sandbox isolation {missing}")


def test_isolation_available_as_root():
  result = _run("print('ok')")
  assert result.status == "pass" and result.stdout == "ok\n"
  if os.getuid() == 0:  # this machine: everything the sandbox tries is permitted
    for key in ("net", "mount", "pid", "uid_drop", "readonly_fs", "minimal_root",
                "pivot_root"):
      assert result.isolation[key], (key, result.isolation)
    assert result.uid not in (0, None)


def test_infinite_loop_times_out():
  result = _run("while True:\n  pass\n", sb.SandboxLimits(timeout_s=1.0))
  assert result.status == "timeout"
  assert 1.0 <= result.wall_s < 3.0


def test_cpu_limit_is_a_backstop():
  # A generous wall clock: on a loaded machine 1 s of CPU can take several seconds of wall
  # time, and the point is that RLIMIT_CPU ends the run before the wall clock does.
  result = _run("while True:\n  pass\n", sb.SandboxLimits(timeout_s=30.0, cpu_s=1))
  assert result.status == "timeout"
  assert result.detail == "CPU time limit"
  assert result.wall_s < 29.0


def test_fork_bomb_is_contained_and_fully_killed():
  program = (
      "import os\n"
      "while True:\n"
      "  try:\n"
      "    os.fork()\n"
      "  except OSError:\n"
      "    pass\n")
  result = _run(program, sb.SandboxLimits(timeout_s=1.5, nproc=16))
  assert result.status == "timeout"


def test_escaped_daemon_is_killed():
  # Double fork + setsid leaves the process group; the pid namespace (or uid sweep) gets it.
  program = (
      "import os, time\n"
      "if os.fork() == 0:\n"
      "  os.setsid()\n"
      "  if os.fork() == 0:\n"
      "    time.sleep(60)\n"
      "  os._exit(0)\n"
      "print('parent done')\n")
  result = _run(program)
  assert result.status == "pass"
  assert "parent done" in result.stdout


def test_memory_bomb_fails_with_memory_error():
  result = _run("x = bytearray(4 << 30)\n", sb.SandboxLimits(timeout_s=3.0,
                                                              memory_bytes=512 << 20))
  assert result.status == "fail"
  assert "MemoryError" in result.stderr


def test_growing_memory_fails():
  program = "chunks = []\nwhile True:\n  chunks.append(b'x' * (8 << 20))\n"
  result = _run(program, sb.SandboxLimits(timeout_s=3.0, memory_bytes=256 << 20))
  assert result.status == "fail"
  assert "MemoryError" in result.stderr


def test_writes_outside_the_sandbox_do_not_land():
  tag = uuid.uuid4().hex
  tmp_target = f"/tmp/kat_sandbox_escape_{tag}"
  repo_target = os.path.join(REPO, f"kat_sandbox_escape_{tag}")
  program = (
      f"for path in [{tmp_target!r}, {repo_target!r}]:\n"
      "  try:\n"
      "    open(path, 'w').write('escaped')\n"
      "    print('WROTE', path)\n"
      "  except OSError as e:\n"
      "    print('DENIED', path, type(e).__name__)\n")
  try:
    result = _run(program)
    _needs(result, "mount")
    assert result.status == "pass"
    assert not os.path.exists(tmp_target)  # landed in the run's private /tmp, now gone
    assert not os.path.exists(repo_target)
    assert f"DENIED {repo_target}" in result.stdout
  finally:
    for path in (tmp_target, repo_target):
      if os.path.exists(path):
        os.remove(path)


def test_cannot_delete_or_modify_a_file_in_a_visible_host_dir(monkeypatch):
  # A host directory made visible the way the interpreter's prefix is (a read-only bind).
  guard_dir = tempfile.mkdtemp(prefix=".kat_sentinel_", dir=os.path.dirname(__file__))
  monkeypatch.setattr(sb, "SYSTEM_PATHS", sb.SYSTEM_PATHS + (guard_dir,))
  try:
    os.chmod(guard_dir, 0o777)  # even a world-writable host dir stays read-only inside
    sentinel = os.path.join(guard_dir, "sentinel.txt")
    with open(sentinel, "w") as f:
      f.write("keep me")
    os.chmod(sentinel, 0o666)
    program = (
        "import os, shutil\n"
        f"p = {sentinel!r}\n"
        "print('VISIBLE', os.path.exists(p))\n"
        "for attack in (lambda: os.remove(p), lambda: open(p, 'w').write('x'),\n"
        "               lambda: os.chmod(p, 0o777), lambda: shutil.rmtree(os.path.dirname(p)),\n"
        "               lambda: os.rename(p, p + '.moved'),\n"
        "               lambda: open(p + '.new', 'w').write('x')):\n"
        "  try:\n"
        "    attack()\n"
        "    print('SUCCEEDED')\n"
        "  except OSError as e:\n"
        "    print('DENIED', type(e).__name__)\n")
    result = _run(program)
    _needs(result, "mount")
    assert result.status == "pass"
    assert "VISIBLE True" in result.stdout  # the attack really targeted the file
    assert "SUCCEEDED" not in result.stdout
    with open(sentinel) as f:
      assert f.read() == "keep me"
    assert sorted(os.listdir(guard_dir)) == ["sentinel.txt"]
    assert oct(os.stat(sentinel).st_mode & 0o777) == oct(0o666)
  finally:
    shutil.rmtree(guard_dir, ignore_errors=True)


def test_host_dirs_outside_the_bind_set_do_not_exist_inside():
  canary = tempfile.mkdtemp(prefix=".kat_canary_", dir=os.path.dirname(__file__))
  home = os.path.expanduser("~")
  try:
    with open(os.path.join(canary, "secret.txt"), "w") as f:
      f.write("secret")
    program = ("import os\n"
               f"for p in [{canary!r}, {REPO!r}, '/home', '/run', '/var', '/work', '/srv',\n"
               "          '/etc/hostname', '/etc/passwd', '/etc/shadow']:\n"
               "  print(p, os.path.exists(p))\n"
               f"print(sorted(os.listdir({home!r})) if os.path.isdir({home!r}) else [])\n")
    result = _run(program)
    _needs(result, "mount")
    assert result.status == "pass", result
    *lines, home_listing = result.stdout.splitlines()
    for line in lines:
      assert line.endswith(" False"), result.stdout
    # the home dir exists inside only on the way to a bound path (pyenv, a venv), and then
    # holds nothing else
    on_the_way = {p[len(home) + 1:].split("/")[0] for p in sb.visible_paths()
                  if p.startswith(home + "/")}
    assert set(ast.literal_eval(home_listing)) <= on_the_way, (home_listing, on_the_way)
  finally:
    shutil.rmtree(canary, ignore_errors=True)


def test_environment_secrets_are_not_visible(monkeypatch):
  monkeypatch.setenv("KAT_SECRET", "xyz-secret-value")
  program = (
      "import os\n"
      "print(sorted(os.environ))\n"
      "print('ENV', os.environ.get('KAT_SECRET'))\n"
      f"for pid in ('1', {str(os.getpid())!r}, {str(os.getppid())!r}):\n"
      "  try:\n"
      "    print(open(f'/proc/{pid}/environ', 'rb').read())\n"
      "  except OSError as e:\n"
      "    print('DENIED', type(e).__name__)\n"
      "try:\n"
      "  print(os.listdir('/root'))\n"
      "except OSError as e:\n"
      "  print('ROOT DENIED')\n")
  result = _run(program)
  assert result.status == "pass"
  assert "xyz-secret-value" not in result.stdout + result.stderr
  assert "ENV None" in result.stdout
  assert "['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'TMPDIR']" in result.stdout


def test_network_is_unreachable():
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(("127.0.0.1", 0))
  listener.listen(4)
  listener.setblocking(False)
  port = listener.getsockname()[1]
  program = (
      "import socket\n"
      "try:\n"
      f"  socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
      "  print('CONNECTED')\n"
      "except OSError as e:\n"
      "  print('BLOCKED', type(e).__name__, e)\n")
  try:
    result = _run(program)
    _needs(result, "net")
    assert result.status == "pass"
    assert "BLOCKED" in result.stdout  # "Network is unreachable": only a down loopback
    with pytest.raises(BlockingIOError):
      listener.accept()  # nobody connected
  finally:
    listener.close()


def test_cannot_signal_the_trainer():
  program = (
      "import os, signal\n"
      f"for pid in ({os.getpid()}, -1):\n"
      "  try:\n"
      "    os.kill(pid, signal.SIGKILL)\n"
      "    print('SENT', pid)\n"
      "  except OSError as e:\n"
      "    print('DENIED', pid, type(e).__name__)\n")
  result = _run(program)
  _needs(result, "pid")
  # kill(-1) inside a fresh pid namespace only reaches the program itself -> killed.
  assert result.status in ("pass", "fail")
  assert "SENT %d" % os.getpid() not in result.stdout


def test_output_flood_is_capped():
  limits = sb.SandboxLimits(timeout_s=1.5, max_output_bytes=4096)
  result = _run("while True:\n  print('x' * 1000)\n", limits)
  assert result.status == "timeout"
  assert result.stdout_truncated
  assert len(result.stdout) == 4096


def test_file_size_limit():
  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as OSError(EFBIG) on the write that
  # crosses it; smaller files are fine. Checked both caught and uncaught.
  limits = sb.SandboxLimits(timeout_s=3.0, file_size_bytes=1 << 20)
  program = ("import errno\n"
             "with open('small.bin', 'wb') as f:\n  f.write(b'x' * (512 << 10))\n"
             "try:\n"
             "  with open('big.bin', 'wb') as f:\n    f.write(b'x' * (2 << 20))\n"
             "except OSError as e:\n  print(errno.errorcode[e.errno])\n")
  result = _run(program, limits)
  assert result.status == "pass" and result.stdout.strip() == "EFBIG", result
  result = _run("open('big.bin', 'wb').write(b'x' * (2 << 20))\n", limits)
  assert result.status == "fail" and "File too large" in result.stderr, result


def test_bad_arguments_become_error_results():
  result = sb.run_python("print(1)", limits=sb.SandboxLimits(timeout_s=-1))
  assert result.status == "error" and "timeout_s" in result.detail
  result = sb.run_python("print(1)", files={"../evil.py": "x"})
  assert result.status == "error" and "bad sandbox file name" in result.detail


def test_normal_run_still_passes_after_attacks():
  result = _run("import sys\nprint(sum(range(10)))\nsys.exit(0)\n")
  assert result.status == "pass"
  assert result.stdout.strip() == "45"
  assert result.exit_code == 0


def test_unprivileged_trainer_gets_the_user_namespace_path():
  # Without root the launcher enters a user namespace (no uid of its own, but the same new
  # root, pid and network namespaces). Run as `nobody` with a system interpreter.
  python = "/usr/bin/python3"
  if os.getuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
    pytest.skip("needs root, setpriv and /usr/bin/python3 to act as an unprivileged trainer")
  as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c"]
  script = (
      "import importlib.util, json, sys\n"
      f"spec = importlib.util.spec_from_file_location('sandbox', {sb.__file__!r})\n"
      "sb = importlib.util.module_from_spec(spec)\n"
      "sys.modules['sandbox'] = sb\n"
      "spec.loader.exec_module(sb)\n"
      "r = sb.run_python(\"import os\\nprint(sorted(os.listdir('/')))\\n"
      f"print(os.path.exists({REPO!r}))\", site_packages=False)\n"
      "print(json.dumps({'status': r.status, 'detail': r.detail, 'stdout': r.stdout,\n"
      "                  'isolation': dict(r.isolation), 'contained': r.contained}))\n")
  probe = subprocess.run(as_nobody + [f"open({sb.__file__!r}).read()"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip("this checkout is not readable by an unprivileged user")
  out = subprocess.run(as_nobody + [script], capture_output=True, text=True, timeout=120,
                       cwd="/")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.splitlines()[-1])
  if not result["isolation"].get("userns"):
    pytest.skip(f"this kernel refuses unprivileged user namespaces: {result}")
  assert result["status"] == "pass", result
  assert result["isolation"]["uid_drop"] is False and result["contained"], result
  assert result["isolation"]["minimal_root"] and result["isolation"]["pid"], result
  assert result["stdout"].splitlines()[1] == "False", result  # the checkout is not visible
