"""Helpers shared by the tests, benchmarks and notebooks: numerical comparison, random
`kv_end` layouts, and a local fake HTTP server for OpenAI-compatible clients."""

from __future__ import annotations

import contextlib
import importlib.util
import http.server
import json
import os
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np


def relative_error(actual: Any, expected: Any) -> float:
  """||actual - expected|| / ||expected|| in float64 (0 when both are zero). NaN propagates."""
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  denom = np.linalg.norm(e)
  diff = np.linalg.norm(a - e)
  return float(diff / denom) if denom > 0 else float(diff)


def assert_trees_close(actual: Any, expected: Any, *, rtol: float) -> None:
  """Asserts equal tree structure and a relative error below `rtol` for every leaf."""
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  if a_def != e_def:
    raise AssertionError(f"tree structures differ:\n{a_def}\nvs\n{e_def}")
  for (path, a), (_, e) in zip(a_leaves, e_leaves):
    err = relative_error(a, e)
    if not err < rtol:  # also catches NaN
      raise AssertionError(f"{jax.tree_util.keystr(path)}: relative error {err:.3e} >= {rtol}")


def random_tree_kv_end(rng: np.random.Generator, length: int, max_segment: int = 12
                       ) -> np.ndarray:
  """kv_end [T] of random prefix trees laid out depth-first, filling `length` tokens.

  Each node is a segment of 1..max_segment tokens with 0..3 children; every token of a node
  gets the end of that node's subtree. When the first tree ends early, more follow (a forest,
  i.e. packed trees).
  """
  kv_end = np.zeros(length, np.int32)

  def node(start: int, budget: int) -> int:
    segment = min(budget, int(rng.integers(1, max_segment + 1)))
    pos = start + segment
    for _ in range(int(rng.integers(0, 4))):
      if pos >= start + budget:
        break
      pos = node(pos, int(rng.integers(1, start + budget - pos + 1)))
    kv_end[start:start + segment] = pos
    return pos

  pos = 0
  while pos < length:
    pos = node(pos, length - pos)
  return kv_end


def packed_kv_end(doc_lengths: list[int]) -> np.ndarray:
  """kv_end [sum(doc_lengths)] of documents packed back to back."""
  return np.concatenate([np.full(n, end, np.int32)
                         for n, end in zip(doc_lengths, np.cumsum(doc_lengths))])


