"""Tree rollouts: multi-turn tool-use episodes that branch at chosen turns, on the rollout engine.

    groups = tree_rollout(sampler, dparams, make_env, tasks, tokenizer, rng, RolloutConfig(
        branching=(2, 2), max_turns=4, max_new_tokens=64))
    trajectories = [[e.trajectory(adv) for e, adv in ...] for group in groups]

Every task's prompt is prefilled once into the engine's paged KV cache (`kat_jax.sampling.
Engine`). A turn is one engine request per live episode: its new tokens (the prompt, or the
previous turn's observation), then `branching[t]` samples that share every page before them
(copy-on-write), each kept (`Request(keep=True)`) for the next turn; an ended episode's pages
are released. So the episodes of a task form a tree: everything before a branch is one shared
token list with one set of behaviour log-probs, which `kat_jax.rl.tree.build_trees` then
merges back into one trie path. Each turn: decode (per-token log-probs and entropies
recorded); as each sample ends, parse its tool calls and step its environment (and score an
episode the turn limit or max_length cuts off) on a thread pool
while the others still decode; then append each observation rendered by the chat template
(mask 0) to its episode's kept sequence.

Token layout of an episode (qwen2.5 template), matching `render_chat(messages)` exactly:

    prompt ids (system/tools + user + "<|im_start|>assistant\\n")          mask 0
    generated ids, ending with <|im_end|> when the model stopped          mask 1
    [<|im_end|> when the turn hit max_new_tokens]                          mask 0
    "\\n<|im_start|>user\\n<tool_response>\\n...<|im_end|>\\n<|im_start|>assistant\\n"  mask 0
    ... next turns ...
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from kat_jax.agentic.environments import Environment, Message, StepResult
from kat_jax.agentic.tool_calls import ParsedAction, parse_tool_calls
from kat_jax.rl.pipeline import RolloutWeights
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.rl.tree import Trajectory
from kat_jax.data.chat_template import render_chat, tokenize_chat
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.sampling import DecodeParams, Engine, EngineSampler, Request, Sampler, SamplingParams


_ENV_WORKERS = 8  # environment steps running at once (tool calls, reward checks)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """branching[t]: copies of every live episode made before turn t (1 past the tuple)."""

  branching: tuple[int, ...] = (4,)
  max_turns: int = 4
  max_new_tokens: int = 64
  max_length: int = 1024  # tokens per episode (prompt + all turns)
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
  record_group: int | None = None  # its TrajectoryManager group (tree_rollout's manager)
  last_interaction: int | None = None  # the id its latest turn was recorded under

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
                   list(self.entropies), self.reward, self.turns, self.done, self.branch_id,
                   self.record_group, self.last_interaction)


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


@contextlib.contextmanager
def _receiving(weights: RolloutWeights | None, engine: Engine) -> Iterator[None]:
  """While inside, pushes of `weights` reach `engine` (its requests in flight continue under
  the new weights: partial rollouts)."""
  if weights is None:
    yield
    return
  weights.attach(engine)
  try:
    yield
  finally:
    weights.detach(engine)


def _engine(sampler: Sampler | EngineSampler, params: DecodeParams, version: int, episodes: int,
            max_length: int) -> Engine:
  """An engine with the sampler's model, pad id and prefill chunk (an EngineSampler's slots
  and page size; a static Sampler's: one slot per episode), its pool room for every episode
  at max_length (shared pages make the real use smaller)."""
  slots, page_size = ((sampler.num_slots, sampler.page_size) if isinstance(sampler, EngineSampler)
                      else (min(episodes, 64), 16))
  pages = episodes * (-(-max_length // page_size) + 1) + 2
  return Engine(sampler.config, params, num_slots=slots, num_pages=pages, page_size=page_size,
                prefill_chunk=sampler.prefill_chunk, pad_id=sampler.pad_id, version=version)


def _max_episodes(num_tasks: int, cfg: RolloutConfig) -> int:
  """Episodes alive at once at most: every task branched at every turn."""
  count = num_tasks
  for turn in range(cfg.max_turns):
    count *= cfg.branching[turn] if turn < len(cfg.branching) else 1
  return count


def tree_rollout(sampler: Sampler | EngineSampler, params: DecodeParams | RolloutWeights,
                 make_env: Callable[[], Environment], tasks: Sequence[Any],
                 tokenizer: Tokenizer, rng: jax.Array, cfg: RolloutConfig,
                 manager: TrajectoryManager | None = None,
                 stats: dict[str, float] | None = None) -> list[list[Episode]]:
  """Runs one tree of episodes per task -> groups[task] = its finished episodes.

  sampler gives the engine's settings (model config, pad id, prefill chunk; an EngineSampler
  also its slots and page size); the rollout always runs on a `kat_jax.sampling.Engine`.
  params: decode params (version 0), or the RL pipeline's `RolloutWeights`: the
  rollout starts with `current()` and the engine takes every push while it runs, so an
  episode in flight at a weight update continues under the new weights.
  Each sample's environment step (tool call, reward check) starts as soon as the sample
  ends, on a thread pool, while the turn's other samples still decode; `stats` (if given)
  gets `env_wait_s`, the seconds waited for them after the turns' generation ended.
  With a `manager`, every task gets a new manager group (`Episode.record_group`), every
  sampled turn is recorded (prompt = the episode's tokens before the turn; weight versions
  from `Completion.versions` where the engine gives them, else 0) and each finished
  episode's reward is set on its last turn (`Episode.last_interaction`), with the
  end-of-turn token forced after a cut-off last turn as the trajectory's closing suffix."""
  live: list[Episode] = []
  news: list[list[int]] = []  # per live episode: tokens to prefill before its next turn
  for g, task in enumerate(tasks):
    env = make_env()
    messages = env.reset(task)
    tools = list(env.tools)
    prompt = tokenize_chat(tokenizer, messages, tools=tools or None, template=cfg.template,
                           add_generation_prompt=True).ids
    if len(prompt) + cfg.max_new_tokens > cfg.max_length:
      raise ValueError(f"task {g}: its prompt fills {len(prompt)} of max_length "
                       f"{cfg.max_length} tokens, leaving no room for {cfg.max_new_tokens} new "
                       "tokens; raise max_length")
    episode = Episode(g, env, list(messages), tools, [], [], [], [])
    if manager is not None:
      episode.record_group = manager.new_group()
    episode.extend(prompt, generated=False)
    live.append(episode)
    news.append(list(prompt))
  weights = params if isinstance(params, RolloutWeights) else None
  dparams, version = weights.current() if weights is not None else (params, 0)
  engine = _engine(sampler, dparams, version, _max_episodes(len(tasks), cfg), cfg.max_length)
  with _receiving(weights, engine), concurrent.futures.ThreadPoolExecutor(
      max_workers=max(1, min(_ENV_WORKERS, len(live) * max(cfg.branching)))) as pool:
    finished, env_wait = _run_turns(engine, live, news, tokenizer, rng, cfg, manager, pool)
  if stats is not None:
    stats["env_wait_s"] = stats.get("env_wait_s", 0.0) + env_wait
  groups: list[list[Episode]] = [[] for _ in tasks]
  for episode in sorted(finished, key=lambda e: e.branch_id):
    groups[episode.group].append(episode)
  return groups


