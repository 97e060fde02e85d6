"""Run an untrusted Python program in a contained child process.

Layout of one run (after openai/human-eval `execution.py`, hardened; spec §6.2):

  trainer ──Popen(start_new_session)──> launcher (this file run as a script, root if we are)
                                          │ unshare: net, mount, pid namespaces (each if allowed)
                                          │ mounts: whole tree read-only, private tmpfs on /tmp,
                                          │         /var/tmp, /dev/shm; inaccessible python
                                          │         prefix re-exposed read-only
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
  * filesystem: read-only view of every mount + a uid that owns nothing outside its tmpfs.
  * secrets: environment reduced to PATH, LANG, HOME, TMPDIR (+ OMP_NUM_THREADS=1); /root is
    hidden under an empty tmpfs when the interpreter has to be re-exposed from under it.
  * network: a new network namespace has only a down loopback device.
  * output: stdout/stderr read with byte caps, the rest drained and dropped.
Each isolation step that the OS refuses is recorded in `SandboxResult.isolation` instead of
failing the run; a run never raises into the caller.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

STATUSES = ("pass", "fail", "timeout", "error")
_LAUNCHER_SETUP_FAILED = 125
_UID_BASE = 1_900_000_000  # one-off uids: base + launcher pid (unique among live processes)
_MAIN_FILE = "main.py"

# Linux constants (sched.h, sys/mount.h, sys/prctl.h); Python 3.11 has no os.unshare.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
# Covered by private tmpfs mounts inside the sandbox: host files there are invisible to it.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_PR_SET_PDEATHSIG = 1


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

  @property
  def passed(self) -> bool:
    return self.status == "pass"


def run_python(program: str, *, limits: SandboxLimits | None = None,
               files: Mapping[str, str] | None = None, stdin: str = "",
               site_packages: bool = True, pass_marker: str | None = None) -> SandboxResult:
  """Run `program` as `python main.py` in the sandbox; never raises.

  Args:
    program: Python source (e.g. candidate solution + "\\n" + unit tests).
    limits: see `SandboxLimits`.
    files: extra files {relative name: text} placed next to main.py.
    stdin: text fed to the program's stdin.
    site_packages: let the program import installed packages (numpy, ...).
    pass_marker: if set, 'pass' also needs this line at the end of stdout (so a program
      that exits 0 early, before its tests ran, fails); the line is removed from stdout.
  """
  start = time.monotonic()
  try:
    limits = limits or SandboxLimits()
    limits.validate()
    _check_files(files or {})
    result = _run(program, limits, dict(files or {}), stdin, site_packages, start)
    return _apply_pass_marker(result, pass_marker) if pass_marker else result
  except Exception as e:  # pylint: disable=broad-except  (never raise into the trainer)
    return SandboxResult(status="error", detail=f"{type(e).__name__}: {e}",
                         wall_s=time.monotonic() - start)


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


def _run(program: str, limits: SandboxLimits, files: dict[str, str], stdin: str,
         site_packages: bool, start: float) -> SandboxResult:
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
        "cpu_s": limits.cpu_s or int(limits.timeout_s) + 2,
        "memory_bytes": limits.memory_bytes, "file_size_bytes": limits.file_size_bytes,
        "tmpfs_bytes": limits.tmpfs_bytes, "nproc": limits.nproc, "nofile": limits.nofile,
    }
    return _launch_and_wait(config, limits, stdin, start)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _launch_and_wait(config: dict[str, Any], limits: SandboxLimits, stdin: str,
                     start: float) -> SandboxResult:
  status_r, status_w = os.pipe()
  config["status_fd"] = status_w
  env = _scrubbed_env(config["workdir"])
  try:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(status_w,), env=env, cwd=config["workdir"], start_new_session=True)
  finally:
    os.close(status_w)
  pgid = proc.pid  # session leader -> its pid is the group id
  try:
    _feed_stdin(proc, stdin)
    streams, timed_out = _collect(proc, status_r, limits, start)
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
  if timed_out:
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


def _collect(proc: subprocess.Popen, status_r: int, limits: SandboxLimits,
             start: float) -> tuple[dict[str, tuple[bytes, bool]], bool]:
  """Read stdout/stderr/status until the launcher is done or the deadline passes.

  Returns ({name: (kept bytes, truncated)}, timed_out).
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
  timed_out = False
  try:
    while sel.get_map():
      now = time.monotonic()
      if now >= deadline:
        timed_out = True
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
  if timed_out and b'"exit"' in kept["status"]:
    timed_out = False  # the program ended in the same instant the deadline passed
  streams = {n: (bytes(kept[n]), truncated[n]) for n in cap}
  streams["stdout_tail"] = (bytes(tail), False)
  return streams, timed_out


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


