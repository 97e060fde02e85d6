"""Rollouts outside the trainer's process: weight snapshots and an OpenAI-compatible server.

In process, rollouts run beside the trainer on `kat_jax.rl.pipeline.RolloutPipeline`
(`agentic.max_staleness`, weights pushed in memory after every update). For rollouts made
elsewhere (SeamlessFlow, arXiv 2508.11553, separates them the same way), this module gives
the two ends: `WeightStore`, numbered weight snapshots in a directory, written atomically,
that another process can poll; and `server_rollout`, `tree_rollout`'s episodes sampled
through `OpenAICompletionsClient` from an OpenAI-compatible server (e.g. vLLM, with token ids
and log-probs in its replies), many requests in flight at once, recorded in a
`TrajectoryManager` like in-process rollouts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from kat_jax.agentic.environments import Environment
from kat_jax.agentic.rollout import (Episode, RolloutConfig, _close_turn, _copies, _env_turn,
                                     _fork, _Recorder, _reply, _start_episode)
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.openai_http import post_json
from kat_jax.rl.trajectories import TrajectoryManager


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


@dataclasses.dataclass
class _ServerSample:
  """One sample of a server reply, shaped like the engine's Completion for `_close_turn`."""
  tokens: list[int]
  logprobs: list[float]
  entropies: list[float]  # the server returns none: 0
  stopped: bool  # ended by the end-of-turn token, which is its last token


def server_rollout(client: OpenAICompletionsClient, make_env: Callable[[], Environment],
                   tasks: Sequence[Any], tokenizer: Tokenizer, cfg: RolloutConfig,
                   manager: TrajectoryManager | None = None, *,
                   max_concurrency: int = 64) -> list[list[Episode]]:
  """`tree_rollout` through a server -> groups[task] = its finished episodes, by branch id.

  Every live episode asks for `branching[t]` samples of its turn t in one request; the
  server's prefix cache does the sharing. Each episode's chain of turns runs on a pool of
  `max_concurrency` threads: as a reply arrives the episode forks, each branch's
  environment step runs and its next request is sent as soon as that step returns, with no
  barrier between turns, so up to `max_concurrency` requests are in flight and the server
  can batch them. An episode ends when its environment says so, at `cfg.max_turns`, or when
  another turn would not fit `cfg.max_length` tokens (as in `tree_rollout`; a prompt that
  leaves no room for `max_new_tokens` is an error; this rollout used to ignore max_length).
  A failed request or environment step stops the rollout and is raised here. Entropies are
  not returned (left 0, so prefer a visit-based pruning score). `manager` records turns and
  rewards as `tree_rollout` does (turn-then-branch order within a group whatever order
  replies come in), with weight version 0.
  """
  if max_concurrency < 1:
    raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
  stop = tokenizer.im_end_id
  roots = [_start_episode(g, task, make_env, tokenizer, cfg, manager)
           for g, task in enumerate(tasks)]
  recorder = _Recorder(manager, cfg) if manager is not None else None
  lock = threading.Lock()  # guards the recorder (the manager's records) and `finished`
  finished: list[Episode] = []

  def request(episode: Episode, turn: int) -> list[tuple[Episode, _ServerSample]]:
    """Turn `turn`'s samples -> (branch, its sample) per copy; copies are made from the
    episode before any branch's turn changes it."""
    replies = client.complete(episode.tokens, n=_copies(cfg, turn),
                              max_tokens=cfg.max_new_tokens,
                              temperature=cfg.sampling.temperature, stop_ids=(stop,))
    return [(branch, _ServerSample(list(ids), list(logprobs), [0.0] * len(ids),
                                   stopped and bool(ids) and ids[-1] == stop))
            for branch, (ids, logprobs, stopped) in zip(_fork(episode, len(replies)), replies)]

  def run_branch(episode: Episode, sample: _ServerSample, turn: int
                 ) -> list[concurrent.futures.Future]:
    """Steps the branch's environment and closes its turn; if it goes on, sends its next
    request -> the futures of the next turn's branches."""
    text, action, cut_off = _reply(episode, sample, turn, tokenizer, cfg)
    step = _env_turn(episode.env, action, cut_off)
    prompt = np.asarray(episode.tokens, np.int64)
    ended, tokens = _close_turn(episode, sample, text, step, turn == cfg.max_turns - 1,
                                tokenizer, cfg)
    with lock:
      if recorder is not None:
        recorder.ended(episode, prompt, sample, continues=not ended,
                       suffix=tokens if ended else ())
      if ended:
        finished.append(episode)
    return [] if ended else start_turn(episode, turn + 1)

  def start_turn(episode: Episode, turn: int) -> list[concurrent.futures.Future]:
    return [pool.submit(run_branch, branch, sample, turn)
            for branch, sample in request(episode, turn)]

  if recorder is not None:
    for root in roots:
      recorder.start(root)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency) as pool:
    # A future's result is the futures it started; the rollout is done when none is left.
    pending = {pool.submit(start_turn, root, 0) for root in roots}
    try:
      while pending:
        done, pending = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          pending.update(future.result())
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
  if recorder is not None:
    recorder.check_done()
  groups: list[list[Episode]] = [[] for _ in tasks]
  for episode in sorted(finished, key=lambda e: e.branch_id):
    groups[episode.group].append(episode)
  return groups