def _run_turns(engine: Engine, live: list[Episode], news: list[list[int]], tokenizer: Tokenizer,
               rng: jax.Array, cfg: RolloutConfig, manager: TrajectoryManager | None,
               pool: concurrent.futures.Executor) -> tuple[list[Episode], float]:
  """The turns of `tree_rollout`: live episodes (with the tokens each prefills before its
  next turn) -> (every finished episode, seconds waited for environment steps after the
  turns' generation ended)."""
  stop = tokenizer.im_end_id
  env_wait = 0.0
  sequences: list[int | None] = [None] * len(live)  # each live episode's kept KV
  finished: list[Episode] = []

  for turn in range(cfg.max_turns):
    copies = cfg.branching[turn] if turn < len(cfg.branching) else 1
    last_turn = turn == cfg.max_turns - 1
    rng, key = jax.random.split(rng)
    ids = [engine.submit(Request(new, cfg.max_new_tokens, sampling=cfg.sampling,
                                 stop_ids=(stop,), num_samples=copies,
                                 rng=jax.random.fold_in(key, i), keep=not last_turn,
                                 continue_from=seq))
           for i, (new, seq) in enumerate(zip(news, sequences))]
    # Copies are made before any branch's turn changes the episode.
    families = [[parent] + [copy.deepcopy(parent) for _ in sample_ids[1:]]
                for parent, sample_ids in zip(live, ids)]
    episode_of = {sid: e for family, sample_ids in zip(families, ids)
                  for e, sid in zip(family, sample_ids)}
    texts, steps = {}, {}

    def start_step(sid: int, result) -> None:
      """A sample that ended: its environment step (tool call, reward check) starts now, on
      the pool, while the other samples still decode."""
      if result.error is None:
        texts[sid] = tokenizer.decode(result.tokens[:-1] if result.stopped else result.tokens)
        # Cut off whatever the step returns: the turn limit, or no room for another turn.
        cut_off = last_turn or (len(episode_of[sid].tokens) + len(result.tokens)
                                + cfg.max_new_tokens > cfg.max_length)
        steps[sid] = pool.submit(_env_turn, episode_of[sid].env,
                                 parse_tool_calls(texts[sid], cfg.tool_format), cut_off)

    done = engine.run(on_finish=start_step)
    next_live, news, sequences = [], [], []
    for branches, sample_ids in zip(families, ids):
      for c, (episode, sid) in enumerate(zip(branches, sample_ids)):
        result = done[sid]
        if result.error is not None:
          raise ValueError(f"episode of task {episode.group}: {result.error}")
        episode.branch_id += (c,)
        tokens = result.tokens
        if manager is not None:
          episode.last_interaction = manager.record(
              episode.record_group, episode.tokens, tokens, result.logprobs,
              getattr(result, "versions", None), result.entropies)
        episode.extend(tokens, generated=True, logprobs=result.logprobs,
                       entropies=result.entropies)
        episode.turns += 1
        episode.messages.append({"role": "assistant", "content": texts[sid]})
        forced_end = [] if result.stopped else [stop]
        wait_start = time.perf_counter()
        outcome, cut_off_reward = steps[sid].result()
        env_wait += time.perf_counter() - wait_start
        suffix = []
        if not outcome.done:
          episode.messages += outcome.observation
          suffix = forced_end + tokenizer.encode(
              continuation_text(outcome.observation, cfg.template, episode.tools))
        too_long = len(episode.tokens) + len(suffix) + cfg.max_new_tokens > cfg.max_length
        if outcome.done or last_turn or too_long:
          if not outcome.done:  # cut off by the turn limit or max_length: drop the observation
            del episode.messages[len(episode.messages) - len(outcome.observation):]
            outcome.reward = (episode.env.finish() if cut_off_reward is None
                              else cut_off_reward)
          episode.extend(forced_end, generated=False)
          episode.reward, episode.done = float(outcome.reward), True
          if manager is not None:
            manager.set_reward(episode.last_interaction, episode.reward, suffix=forced_end)
          finished.append(episode)
          if result.sequence is not None:
            engine.release(result.sequence)
        else:
          episode.extend(suffix, generated=False)
          next_live.append(episode)
          news.append(suffix)
          sequences.append(result.sequence)
    live = next_live
    if not live:
      break
  return finished, env_wait


def _env_turn(env: Environment, action: ParsedAction,
              cut_off: bool) -> tuple[StepResult, float | None]:
  """One sample's environment step, run on the pool -> (its outcome, the episode's
  `finish()` reward if the step left it open and `cut_off` says no turn can follow, else
  None). Scoring a cut-off episode (a code task runs its tests) thus overlaps decoding too."""
  outcome = env.step(action)
  return outcome, (env.finish() if cut_off and not outcome.done else None)
