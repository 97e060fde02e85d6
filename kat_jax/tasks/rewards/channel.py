"""Plain-value channel between a task's tests and the candidate program (stdlib only).

Unit tests never share an interpreter with the candidate. Two sandboxed processes run side by
side, joined by two pipes (fds 3 = in, 4 = out in each; `sandbox.CHANNEL_FDS`):

  tests process (trusted harness)                 candidate process (untrusted)
    run_tests(): builds the tests' namespace         serve_candidate(): executes candidate.py,
    from the candidate's top-level names, runs  <->  sends {"names": {...}}, then answers
    the tests, prints the pass token at the end      requests until its input ends

One JSON line per message:
  tests -> candidate   {"call": [ref, args, kwargs]}  {"getattr": [ref, name]}  {"len": ref}
                       {"bool": ref}  {"iter": ref}  {"getitem": [ref, key]}
  candidate -> tests   {"ok": value}  {"raise": [exception type name, message]}
Values are plain data in a tagged JSON form (`encode` / `decode`): None, bool, int, float, str,
bytes, complex, list, tuple, set, frozenset, dict, and materialized iterators. Any other
object crosses as a handle {"$h": n}, which the tests can only call, read attributes of, take
the len or truth value of, iterate or index; every answer is again plain values or handles
(a truth value the candidate picks tells no more than returning True or False would). A
handle has no remote `==`, `hash` or `in`: those run in the tests' process on plain values,
so an object that claims to equal everything cannot pass `assert f(x) == y`.

Whatever the candidate's process does (patch builtins, walk frames, exit, fork), it can only
answer requests with values (wrong ones fail the tests), raise, or stop answering (the tests
fail). The pass token exists only in the tests' process.
"""

from __future__ import annotations

import builtins
import io
import itertools
import json
import math
import os
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

MAX_MESSAGE_BYTES = 64 << 20
MAX_ITEMS = 1 << 20  # iterators are materialized up to this many items
MAX_DEPTH = 200
CANDIDATE_ENDED_EXIT = 3  # exit code of the tests process when the candidate stopped answering
_PLAIN_BASES = (int, float, str, bytes, bytearray, complex, tuple, list, dict, set, frozenset)


class ChannelError(Exception):
  """A malformed or missing message from the other process."""


class CandidateEnded(ChannelError):
  """The candidate's process closed the channel (exited, crashed or was killed)."""


class CandidateError(Exception):
  """An exception raised in the candidate's process that is not a built-in Exception type."""


def encode(value: Any, handle: Callable[[Any], int] | None = None, depth: int = 0) -> Any:
  """JSON-ready plain form of `value`. `handle(obj) -> int` names objects that are not plain
  data (None: such objects raise TypeError). Subclasses of plain types cross as their base."""
  if depth > MAX_DEPTH:
    raise ValueError("value nested too deeply")
  if value is None or value is True or value is False:
    return value
  t = type(value)
  rec = lambda v: encode(v, handle, depth + 1)
  if t is int:
    return value if -(1 << 62) < value < (1 << 62) else {"$i": hex(value)}
  if t is float:
    return value if math.isfinite(value) else {"$f": repr(value)}
  if t is str:
    return value
  if t is list:
    return [rec(v) for v in value]
  if t is tuple:
    return {"$t": [rec(v) for v in value]}
  if t is set or t is frozenset:
    return {"$s" if t is set else "$fs": [rec(v) for v in value]}
  if t is dict:
    return {"$d": [[rec(k), rec(v)] for k, v in value.items()]}
  if t is bytes or t is bytearray:
    return {"$b" if t is bytes else "$ba": value.hex()}
  if t is complex:
    return {"$c": [rec(value.real), rec(value.imag)]}
  if isinstance(value, bool):
    return bool(value)
  for base in _PLAIN_BASES:  # IntEnum, namedtuple, OrderedDict, Counter, str subclasses ...
    if isinstance(value, base):
      return rec(base(value))
  if handle is None:
    raise TypeError(f"cannot send a {t.__name__} to the other process (plain values only)")
  if t.__module__ == "numpy" and hasattr(value, "tolist"):
    return rec(value.tolist())
  if isinstance(value, (types.GeneratorType, Iterator)):
    return {"$it": [rec(v) for v in itertools.islice(value, MAX_ITEMS)]}
  return {"$h": handle(value)}


