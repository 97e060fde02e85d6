"""Adversarial suite for the code reward: every attack in reward_attacks.py scores 0 and leaves
the host as it was (no file written, no process left, no connection made, no signal received,
no secret printed), the test process (the trainer) lives on, and a correct program still
scores 1 afterwards. Attacks of one kind run in parallel."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import site
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reward_attacks as atk  # pylint: disable=g-import-not-at-top,wrong-import-position

from kat_jax.tasks.rewards import code as code_lib  # pylint: disable=wrong-import-position
from kat_jax.tasks.rewards import pool as pool_lib  # pylint: disable=wrong-import-position
from kat_jax.tasks.rewards import sandbox as sb  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
CAUGHT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Host:
  """What the attacks aim at: a canary dir with a secret, listening sockets, the test's pid."""

  def __init__(self):
    self.tag = uuid.uuid4().hex[:12]
    self.secret = "kat-host-secret-" + uuid.uuid4().hex
    self.canary = tempfile.mkdtemp(prefix=".kat_attack_canary_", dir=os.path.dirname(__file__))
    os.chmod(self.canary, 0o777)
    with open(os.path.join(self.canary, "secret.txt"), "w") as f:
      f.write(self.secret)
    os.chmod(os.path.join(self.canary, "secret.txt"), 0o644)
    self.unix = []
    for path in (os.path.join(self.canary, "attack.sock"), f"/tmp/kat_attack_{self.tag}.sock",
                 f"\0kat_attack_{self.tag}"):
      s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      s.bind(path)
      if not path.startswith("\0"):
        os.chmod(path, 0o777)  # connect() needs write permission; give it to everyone
      s.listen(8)
      s.setblocking(False)
      self.unix.append(s)
    self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.tcp.bind(("127.0.0.1", 0))
    self.tcp.listen(8)
    self.tcp.setblocking(False)
    self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    self.udp.bind(("127.0.0.1", 0))
    self.udp.setblocking(False)
    self.site = site.getsitepackages()[0]
    # A stand-in trainer process (the trainer's uid, its own process group) that attacks try
    # to SIGKILL / SIGSTOP: unlike the test process, it can be killed without ending the test.
    self.trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                    start_new_session=True)
    self.snapshot = self._canary_state()
    self.signals: list[int] = []

  def fill(self, code: str) -> str:
    for key, value in {"@CANARY@": self.canary, "@TAG@": self.tag, "@REPO@": REPO,
                       "@SITE@": self.site, "@TRAINER_PID@": str(os.getpid()),
                       "@STANDIN_PID@": str(self.trainer.pid),
                       "@TMPSOCK@": f"/tmp/kat_attack_{self.tag}.sock",
                       "@ABSTRACT@": f"kat_attack_{self.tag}",
                       "@TCP_PORT@": str(self.tcp.getsockname()[1]),
                       "@UDP_PORT@": str(self.udp.getsockname()[1]),
                       "@TESTS_FILE@": atk.__file__}.items():
      code = code.replace(key, value)
    return code

  def _canary_state(self) -> dict[str, tuple[int, float]]:
    return {n: (os.stat(os.path.join(self.canary, n)).st_size,
                os.stat(os.path.join(self.canary, n)).st_mtime)
            for n in sorted(os.listdir(self.canary))}

  def assert_untouched(self, name: str) -> None:
    assert self._canary_state() == self.snapshot, name
    for d in (self.canary, REPO, "/tmp", os.path.expanduser("~"), self.site, "/usr", "/etc",
              "/", "/var/tmp"):
      if os.path.isdir(d):
          assert not [n for n in os.listdir(d) if self.tag in n and n.startswith("kat_pwned")], (
            name, d)
    for s in self.unix + [self.tcp]:
      with pytest.raises(BlockingIOError):
        s.accept()  # nobody connected
    with pytest.raises(BlockingIOError):
      self.udp.recvfrom(100)
    assert self.signals == [], (name, self.signals)
    assert self.trainer.poll() is None, (name, "the stand-in trainer process was killed")
    with open(f"/proc/{self.trainer.pid}/stat", encoding="utf-8") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
    assert state not in ("T", "t"), (name, "the stand-in trainer process was stopped", state)

  def close(self) -> None:
    self.trainer.kill()
    self.trainer.wait()
    for s in self.unix + [self.tcp, self.udp]:
      s.close()
    os.remove(f"/tmp/kat_attack_{self.tag}.sock")
    for n in os.listdir(self.canary):
      os.remove(os.path.join(self.canary, n))
    os.rmdir(self.canary)


