"""Tree rollouts: multi-turn tool-use episodes that branch at chosen turns, over one KV cache.

    groups = tree_rollout(sampler, dparams, make_env, tasks, tokenizer, rng, RolloutConfig(
        branching=(2, 2), max_turns=4, max_new_tokens=64))
    trajectories = [[e.trajectory(adv) for e, adv in ...] for group in groups]

Every task is prefilled once; before turn t every live episode is forked `branching[t]` times
(its cache rows copied with `take_rows`, its environment deep-copied), so the episodes of a
task form a tree: everything before a fork is one shared token list with one set of
behaviour log-probs, which `kat_jax.rl.tree.build_trees` then merges back into one trie
path. Each turn: decode (per-token log-probs and entropies recorded), parse the tool calls,
step the environment, and append the observation rendered by the chat template (mask 0) to
the cache with `Sampler.extend`.

Token layout of an episode (qwen2.5 template), matching `render_chat(messages)` exactly:

    prompt ids (system/tools + user + "<|im_start|>assistant\\n")          mask 0
    generated ids, ending with <|im_end|> when the model stopped          mask 1
    [<|im_end|> when the turn hit max_new_tokens]                          mask 0
    "\\n<|im_start|>user\\n<tool_response>\\n...<|im_end|>\\n<|im_start|>assistant\\n"  mask 0
    ... next turns ...
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from kat_jax.agentic.environments import Environment, Message
from kat_jax.agentic.tool_calls import parse_tool_calls
from kat_jax.rl.tree import Trajectory
from kat_jax.data.chat_template import render_chat, tokenize_chat
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.sampling import DecodeParams, DecodeState, Sampler, SamplingParams
from kat_jax.sampling.sampler import extension_width  # the cache slots an extend takes


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """branching[t]: copies of every live episode made before turn t (1 past the tuple)."""

  branching: tuple[int, ...] = (4,)
  max_turns: int = 4
  max_new_tokens: int = 64
  max_length: int = 1024  # KV-cache slots per episode (prompt + all turns)
  sampling: SamplingParams = SamplingParams(1.0)
  template: str = "qwen2.5"
  tool_format: str = "qwen2.5"

  def __post_init__(self):
    if any(b < 1 for b in self.branching):
      raise ValueError(f"branching factors must be >= 1, got {self.branching}")
    if self.max_turns < 1 or self.max_new_tokens < 1:
      raise ValueError("max_turns and max_new_tokens must be >= 1")


@dataclasses.dataclass
class Episode:
  """One trajectory of a tree rollout (lists grow turn by turn; copied on a fork)."""

  group: int
  env: Environment
  messages: list[Message]
  tools: list[dict[str, Any]]
  tokens: list[int]
  loss_mask: list[int]
  logprobs: list[float]
  entropies: list[float]
  reward: float = 0.0
  turns: int = 0
  done: bool = False
  branch_id: tuple[int, ...] = ()  # which copy it was at each turn's fork

  def extend(self, ids: Sequence[int], *, generated: bool, logprobs=None, entropies=None):
    n = len(ids)
    self.tokens += [int(i) for i in ids]
    self.loss_mask += [int(generated)] * n
    self.logprobs += [0.0] * n if logprobs is None else [float(x) for x in logprobs]
    self.entropies += [0.0] * n if entropies is None else [float(x) for x in entropies]

  def trajectory(self, advantage: float | np.ndarray) -> Trajectory:
    return Trajectory(self.tokens, self.loss_mask, advantage, self.logprobs)

  @property
  def entropy_array(self) -> np.ndarray:
    return np.asarray(self.entropies, np.float32)

  def __deepcopy__(self, memo):
    # Token lists and the environment are copied; tool schemas are shared (read-only).
    return Episode(self.group, copy.deepcopy(self.env, memo), copy.deepcopy(self.messages, memo),
                   self.tools, list(self.tokens), list(self.loss_mask), list(self.logprobs),
                   list(self.entropies), self.reward, self.turns, self.done, self.branch_id)


def continuation_text(observation: Sequence[Message], template: str = "qwen2.5",
                      tools: Sequence[dict] | None = None) -> str:
  """Text after an assistant turn's `<|im_end|>`: the observation turn + assistant header.

  Cut out of `render_chat` itself, so the episode's tokens always equal the rendered chat.
  """
  base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
  before = render_chat(base, tools=tools or None, template=template)
  after = render_chat(base + list(observation), tools=tools or None, template=template,
                      add_generation_prompt=True)
  if not after.startswith(before) or not before.endswith("<|im_end|>\n"):
    raise ValueError(f"template {template!r} does not render multi-turn chats prefix-stably; "
                     "use 'qwen2.5'")
  return after[len(before) - 1:]


def take_rows(state: DecodeState, rows: Sequence[int]) -> DecodeState:
  """The cache rows `rows` (repeats fork, omissions drop finished episodes)."""
  index = np.asarray(rows, np.int32)
  return jax.tree.map(lambda x: x[index], state)


def tree_rollout(sampler: Sampler, params: DecodeParams,
                 make_env: Callable[[], Environment], tasks: Sequence[Any],
                 tokenizer: Tokenizer, rng: jax.Array, cfg: RolloutConfig) -> list[list[Episode]]:
  """Runs one tree of episodes per task -> groups[task] = its finished episodes."""
  stop = tokenizer.im_end_id
  live: list[Episode] = []
  for g, task in enumerate(tasks):
    env = make_env()
    messages = env.reset(task)
    tools = list(env.tools)
    prompt = tokenize_chat(tokenizer, messages, tools=tools or None, template=cfg.template,
                           add_generation_prompt=True).ids
    episode = Episode(g, env, list(messages), tools, [], [], [], [])
    episode.extend(prompt, generated=False)
    live.append(episode)
  state = sampler.prefill(params, [e.tokens for e in live], max_length=cfg.max_length)
  if state.end + cfg.max_new_tokens > cfg.max_length:
    raise ValueError(f"the prompts fill {state.end} of max_length {cfg.max_length} cache slots, "
                     f"leaving no room for {cfg.max_new_tokens} new tokens; raise max_length")
  finished: list[Episode] = []

  for turn in range(cfg.max_turns):
    copies = cfg.branching[turn] if turn < len(cfg.branching) else 1
    if copies > 1:
      state = take_rows(state, [i for i in range(len(live)) for _ in range(copies)])
      live = [e if c == 0 else copy.deepcopy(e) for e in live for c in range(copies)]
    for i, e in enumerate(live):
      e.branch_id = e.branch_id + (i % copies,)
    rng, key = jax.random.split(rng)
    result, state = sampler.decode(params, state, key, max_new_tokens=cfg.max_new_tokens,
                                   sampling=cfg.sampling, stop_ids=(stop,))
    tokens, logprobs, entropies, stopped = jax.device_get(
        (result.tokens, result.logprobs, result.entropies, result.stopped))
    lengths = result.lengths
    last_turn = turn == cfg.max_turns - 1
    room = cfg.max_length - state.end - cfg.max_new_tokens
    keep, continuations = [], []
    for i, episode in enumerate(live):
      n = int(lengths[i])
      episode.extend(tokens[i, :n], generated=True, logprobs=logprobs[i, :n],
                     entropies=entropies[i, :n])
      episode.turns += 1
      text = tokenizer.decode(tokens[i, :n - 1] if stopped[i] else tokens[i, :n])
      episode.messages.append({"role": "assistant", "content": text})
      forced_end = [] if stopped[i] else [stop]
      outcome = episode.env.step(parse_tool_calls(text, cfg.tool_format))
      suffix = []
      if not outcome.done:
        episode.messages += outcome.observation
        suffix = forced_end + tokenizer.encode(
            continuation_text(outcome.observation, cfg.template, episode.tools))
      if outcome.done or last_turn or extension_width(len(suffix), sampler.prefill_chunk) > room:
        if not outcome.done:  # cut off by the turn limit or the cache: drop the observation
          del episode.messages[len(episode.messages) - len(outcome.observation):]
          outcome.reward = episode.env.finish()
        episode.extend(forced_end, generated=False)
        episode.reward, episode.done = float(outcome.reward), True
        finished.append(episode)
      else:
        episode.extend(suffix, generated=False)
        keep.append(i)
        continuations.append(suffix)
    if not keep:
      break
    state = take_rows(state, keep)
    live = [live[i] for i in keep]
    state = sampler.extend(params, state, continuations)

  groups: list[list[Episode]] = [[] for _ in tasks]
  for episode in sorted(finished, key=lambda e: e.branch_id):
    groups[episode.group].append(episode)
  return groups
