"""Decoupled rollouts and training (a minimal SeamlessFlow-style split; SeamlessFlow,
arXiv 2508.11553).

Rollout workers and the trainer never call each other: workers read the newest weight
snapshot from a directory (`WeightStore`), generate groups of episodes and put them on a
queue tagged with the snapshot's step; the trainer takes groups off the queue, drops those
older than `max_staleness` updates, trains, and publishes a snapshot every
`publish_every` updates. Workers here are threads (JAX releases the GIL while it computes);
the same store + queue protocol works across processes or hosts (a shared directory and any
queue). A worker's policy is either the in-process JAX sampler or an OpenAI-compatible server
(`OpenAICompletionsClient`, e.g. vLLM loaded from the snapshots).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import queue
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from kat_jax.openai_http import post_json


class WeightStore:
  """A directory of numbered weight snapshots `weights_<step>.npz`, written atomically."""

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory, self.keep = directory, keep
    os.makedirs(directory, exist_ok=True)

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, f"weights_{step:08d}.npz")

  def steps(self) -> list[int]:
    names = glob.glob(os.path.join(self.directory, "weights_*.npz"))
    return sorted(int(os.path.basename(n)[8:16]) for n in names)

  def publish(self, step: int, params: Any) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    tmp = self._path(step) + ".tmp"
    with open(tmp, "wb") as f:  # rename makes the snapshot appear whole or not at all
      np.savez(f, **arrays)
    os.replace(tmp, self._path(step))
    for old in self.steps()[:-self.keep]:
      try:
        os.remove(self._path(old))
      except FileNotFoundError:  # another reader/cleaner got there first
        pass
    return self._path(step)

  def latest(self, like: Any) -> tuple[int, Any] | None:
    """(step, params shaped like `like`) of the newest snapshot, None if there is none."""
    for step in reversed(self.steps()):
      try:
        with np.load(self._path(step)) as data:
          paths, treedef = jax.tree_util.tree_flatten_with_path(like)
          leaves = [data[jax.tree_util.keystr(p)] for p, _ in paths]
        return step, jax.tree_util.tree_unflatten(treedef, leaves)
      except (FileNotFoundError, KeyError, ValueError, OSError):
        continue  # removed while reading: try the previous one
    return None


@dataclasses.dataclass
class RolloutBatch:
  policy_step: int  # snapshot the episodes were sampled with
  groups: list  # groups of episodes (kat_jax.agentic.rollout.Episode)
  worker: int
  seconds: float


class RolloutWorker(threading.Thread):
  """Loads the newest snapshot, rolls out, enqueues; until `stop` is set.

  rollout_fn(params, tasks, rng) -> groups; task_fn(worker, i) -> the tasks of its i-th batch.
  """

  def __init__(self, worker_id: int, store: WeightStore, params_like: Any,
               rollout_fn: Callable[[Any, Sequence[Any], jax.Array], list],
               task_fn: Callable[[int, int], Sequence[Any]], out: queue.Queue,
               stop: threading.Event, seed: int = 0, poll_s: float = 0.05):
    super().__init__(daemon=True, name=f"rollout-{worker_id}")
    self.worker_id, self.store, self.like = worker_id, store, params_like
    self.rollout_fn, self.task_fn, self.out, self.stop = rollout_fn, task_fn, out, stop
    self.rng = jax.random.key(seed + 1000 * worker_id)
    self.poll_s = poll_s
    self.error: BaseException | None = None
    self.batches = 0

  def run(self):
    try:
      step, params = -1, None
      while not self.stop.is_set():
        latest = self.store.latest(self.like) if self.store.steps() and (
            self.store.steps()[-1] != step) else None
        if latest is not None:
          step, params = latest
        if params is None:
          time.sleep(self.poll_s)
          continue
        self.rng, key = jax.random.split(self.rng)
        start = time.perf_counter()
        groups = self.rollout_fn(params, self.task_fn(self.worker_id, self.batches), key)
        batch = RolloutBatch(step, groups, self.worker_id, time.perf_counter() - start)
        self.batches += 1
        while not self.stop.is_set():
          try:
            self.out.put(batch, timeout=self.poll_s)  # bounded queue = back-pressure
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except  (surfaced by the trainer)
      self.error = e


class DecoupledRollouts:
  """The trainer's side of the split: snapshots out, fresh rollout batches in.

  `start(params, update)` publishes the first snapshot and starts the workers; `take(update)`
  returns the next batch at most `max_staleness` updates old (older ones are dropped), as
  (batch, staleness, batches dropped so far); `published(update, params)` writes a snapshot
  every `publish_every` updates; `close()` stops the workers. `discard(batch)`, when set, is
  called on each dropped batch (e.g. to forget its recorded trajectories).
  """

  def __init__(self, rollout_fn: Callable[[Any, Sequence[Any], jax.Array], list],
               task_fn: Callable[[int, int], Sequence[Any]], directory: str, *,
               num_workers: int = 1, publish_every: int = 1, max_staleness: int = 2,
               queue_size: int = 2, timeout_s: float = 300.0, seed: int = 0,
               discard: Callable[[RolloutBatch], None] | None = None):
    self.store = WeightStore(directory)
    self.rollout_fn, self.task_fn, self.num_workers, self.seed = (rollout_fn, task_fn,
                                                                  num_workers, seed)
    self.publish_every, self.max_staleness, self.timeout_s = (publish_every, max_staleness,
                                                              timeout_s)
    self.out: queue.Queue = queue.Queue(maxsize=queue_size)
    self.stop = threading.Event()
    self.workers: list[RolloutWorker] = []
    self.dropped, self.deadline, self.started = 0, float("inf"), False
    self.discard = discard

  def start(self, params: Any, update: int = 0) -> None:
    self.store.publish(update, params)
    # Workers only need the tree structure; not the arrays (the trainer may donate them).
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    self.workers = [RolloutWorker(i, self.store, like, self.rollout_fn, self.task_fn, self.out,
                                  self.stop, self.seed) for i in range(self.num_workers)]
    for w in self.workers:
      w.start()
    self.deadline, self.started = time.monotonic() + self.timeout_s, True

  def take(self, update: int) -> tuple[RolloutBatch, int, int]:
    while True:
      failed = [w for w in self.workers if w.error is not None]
      if failed:
        raise RuntimeError(f"rollout worker {failed[0].worker_id} failed") from failed[0].error
      if time.monotonic() > self.deadline:
        raise TimeoutError(f"decoupled run: no fresh rollouts for update {update + 1} within "
                           f"{self.timeout_s}s")
      try:
        batch = self.out.get(timeout=0.1)
      except queue.Empty:
        continue
      staleness = update - batch.policy_step
      if staleness <= self.max_staleness:
        return batch, staleness, self.dropped
      self.dropped += 1
      if self.discard is not None:
        self.discard(batch)

  def published(self, update: int, params: Any) -> None:
    if update % self.publish_every == 0:
      self.store.publish(update, params)

  def close(self) -> None:
    self.stop.set()
    for w in self.workers:
      w.join(timeout=30)


def run_decoupled(init_params: Any, train_fn: Callable[[Any, RolloutBatch], tuple[Any, dict]],
                  rollout_fn: Callable[[Any, Sequence[Any], jax.Array], list],
                  task_fn: Callable[[int, int], Sequence[Any]], directory: str, *,
                  num_updates: int, num_workers: int = 1, publish_every: int = 1,
                  max_staleness: int = 2, queue_size: int = 2, timeout_s: float = 300.0,
                  seed: int = 0) -> tuple[Any, list[dict]]:
  """A bare trainer loop over `DecoupledRollouts` (the agentic stage uses the Trainer).

  train_fn(params_or_state, batch) -> (new, metrics); the state's `.params` (if any) are
  published. Returns (final state, per-update log with the staleness of each batch used).
  """
  params_of = lambda s: getattr(s, "params", s)  # noqa: E731
  rollouts = DecoupledRollouts(rollout_fn, task_fn, directory, num_workers=num_workers,
                               publish_every=publish_every, max_staleness=max_staleness,
                               queue_size=queue_size, timeout_s=timeout_s, seed=seed)
  state, log = init_params, []
  rollouts.start(params_of(state), 0)
  try:
    for update in range(num_updates):
      batch, staleness, dropped = rollouts.take(update)
      state, metrics = train_fn(state, batch)
      rollouts.published(update + 1, params_of(state))
      log.append({"update": update + 1, "policy_step": batch.policy_step,
                  "staleness": staleness, "worker": batch.worker, "rollout_s": batch.seconds,
                  "dropped": dropped, **metrics})
  finally:
    rollouts.close()
  return state, log


# ----------------------------------------------------------------------------- server client


class OpenAICompletionsClient:
  """Token-level completions from an OpenAI-compatible server (`/v1/completions`).

  Sends the prompt as token ids and asks for the sampled tokens' log-probs with token ids
  (vLLM: `return_tokens_as_token_ids`, tokens come back as "token_id:<id>").
  """

  def __init__(self, base_url: str, model: str, timeout_s: float = 120.0):
    self.url = base_url.rstrip("/") + "/v1/completions"
    self.model, self.timeout_s = model, timeout_s

  def complete(self, prompt: Sequence[int], *, n: int = 1, max_tokens: int = 64,
               temperature: float = 1.0, stop_ids: Sequence[int] = ()
               ) -> list[tuple[list[int], list[float], bool]]:
    """-> per sample (token ids, log-probs, stopped by a stop id)."""
    body = {"model": self.model, "prompt": [int(t) for t in prompt], "n": n,
            "max_tokens": max_tokens, "temperature": temperature, "logprobs": 0,
            "return_tokens_as_token_ids": True, "stop_token_ids": [int(s) for s in stop_ids],
            "skip_special_tokens": False, "include_stop_str_in_output": True}
    reply = post_json(self.url, body, timeout_s=self.timeout_s)
    samples = []
    for choice in sorted(reply["choices"], key=lambda c: c["index"]):
      lp = choice.get("logprobs") or {}
      tokens = [_token_id(t) for t in lp.get("tokens", [])]
      if len(tokens) != len(lp.get("token_logprobs", [])):
        raise ValueError("server reply: tokens and token_logprobs differ in length")
      samples.append((tokens, [float(x) for x in lp["token_logprobs"]],
                      choice.get("finish_reason") == "stop"))
    return samples


def _token_id(token: str) -> int:
  if not isinstance(token, str) or not token.startswith("token_id:"):
    raise ValueError(f"server returned token {token!r}; start it with "
                     "return_tokens_as_token_ids support (vLLM)")
  return int(token.split(":", 1)[1])


def server_rollout(client: OpenAICompletionsClient, make_env, tasks: Sequence[Any],
                   tokenizer, cfg, manager=None) -> list[list[Any]]:
  """`tree_rollout` through a server: each live episode asks for `branching[t]` samples.

  The server's prefix cache does the sharing; entropies are not returned (left 0, so prefer
  a visit-based pruning score). `manager` (a `kat_jax.rl.trajectories.TrajectoryManager`)
  records turns and rewards as `tree_rollout` does, with weight version 0.
  """
  import copy  # pylint: disable=g-import-not-at-top
  from kat_jax.agentic.rollout import Episode, continuation_text  # pylint: disable=g-import-not-at-top
  from kat_jax.agentic.tool_calls import parse_tool_calls  # pylint: disable=g-import-not-at-top
  from kat_jax.data.chat_template import tokenize_chat  # pylint: disable=g-import-not-at-top
  stop = tokenizer.im_end_id
  live, finished = [], []
  for g, task in enumerate(tasks):
    env = make_env()
    messages = env.reset(task)
    episode = Episode(g, env, list(messages), list(env.tools), [], [], [], [])
    if manager is not None:
      episode.record_group = manager.new_group()
    episode.extend(tokenize_chat(tokenizer, messages, tools=episode.tools or None,
                                 template=cfg.template, add_generation_prompt=True).ids,
                   generated=False)
    live.append(episode)
  for turn in range(cfg.max_turns):
    copies = cfg.branching[turn] if turn < len(cfg.branching) else 1
    nxt = []
    for episode in live:
      samples = client.complete(episode.tokens, n=copies, max_tokens=cfg.max_new_tokens,
                                temperature=cfg.sampling.temperature, stop_ids=(stop,))
      # Fork before any branch is extended: copy c must start from the pre-turn episode,
      # not from copy 0 after its sample and environment step.
      branches = [episode] + [copy.deepcopy(episode) for _ in samples[1:]]
      for c, (e, (ids, logprobs, stopped)) in enumerate(zip(branches, samples)):
        e.branch_id += (c,)
        if manager is not None:
          e.last_interaction = manager.record(e.record_group, e.tokens, ids, logprobs)
        e.extend(ids, generated=True, logprobs=logprobs)
        e.turns += 1
        stopped = stopped and bool(ids) and ids[-1] == stop
        text = tokenizer.decode(ids[:-1] if stopped else ids)
        e.messages.append({"role": "assistant", "content": text})
        forced_end = [] if stopped else [stop]
        outcome = e.env.step(parse_tool_calls(text, cfg.tool_format))
        if outcome.done or turn == cfg.max_turns - 1:
          e.extend(forced_end, generated=False)
          e.reward = float(outcome.reward if outcome.done else e.env.finish())
          e.done = True
          if manager is not None:
            manager.set_reward(e.last_interaction, e.reward, suffix=forced_end)
          finished.append(e)
        else:
          e.messages += outcome.observation
          e.extend(forced_end + tokenizer.encode(
              continuation_text(outcome.observation, cfg.template, e.tools)), generated=False)
          nxt.append(e)
    live = nxt
    if not live:
      break
  groups: list[list[Any]] = [[] for _ in tasks]
  for e in sorted(finished, key=lambda e: e.branch_id):
    groups[e.group].append(e)
  return groups