# ---------------------------------------------------------------------------
# Launcher: runs as `python -I -S sandbox.py CONFIG_JSON` (stdlib only below this line).
# ---------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
  return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
  return _libc().unshare(flags) == 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
  enc = lambda s: None if s is None else s.encode()
  if _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                   enc(data)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"mount {source} -> {target} ({fstype}): {os.strerror(err)}")


def _mount_points() -> list[tuple[str, int]]:
  """(mount point, flags to keep on a read-only remount) from /proc/self/mountinfo."""
  keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
  points = []
  with open("/proc/self/mountinfo", encoding="utf-8") as f:
    for line in f:
      fields = line.split()
      point = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040
      flags = sum(keep.get(opt, 0) for opt in fields[5].split(","))
      points.append((point, flags))
  return points


def _make_tree_readonly() -> bool:
  """Bind-remount every mount read-only (in our private mount namespace). True if / is."""
  root_ok = False
  for point, flags in _mount_points():
    try:
      _mount(None, point, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | flags)
      root_ok = root_ok or point == "/"
    except OSError:
      pass  # e.g. a mount point hidden under another mount
  return root_ok


def _blocking_ancestor(path: str) -> str | None:
  """Top-most ancestor of `path` that other users cannot traverse (e.g. /root, mode 0700)."""
  parts = os.path.realpath(path).split("/")
  for i in range(2, len(parts) + 1):
    ancestor = "/".join(parts[:i])
    if not os.stat(ancestor).st_mode & 0o001:
      return ancestor
  return None