def decode(data: Any, handle: Callable[[int], Any], depth: int = 0) -> Any:
  """Inverse of `encode`; accepts nothing else (ChannelError). `handle(n)` gives the object
  for {"$h": n}."""
  if depth > MAX_DEPTH:
    raise ChannelError("value nested too deeply")
  if data is None or type(data) in (bool, int, float, str):
    return data
  rec = lambda v: decode(v, handle, depth + 1)
  if type(data) is list:
    return [rec(v) for v in data]
  if type(data) is not dict or len(data) != 1:
    raise ChannelError(f"not a plain value: {str(data)[:80]}")
  (tag, body), = data.items()
  try:
    if tag in ("$t", "$s", "$fs", "$it") and type(body) is list:
      items = [rec(v) for v in body]
      return {"$t": tuple, "$s": set, "$fs": frozenset, "$it": iter}[tag](items)
    if tag == "$d" and type(body) is list:
      return {rec(k): rec(v) for k, v in body}
    if tag in ("$b", "$ba") and type(body) is str:
      return (bytes if tag == "$b" else bytearray).fromhex(body)
    if tag == "$c" and type(body) is list and len(body) == 2:
      return complex(float(rec(body[0])), float(rec(body[1])))
    if tag == "$f" and body in ("nan", "inf", "-inf"):
      return float(body)
    if tag == "$i" and type(body) is str:
      return int(body, 16)
    if tag == "$h" and type(body) is int:
      return handle(body)
  except (TypeError, ValueError) as e:  # unhashable keys, bad hex, pairs of the wrong length
    raise ChannelError(f"bad {tag} value: {e}") from None
  raise ChannelError(f"not a plain value: {str(data)[:80]}")


class _Pipe:
  """One JSON message per line over a pair of file descriptors."""

  def __init__(self, read_fd: int, write_fd: int):
    self._in = os.fdopen(read_fd, "rb")
    self._out = os.fdopen(write_fd, "wb")

  def send(self, message: Any) -> None:
    try:
      self._out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
      self._out.flush()
    except BrokenPipeError:
      raise CandidateEnded("the candidate program ended before the tests finished") from None

  def receive(self) -> Any:
    line = self._in.readline(MAX_MESSAGE_BYTES + 1)
    if not line:
      raise CandidateEnded("the candidate program ended before the tests finished")
    if not line.endswith(b"\n"):
      raise ChannelError(f"message longer than {MAX_MESSAGE_BYTES} bytes")
    try:
      return json.loads(line)
    except (ValueError, RecursionError) as e:
      raise ChannelError(f"malformed message: {type(e).__name__}") from None


# ---------------------------------------------------------------------------
# Tests' side (trusted)
# ---------------------------------------------------------------------------


def _exception(name: Any, message: Any) -> Exception:
  """The exception to raise in the tests for one raised in the candidate: the built-in type of
  that name when it is an Exception subclass (so `except ValueError` in tests works), else
  CandidateError. SystemExit, KeyboardInterrupt, StopIteration and the like become
  CandidateError."""
  name, message = str(name)[:100], str(message)[:2000]
  cls = getattr(builtins, name, None)
  # StopIteration would end the tests' loops early (`all(map(f, xs))` -> True): never raised
  if (isinstance(cls, type) and issubclass(cls, Exception)
      and not issubclass(cls, (StopIteration, StopAsyncIteration))):
    try:
      return cls(message)
    except Exception:  # pylint: disable=broad-except  (constructors with required fields)
      pass
  return CandidateError(f"{name}: {message}")


class Remote:
  """A candidate object seen from the tests: call, attributes, len, truth, iteration,
  indexing."""

  __slots__ = ("_ref", "_client")

  def __init__(self, ref: int, client: _Client):
    object.__setattr__(self, "_ref", ref)
    object.__setattr__(self, "_client", client)

  def __call__(self, *args, **kwargs):
    return self._client.request({"call": [self._ref, _encode_args(args),
                                          _encode_args(kwargs)]})

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    return self._client.request({"getattr": [self._ref, name]})

  def __len__(self) -> int:
    return self._client.request({"len": self._ref})

  def __bool__(self) -> bool:  # `while node:` over a candidate's linked list
    return self._client.request({"bool": self._ref}) is True

  def __iter__(self):
    return iter(self._client.request({"iter": self._ref}))

  def __getitem__(self, key):
    return self._client.request({"getitem": [self._ref, _encode_args(key)]})

  def __repr__(self) -> str:
    return f"<candidate object #{self._ref}>"


class _Client:

  def __init__(self, pipe: _Pipe):
    self._pipe = pipe

  def decode(self, data: Any) -> Any:
    return decode(data, lambda ref: Remote(ref, self))

  def request(self, message: Any) -> Any:
    self._pipe.send(message)
    reply = self._pipe.receive()
    if type(reply) is dict and len(reply) == 1 and "ok" in reply:
      return self.decode(reply["ok"])
    if (type(reply) is dict and len(reply) == 1 and type(reply.get("raise")) is list
        and len(reply["raise"]) == 2):
      raise _exception(*reply["raise"])
    raise ChannelError(f"bad reply: {str(reply)[:80]}")


def _encode_args(value: Any) -> Any:
  """Arguments from the tests: plain values, with candidate handles passed back as handles."""
  if isinstance(value, Remote):
    return {"$h": value._ref}  # pylint: disable=protected-access
  if type(value) in (list, tuple):
    items = [_encode_args(v) for v in value]
    return items if type(value) is list else {"$t": items}
  if type(value) is dict:
    return {"$d": [[_encode_args(k), _encode_args(v)] for k, v in value.items()]}
  return encode(value)


