"""The sandbox launcher: run as `python -I -S -B sandbox_launcher.py CONFIG_JSON` by
`sandbox.run_python`, in a new session. It isolates itself (namespaces, the program's tree),
forks the program and reports over the status pipe. Stdlib only, and only the few modules it
needs, so that the interpreter starts fast (it runs once per sandboxed program).

CONFIG_JSON fields (written by `sandbox._run`): workdir, python, site_packages, visible,
hidden_packages, channel_fds, channel_targets, main_file, status_fd, cpu_s, memory_bytes,
file_size_bytes, tmpfs_bytes, nproc, nofile. Status lines (JSON): {"setup": {uid, child_pid,
isolation}}, {"setup_error": str}, {"exit": {"code" | "signal": int}}.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import sys
from collections.abc import Mapping
from typing import Any

LAUNCHER_SETUP_FAILED = 125
_UID_BASE = 1_900_000_000  # one-off uids: base + launcher pid (unique among live processes)
# Linux constants (sched.h, sys/mount.h, sys/prctl.h); Python 3.11 has no os.unshare.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # syscall numbers; glibc has no wrapper
_PR_SET_PDEATHSIG = 1
_DEVICES = ("null", "zero", "full", "random", "urandom")
_TREE = "tree"  # the program's root: a directory of the pivoted tmpfs (see _setup_root)




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


def _bind(source: str, target: str, *, readonly: bool = True, flags: int = 0) -> None:
  """Bind `source` (file or directory) at `target`, creating the target as needed."""
  if os.path.isdir(source):
    os.makedirs(target, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.lexists(target):
      os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
  _mount(source, target, None, _MS_BIND | _MS_REC)
  if readonly:
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | flags)


def _link_spelling(root: str, path: str, depth: int = 0) -> None:
  """Recreate in `root` the symlinks by which `path` is spelled on the host (e.g. /lib ->
  usr/lib, a venv's bin/python -> the base interpreter), so the spelling resolves there too."""
  parts = path.strip("/").split("/")
  for i in range(len(parts)):
    host = "/" + "/".join(parts[:i + 1])
    if not os.path.islink(host):
      continue
    inner = root + host
    if not os.path.lexists(inner):
      os.makedirs(os.path.dirname(inner), exist_ok=True)
      os.symlink(os.readlink(host), inner)
    target = os.path.normpath(os.path.join(os.path.dirname(host), os.readlink(host)))
    if depth < 40:
      _link_spelling(root, "/".join([target] + parts[i + 1:]), depth + 1)
    return


def _expose(root: str, paths: list[str]) -> list[str]:
  """Bind each host path (read-only) at its real location under `root`, plus the symlinks that
  spell it. Returns the real paths bound."""
  reals = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)}, key=len)
  bound: list[str] = []
  for real in reals:
    if real == "/" or any(real == b or real.startswith(b + "/") for b in bound):
      continue  # already visible through a parent
    _bind(real, root + real, flags=_MS_NOSUID | _MS_NODEV)
    bound.append(real)
  for p in paths:
    if os.path.exists(p):
      _link_spelling(root, p)
  return bound


def _hide_packages(root: str, paths: list[str], hidden: list[str]) -> None:
  for real in sorted({os.path.realpath(p) for p in paths}):
    for name in hidden:
      inner = os.path.join(root + real, name)
      if os.path.isdir(inner) and not os.path.ismount(inner):
        _mount("tmpfs", inner, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, "size=4k,mode=755")


def _pivot_root(root: str) -> bool:
  """Make `root` the root and detach the host tree; False (then chroot) where unsupported."""
  import platform  # pylint: disable=g-import-not-at-top  (launcher only)
  number = _SYS_PIVOT_ROOT.get(platform.machine())
  os.chdir(root)
  if number is not None and _libc().syscall(number, b".", b".") == 0:
    libc = _libc()
    if libc.umount2(b".", _MNT_DETACH) != 0:  # the old root, stacked on top of the new one
      raise OSError(ctypes.get_errno(), "umount2 of the old root failed")
    os.chdir("/")
    return True
  os.chroot(".")
  os.chdir("/")
  return False