def _expose_python(prefix: str) -> bool:
  """Make the interpreter's prefix visible to the unprivileged uid when it lives under a dir
  it cannot enter: cover that dir with an empty tmpfs (hiding its other contents) and bind the
  prefix back read-only. Returns True if anything was done."""
  prefix = os.path.realpath(prefix)
  blocker = _blocking_ancestor(prefix)
  if blocker is None:
    return False
  fd = os.open(prefix, os.O_PATH)  # keeps the real prefix reachable once covered
  try:
    _mount("tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    os.makedirs(prefix, mode=0o755, exist_ok=True)
    _mount(f"/proc/self/fd/{fd}", prefix, None, _MS_BIND | _MS_REC)
    _mount(None, prefix, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    _mount(None, blocker, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
           "size=1m,mode=755")
  finally:
    os.close(fd)
  return True


def _setup_mounts(config: Mapping[str, Any], uid: int, files: Mapping[str, bytes]) -> dict:
  _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount leaks to the host
  readonly = _make_tree_readonly()
  exposed = _expose_python(sys.prefix) or _expose_python(os.path.dirname(config["python"]))
  opts = f"mode=700,uid={uid},gid={uid}"
  _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
         f"size={config['tmpfs_bytes']},{opts}")
  for extra in PRIVATE_DIRS[1:]:
    if os.path.isdir(extra):
      _mount("tmpfs", extra, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size=1m,{opts}")
  for name, data in files.items():
    path = os.path.join("/tmp", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  for root, dirs, names in os.walk("/tmp"):
    for n in dirs + names:
      os.chown(os.path.join(root, n), uid, uid)
  return {"readonly_fs": readonly, "python_reexposed": exposed}


def _read_workdir(workdir: str) -> dict[str, bytes]:
  files = {}
  for root, _, names in os.walk(workdir):
    for n in names:
      path = os.path.join(root, n)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def _try_user_namespace() -> bool:
  """Unprivileged fallback: a user namespace makes the other namespaces available."""
  uid, gid = os.getuid(), os.getgid()
  if not _unshare(_CLONE_NEWUSER):
    return False
  try:
    with open("/proc/self/setgroups", "w") as f:
      f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
      f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
      f.write(f"0 {gid} 1")
  except OSError:
    pass
  return True


def _set_limits(config: Mapping[str, Any]) -> None:
  def cap(kind, value):
    resource.setrlimit(kind, (value, value))
  cap(resource.RLIMIT_CPU, int(config["cpu_s"]))
  cap(resource.RLIMIT_AS, int(config["memory_bytes"]))
  cap(resource.RLIMIT_FSIZE, int(config["file_size_bytes"]))
  cap(resource.RLIMIT_NOFILE, int(config["nofile"]))
  cap(resource.RLIMIT_CORE, 0)
  cap(resource.RLIMIT_NPROC, int(config["nproc"]))


def _child(config: Mapping[str, Any], cwd: str, uid: int | None, iso: Mapping[str, bool],
           status_fd: int) -> None:
  """In the forked child: finish isolation and exec the program. Never returns."""
  try:
    if iso.get("pid") and iso.get("mount"):
      _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)  # hide host pids
    os.chdir(cwd)
    _set_limits(config)
    if uid is not None:
      os.setgroups([])
      os.setgid(uid)
      os.setuid(uid)
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: a uid change clears it
    os.close(status_fd)
    args = [config["python"], "-E", "-s", "-B"] + ([] if config["site_packages"] else ["-S"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": cwd,
           "TMPDIR": cwd, "OMP_NUM_THREADS": "1"}
    os.execve(config["python"], args + [_MAIN_FILE], env)
  except BaseException as e:  # pylint: disable=broad-except
    try:
      os.write(status_fd, (json.dumps({"setup_error": f"child: {type(e).__name__}: {e}"})
                           + "\n").encode())
    finally:
      os._exit(_LAUNCHER_SETUP_FAILED)


def _launcher_main(config: Mapping[str, Any]) -> int:
  status_fd = int(config["status_fd"])

  def report(msg: dict) -> None:
    os.write(status_fd, (json.dumps(msg) + "\n").encode())

  try:
    is_root = os.getuid() == 0
    iso = {"userns": False}
    if not is_root:
      iso["userns"] = _try_user_namespace()
    iso["net"] = _unshare(_CLONE_NEWNET)
    iso["mount"] = _unshare(_CLONE_NEWNS)
    iso["pid"] = _unshare(_CLONE_NEWPID)
    uid = _UID_BASE + os.getpid() if is_root else None
    iso["uid_drop"] = uid is not None
    cwd = config["workdir"]
    if iso["mount"]:
      iso.update(_setup_mounts(config, uid if uid is not None else os.getuid(),
                               _read_workdir(cwd)))
      cwd = "/tmp"
    elif uid is not None:
      for root, dirs, names in os.walk(cwd):
        for n in [root] + [os.path.join(root, x) for x in dirs + names]:
          os.chown(n, uid, uid)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
      _child(config, cwd, uid, iso, status_fd)
    report({"setup": {"uid": uid, "child_pid": pid, "isolation": iso}})
    _, wait_status = os.waitpid(pid, 0)
  except BaseException as e:  # pylint: disable=broad-except
    report({"setup_error": f"{type(e).__name__}: {e}"})
    return _LAUNCHER_SETUP_FAILED
  if os.WIFSIGNALED(wait_status):
    report({"exit": {"signal": os.WTERMSIG(wait_status)}})
  else:
    code = os.WEXITSTATUS(wait_status)
    if code == _LAUNCHER_SETUP_FAILED:
      return code  # the child already reported its setup error
    report({"exit": {"code": code}})
  return 0


if __name__ == "__main__":
  sys.exit(_launcher_main(json.loads(sys.argv[1])))