@pytest.fixture(scope="module")
def host():
  probe = sb.run_python("pass")
  missing = [k for k in ("net", "mount", "pid", "minimal_root") if not probe.isolation.get(k)]
  if missing:
    pytest.skip(f"this host does not allow sandbox isolation {missing}: {probe.detail}")
  h = Host()
  previous = {s: signal.signal(s, lambda sig, _: h.signals.append(sig)) for s in CAUGHT_SIGNALS}
  try:
    yield h
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    h.close()


def _tests_of(attack: atk.Attack):
  return {"unit": (atk.TESTS, None), "check": (atk.CHECK_TESTS, "secret"),
          "io": (atk.io_tests(), None)}[attack.tests]


def _score(host: Host, attack: atk.Attack) -> sb.SandboxResult:
  tests, entry_point = _tests_of(attack)
  limits = sb.SandboxLimits(timeout_s=attack.timeout_s, memory_bytes=512 << 20, nproc=24,
                            max_output_bytes=16 << 10)
  return code_lib.run_code_tests(host.fill(attack.code), tests, entry_point=entry_point,
                                 limits=limits)


def _runs(result: sb.SandboxResult) -> list[sb.SandboxResult]:
  return [result] + ([result.candidate] if result.candidate is not None else [])


def _assert_correct_programs_still_score_one() -> None:
  items = [{"response": f"```python\n{atk.CORRECT}```",
            "verifier": {"type": "code", "tests": atk.TESTS, "timeout_s": 60.0}},
           {"response": f"```python\n{atk.CORRECT}```",
            "verifier": {"type": "code", "tests": atk.CHECK_TESTS, "entry_point": "secret",
                         "timeout_s": 60.0}},
           {"response": f"```python\n{atk.IO_CORRECT}```",
            "verifier": {"type": "code", "tests": atk.io_tests(), "timeout_s": 60.0}}]
  with pool_lib.RewardPool(max_workers=3, item_timeout_s=120.0) as pool:
    results = pool.score(items)
  assert [r.reward for r in results] == [1.0, 1.0, 1.0], results


@pytest.mark.parametrize("kind", ["forging", "escaping", "exhausting", "snooping"])
def test_attacks_score_zero_leave_no_trace_and_a_correct_program_still_scores_one(host, kind):
  attacks = [a for a in atk.ATTACKS if a.kind == kind]
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as executor:
    results = list(executor.map(lambda a: _score(host, a), attacks))
  assert not host.signals  # the trainer (this process) was not signalled
  for attack, result in zip(attacks, results):
    assert "@" not in host.fill(attack.code).replace("@property", ""), attack.name  # all filled
    assert "does not compile" not in result.detail, (attack.name, result.stderr)  # it ran
    assert result.status in ("fail", "timeout"), (attack.name, result)
    assert not result.passed, attack.name
    for run in _runs(result):
      if run.pgid is not None:
        assert sb.pids_in_group(run.pgid) == [], attack.name
      if run.uid is not None:
        assert sb.pids_of_uid(run.uid) == [], attack.name
    candidate = result.candidate or result
    printed = candidate.stdout + candidate.stderr
    assert host.secret not in printed, attack.name
    assert atk.SALT not in printed, attack.name  # the tests' contents never reach it
    assert "CONNECTED" not in printed and "WROTE" not in printed, (attack.name, printed)
    assert "STDIN KAT" not in printed and "FOUND" not in printed, (attack.name, printed)
    for word in ("SENT ", "ROOT", "USERNS", "OPENED", "MKNOD"):
      assert word not in printed, (attack.name, word, printed)
    host.assert_untouched(attack.name)
  _assert_correct_programs_still_score_one()


def test_suite_has_at_least_thirty_attacks_of_every_kind():
  kinds = [a.kind for a in atk.ATTACKS]
  assert len(kinds) >= 30 and len({a.name for a in atk.ATTACKS}) == len(kinds)
  assert set(kinds) == {"forging", "escaping", "exhausting", "snooping"}