def run_tests() -> None:
  """main of the tests' process: stdin = pass token; files tests.py, optional prelude.py
  (trusted helper definitions, e.g. a HumanEval prompt), tests.json {"entry_point",
  "module_name"} (module_name: the tests `import` the candidate under that name)."""
  token = sys.stdin.readline().strip()
  sys.stdin = io.StringIO()
  with open("tests.json", encoding="utf-8") as f:
    config = json.load(f)
  entry_point, module_name = config.get("entry_point"), config.get("module_name")
  client = _Client(_Pipe(3, 4))
  try:
    first = client._pipe.receive()  # pylint: disable=protected-access
    names = first.get("names") if type(first) is dict and len(first) == 1 else None
    if type(names) is not dict:
      raise ChannelError("the candidate did not report its names")
    objects = {name: client.decode(value) for name, value in names.items()
               if isinstance(name, str) and name.isidentifier() and not name.startswith("__")}
    # never shadow a builtin the tests use (a candidate's `range` or `abs`)
    namespace: dict[str, Any] = {name: value for name, value in objects.items()
                                 if not hasattr(builtins, name)}
    namespace["__name__"] = "__tests__"
    if module_name:
      module = types.ModuleType(module_name)
      module.__dict__.update(objects)
      sys.modules[module_name] = module
    if os.path.exists("prelude.py"):  # trusted helpers win over the candidate's of that name
      _exec_file("prelude.py", namespace)
    if entry_point:
      if entry_point not in names:
        raise NameError(f"the candidate defines no {entry_point!r}")
      namespace[entry_point] = client.decode(names[entry_point])
    _exec_file("tests.py", namespace)
    if entry_point:
      namespace["check"](namespace[entry_point])
  except CandidateEnded as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(CANDIDATE_ENDED_EXIT)
  sys.stdout.write("\n" + token + "\n")
  sys.stdout.flush()


def _exec_file(path: str, namespace: dict[str, Any]) -> None:
  with open(path, encoding="utf-8") as f:
    source = f.read()
  # dont_inherit: not this module's `from __future__ import annotations`
  exec(compile(source, path, "exec", dont_inherit=True), namespace)  # pylint: disable=exec-used


# ---------------------------------------------------------------------------
# Candidate's side (untrusted: everything below may be replaced by the candidate's code, which
# can only change what it answers)
# ---------------------------------------------------------------------------


class _Objects:

  def __init__(self):
    self._by_ref: dict[int, Any] = {}
    self._refs: dict[int, int] = {}  # id(obj) -> ref

  def ref(self, obj: Any) -> int:
    if id(obj) not in self._refs:
      self._refs[id(obj)] = len(self._by_ref)
      self._by_ref[len(self._by_ref)] = obj
    return self._refs[id(obj)]

  def get(self, ref: int) -> Any:
    if ref not in self._by_ref:
      raise ChannelError(f"no candidate object #{ref}")
    return self._by_ref[ref]


def _answer(objects: _Objects, request: Any) -> Any:
  if type(request) is not dict or len(request) != 1:
    raise ChannelError("bad request")
  (op, body), = request.items()
  dec = lambda v: decode(v, objects.get)
  if op == "call":
    target, args, kwargs = body
    return objects.get(target)(*dec(args), **dec(kwargs))
  if op == "getattr":
    return getattr(objects.get(body[0]), str(body[1]))
  if op == "len":
    return len(objects.get(body))
  if op == "bool":
    return bool(objects.get(body))
  if op == "iter":
    return list(itertools.islice(iter(objects.get(body)), MAX_ITEMS))
  if op == "getitem":
    return objects.get(body[0])[dec(body[1])]
  raise ChannelError(f"unknown request {op!r}")


def serve_candidate() -> None:
  """main of the candidate's process: run candidate.py (`__name__` is not "__main__", so demo
  blocks stay off), report its names, answer requests until the tests' side closes."""
  pipe = _Pipe(3, 4)
  sys.stdin = io.StringIO()
  namespace: dict[str, Any] = {"__name__": "__candidate__"}
  try:
    _exec_file("candidate.py", namespace)
  except SystemExit:
    print("program called exit before the tests ran", file=sys.stderr)
    _end(1)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    _end(1)
  objects = _Objects()
  names = {}
  for name, value in list(namespace.items()):
    if name.startswith("__") or isinstance(value, types.ModuleType):
      continue
    try:
      names[name] = encode(value, objects.ref)
      json.dumps(names[name])
    except Exception:  # pylint: disable=broad-except  (a value that cannot cross: leave out)
      names.pop(name, None)
  pipe.send({"names": names})
  while True:
    try:
      request = pipe.receive()
    except CandidateEnded:
      _end(0)  # the tests are done
    try:
      reply = {"ok": encode(_answer(objects, request), objects.ref)}
      line = json.dumps(reply, separators=(",", ":"))
    except BaseException as e:  # pylint: disable=broad-except  (reported to the tests)
      try:
        message = str(e)
      except Exception:  # pylint: disable=broad-except
        message = ""
      reply = {"raise": [type(e).__name__, message[:2000]]}
      line = json.dumps(reply)
    pipe._out.write(line.encode() + b"\n")  # pylint: disable=protected-access
    pipe._out.flush()  # pylint: disable=protected-access


def _end(code: int) -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(code)