def _setup_root(config: Mapping[str, Any], uid: int, files: Mapping[str, bytes]) -> dict:
  """Build the program's tree in a directory of an empty tmpfs (mounted over the workdir),
  pivot_root to the tmpfs and chroot into the tree. Being chrooted below the namespace's root
  makes the kernel refuse the program new user namespaces (and their capabilities)."""
  _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount leaks to the host
  readonly = _make_tree_readonly()  # binds below inherit read-only submounts
  _mount("tmpfs", config["workdir"], "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
  root = os.path.join(config["workdir"], _TREE)
  os.makedirs(root)
  owned = f"mode=700,uid={uid},gid={uid}"
  os.makedirs(root + "/tmp")
  _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
         f"size={config['tmpfs_bytes']},{owned}")
  for name, data in files.items():
    path = os.path.join(root + "/tmp", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    while path != root + "/tmp":  # the file and the directories made for it: the program's
      os.chown(path, uid, uid)
      path = os.path.dirname(path)
  os.makedirs(root + "/dev")
  _mount("tmpfs", root + "/dev", "tmpfs", _MS_NOSUID, "size=64k,mode=755")
  for name in _DEVICES:
    try:
      _bind("/dev/" + name, f"{root}/dev/{name}", readonly=False)
    except OSError:
      pass  # a device the host lacks or forbids binding
  for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, f"{root}/dev/{name}")
  os.makedirs(root + "/dev/shm")
  _mount("tmpfs", root + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size=1m,{owned}")
  os.makedirs(root + "/proc")
  _expose(root, list(config["visible"]))
  _hide_packages(root, list(config["visible"]), list(config["hidden_packages"]))
  _mount(None, root + "/dev", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID, "size=64k,mode=755")
  pivoted = _pivot_root(config["workdir"])
  _mount(None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
  os.chroot(_TREE)
  os.chdir("/")
  return {"readonly_fs": readonly, "minimal_root": True, "pivot_root": pivoted}


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
    status_fd = fcntl.fcntl(status_fd, fcntl.F_DUPFD_CLOEXEC, 100)  # out of the channel's way
    channel = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in config["channel_fds"]]
    targets = list(config["channel_targets"])
    for high, fd in zip(channel, targets):
      os.dup2(high, fd)  # inheritable: the program gets it
    for fd in config["channel_fds"]:
      if fd not in targets:
        os.close(fd)  # the launcher's numbers: only the targets reach the program
    if iso.get("mount"):
      try:  # in a pid namespace this shows only the run's processes
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
      except OSError:
        pass  # the program runs without /proc
    os.chdir(cwd)
    _set_limits(config)
    if uid is not None:
      os.setgroups([])
      os.setgid(uid)
      os.setuid(uid)
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: a uid change clears it
    args = [config["python"], "-E", "-s", "-B"] + ([] if config["site_packages"] else ["-S"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": cwd,
           "TMPDIR": cwd, "OMP_NUM_THREADS": "1"}
    os.execve(config["python"], args + [config["main_file"]], env)  # status_fd closes on success
  except BaseException as e:  # pylint: disable=broad-except
    try:
      os.write(status_fd, (json.dumps({"setup_error": f"child: {type(e).__name__}: {e}"})
                           + "\n").encode())
    finally:
      os._exit(LAUNCHER_SETUP_FAILED)


def _launcher_main(config: Mapping[str, Any]) -> int:
  status_fd = int(config["status_fd"])
  os.set_inheritable(status_fd, False)  # never handed to the program

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
      iso.update(_setup_root(config, uid if uid is not None else os.getuid(),
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
    for fd in config["channel_fds"]:
      os.close(fd)  # the program holds them; the peer sees EOF when the program ends
    report({"setup": {"uid": uid, "child_pid": pid, "isolation": iso}})
    _, wait_status = os.waitpid(pid, 0)
  except BaseException as e:  # pylint: disable=broad-except
    report({"setup_error": f"{type(e).__name__}: {e}"})
    return LAUNCHER_SETUP_FAILED
  if os.WIFSIGNALED(wait_status):
    report({"exit": {"signal": os.WTERMSIG(wait_status)}})
  else:
    code = os.WEXITSTATUS(wait_status)
    if code == LAUNCHER_SETUP_FAILED:
      return code  # the child already reported its setup error
    report({"exit": {"code": code}})
  return 0


if __name__ == "__main__":
  sys.exit(_launcher_main(json.loads(sys.argv[1])))