def subtree_ends_before_tile_end_kv_end(block_q: int, block_k: int) -> tuple[np.ndarray, int]:
  """A tree row whose subtree ends one query before a query block's end: (kv_end [T], row).

  Layout: root prefix [0, r), branch A [r, qe - 1), branch B [qe - 1, T), with r = block_k / 2
  inside key block 0 and [qs, qe) the first query block at or past that key block's last key.
  Keys of branch A have `kv_end = qe - 1`, so tile (query block of qs, key block 0) is
  partial, not full: its last query `row = qe - 1` (branch B's first token) must not see them.
  """
  root = block_k // 2
  q_start = -(-(block_k - 1) // block_q) * block_q
  q_end = q_start + block_q
  multiple = max(block_q, block_k)
  length = -(-(q_end + block_q) // multiple) * multiple
  kv_end = np.full(length, length, np.int32)
  kv_end[root:q_end - 1] = q_end - 1
  return kv_end, q_end - 1


class LocalJsonServer:
  """A local HTTP server for tests of OpenAI-compatible clients (no network needed).

    with LocalJsonServer(lambda path, body: (200, {"choices": [...]})) as server:
      client = SomeClient(server.url)

  `respond(path, body) -> (status, reply)` answers every POST; `reply` is a JSON-able object
  or raw bytes. Requests are kept in `server.requests` as {"path", "body", "auth"}.
  """

  def __init__(self, respond: Callable[[str, Any], tuple[int, Any]]):
    self.requests: list[dict[str, Any]] = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append({"path": self.path, "body": body,
                               "auth": self.headers.get("Authorization")})
        status, reply = respond(self.path, body)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    report = self.server.handle_error

    def handle_error(request, client_address):  # a client that gave up (timeout tests)
      if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
        report(request, client_address)

    self.server.handle_error = handle_error
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  def __enter__(self) -> "LocalJsonServer":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.server.shutdown()
    self.server.server_close()


class SimulatedKill(Exception):
  """Raised by `killed_before_step`: the run stops as if the process had died there."""


@contextlib.contextmanager
def killed_before_step(step: int):
  """Inside the block a trainer run stops (SimulatedKill) before it takes step `step` (1-based),
  i.e. after `step - 1` steps; what it saved and logged until then stays, as after a kill."""
  from kat_jax.train import trainer  # pylint: disable=g-import-not-at-top
  take = trainer.Trainer._take  # pylint: disable=protected-access

  def killing_take(source, state, done):
    if done + 1 == step:
      raise SimulatedKill(f"stopped before step {step}")
    return take(source, state, done)

  trainer.Trainer._take = staticmethod(killing_take)  # pylint: disable=protected-access
  try:
    yield
  finally:
    trainer.Trainer._take = staticmethod(take)  # pylint: disable=protected-access


def logged_losses(workdir: str, key: str = "loss") -> dict[int, float]:
  """Last logged training `key` per step of `<workdir>/metrics.jsonl` (a resumed run re-logs
  the steps after its checkpoint)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row["split"] == "train" and key in row:
        losses[row["step"]] = row[key]
  return losses


def assert_resume_reproduces(run: Callable[[str], Any], workdir: str, *, steps: int,
                             kill_before: int, resumes_at: int, log_dir: str = "",
                             key: str = "loss") -> None:
  """Runs `run(workdir)` uninterrupted, then again killed before step `kill_before` and
  restarted; the restart must resume at step `resumes_at` (its newest checkpoint) and log the
  same `key` at every step, exactly. `log_dir`: the metrics' directory under a workdir."""
  reference, killed = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")
  run(reference)
  with killed_before_step(kill_before):
    try:
      run(killed)
    except SimulatedKill:
      pass
    else:
      raise AssertionError(f"the run ended before step {kill_before}")
  logs = os.path.join(killed, log_dir)
  checkpoints = sorted(int(n) for n in os.listdir(os.path.join(logs, "checkpoints"))
                       if n.isdigit())
  assert checkpoints[-1] == resumes_at, checkpoints
  run(killed)
  expected = logged_losses(os.path.join(reference, log_dir), key)
  assert sorted(expected) == list(range(1, steps + 1)), sorted(expected)
  assert logged_losses(logs, key) == expected
  with open(os.path.join(logs, "metrics.jsonl"), encoding="utf-8") as f:
    first_steps = [json.loads(line)["step"] for line in f].count(1)
  assert first_steps == 1, "the restart trained from scratch instead of resuming"


def assert_reproduces_synchronous_loop(got: list[dict], record: list[dict]) -> None:
  """Asserts that a stage's per-step metrics `got` reproduce `record`, those of the
  synchronous RL loop before the rollout pipeline existed (tests/rl/data): the same steps,
  samples, rewards and clipping, exactly; loss and gradient
  norm to float32 rounding. The loop took its proximal log-probs from a forward pass of
  their own (or the sampler's), the stages take them from the update's own pass: the same
  weights, so the same values up to another XLA program's rounding. Losses that are zero
  but for rounding (a group's advantages cancelling at a ratio of 1) were recorded as
  ~1e-8."""
  assert len(got) == len(record), (len(got), len(record))
  rounded = ("loss", "policy_loss", "grad_norm")
  for row, want in zip(got, record):
    assert {k: row[k] for k in want if k not in rounded} == {
        k: v for k, v in want.items() if k not in rounded}
    np.testing.assert_allclose([row[k] for k in rounded], [want[k] for k in rounded],
                               rtol=1e-6, atol=1e-7)


def benchmark_module(name: str) -> Any:
  """`benchmarks/<name>.py` of this checkout, imported by path (benchmarks are scripts, not a
  package; one may import another, so their folder is on sys.path while it loads)."""
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks")
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark",
                                                os.path.join(folder, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, folder)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(folder)
  return module
