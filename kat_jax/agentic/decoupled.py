"""Rollouts outside the trainer's process: weight snapshots and an OpenAI-compatible server.

In process, rollouts run beside the trainer on `kat_jax.rl.pipeline.RolloutPipeline`
(`agentic.max_staleness`, weights pushed in memory after every update). For rollouts made
elsewhere (SeamlessFlow, arXiv 2508.11553, separates them the same way), this module gives
the two ends: `WeightStore`, numbered weight snapshots in a directory, written atomically,
that another process can poll; and `server_rollout`, `tree_rollout`'s episodes sampled
through `OpenAICompletionsClient` from an OpenAI-compatible server (e.g. vLLM, with token ids
and log-probs in its replies), recorded in a `TrajectoryManager` like in-process rollouts.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

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
