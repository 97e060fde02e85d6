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
merges back into one trie path. As each sample ends (per-token log-probs and entropies
recorded), its tool calls are parsed and its environment stepped (an episode the turn limit
or max_length cuts off is scored) on a thread pool; when that step returns, the observation
rendered by the chat template (mask 0) is appended to the episode's kept sequence and its
next turn is submitted at once. There is no turn barrier: an episode never waits for other
episodes' turns, so its next turn takes slots that a barrier would leave idle while each
turn's longest samples finish (with long-tailed response lengths a barrier makes the rollout
last about the sum over turns of each turn's longest sample). Each turn's request key follows
from the episode's identity (task, turn, branch ids), so the samples do not depend on the
order in which turns or environment steps end.

Token layout of an episode (qwen2.5 template), matching `render_chat(messages)` exactly:

    prompt ids (system/tools + user + "<|im_start|>assistant\\n")          mask 0
    generated ids, ending with <|im_end|> when the model stopped          mask 1
    [<|im_end|> when the turn hit max_new_tokens]                          mask 0
    "\\n<|im_start|>user\\n<tool_response>\\n...<|im_end|>\\n<|im_start|>assistant\\n"  mask 0
    ... next turns ...
"""

from __future__ import annotations

import collections
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
    count *= _copies(cfg, turn)
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
  ends, on a thread pool, and the episode's next turn as soon as that step returns, while
  other episodes still decode (no turn barrier); `stats` (if given) gets `env_wait_s`, the
  seconds the engine had nothing to decode and waited for environment steps.
  With a `manager`, every task gets a new manager group (`Episode.record_group`), every
  sampled turn is recorded, in turn-then-branch order within a group whatever order turns
  end in (`_Recorder`; prompt = the episode's tokens before the turn; weight versions
  from `Completion.versions` where the engine gives them, else 0) and each finished
  episode's reward is set on its last turn (`Episode.last_interaction`), with the
  end-of-turn token forced after a cut-off last turn as the trajectory's closing suffix."""
  live = [_start_episode(g, task, make_env, tokenizer, cfg, manager)
          for g, task in enumerate(tasks)]
  news = [list(e.tokens) for e in live]  # per live episode: tokens its first turn prefills
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


def _start_episode(group: int, task: Any, make_env: Callable[[], Environment],
                   tokenizer: Tokenizer, cfg: RolloutConfig,
                   manager: TrajectoryManager | None) -> Episode:
  """Task `group`'s root episode: a fresh environment reset to `task`, its prompt tokens
  (chat template + assistant header) and, with a manager, a new manager group."""
  env = make_env()
  messages = env.reset(task)
  tools = list(env.tools)
  prompt = tokenize_chat(tokenizer, messages, tools=tools or None, template=cfg.template,
                         add_generation_prompt=True).ids
  if len(prompt) + cfg.max_new_tokens > cfg.max_length:
    raise ValueError(f"task {group}: its prompt fills {len(prompt)} of max_length "
                     f"{cfg.max_length} tokens, leaving no room for {cfg.max_new_tokens} new "
                     "tokens; raise max_length")
  episode = Episode(group, env, list(messages), tools, [], [], [], [])
  if manager is not None:
    episode.record_group = manager.new_group()
  episode.extend(prompt, generated=False)
  return episode


def _copies(cfg: RolloutConfig, turn: int) -> int:
  """Samples each live episode draws at `turn` (its branching factor)."""
  return cfg.branching[turn] if turn < len(cfg.branching) else 1


def _tree_index(group: int, branch_id: tuple[int, ...], cfg: RolloutConfig) -> int:
  """An episode's place among every episode its turn len(branch_id) could have (each task
  branched at every earlier turn, none ended): the index that turn's request key is folded
  with. It follows from the episode's identity alone, so a sample does not depend on which
  other episodes are alive or on the order turns end in; while no episode has ended it is
  the episode's place in the turn's live list, the index a turn-by-turn rollout used."""
  index = group
  for turn, copy_index in enumerate(branch_id):
    index = index * _copies(cfg, turn) + copy_index
  return index


@dataclasses.dataclass
class _TurnEnd:
  """A sample that ended, its environment step running on the pool."""
  episode: Episode
  turn: int
  result: Any  # the engine's Completion
  text: str
  step: concurrent.futures.Future


class _Recorder:
  """Records a tree rollout's turns in the manager in one fixed order per group, whatever
  order they end in: turn by turn, branch ids ascending (the order a turn-by-turn rollout
  records them in). The manager lists a group's trajectories depth-first, children in record
  order, so that order then does not depend on timing. A turn is recorded once every turn
  before it in that order is recorded or known never to run."""

  def __init__(self, manager: TrajectoryManager, cfg: RolloutConfig):
    self.manager, self.cfg = manager, cfg
    self.expected: dict[int, collections.deque] = {}  # group -> branch ids to record, in order
    self.following: dict[int, list[tuple[int, ...]]] = {}  # group -> the next turn's ids
    self.waiting: dict[int, dict[tuple[int, ...], tuple]] = {}  # group -> ended, unrecorded

  def start(self, episode: Episode) -> None:
    group = episode.record_group
    self.expected[group] = collections.deque((c,) for c in range(_copies(self.cfg, 0)))
    self.following[group], self.waiting[group] = [], {}

  def ended(self, episode: Episode, prompt: np.ndarray, result, continues: bool,
            suffix: Sequence[int] = ()) -> None:
    """Episode's turn ended (its branch id includes the turn): record it when its turn comes;
    continues=False: the episode ended, its reward (set by then) is recorded with `suffix`."""
    group = episode.record_group
    self.waiting[group][episode.branch_id] = (episode, prompt, result, continues, list(suffix))
    expected, waiting = self.expected[group], self.waiting[group]
    while True:
      if not expected:  # the turn is recorded whole: every id of the next one is known
        if not self.following[group]:
          return
        expected.extend(self.following[group])
        self.following[group] = []
      if expected[0] not in waiting:
        return
      branch_id = expected.popleft()
      turn_of, prompt, result, continues, suffix = waiting.pop(branch_id)
      turn_of.last_interaction = self.manager.record(
          group, prompt, result.tokens, result.logprobs, getattr(result, "versions", None),
          result.entropies)
      if continues:
        self.following[group] += [branch_id + (c,)
                                  for c in range(_copies(self.cfg, len(branch_id)))]
      else:
        self.manager.set_reward(turn_of.last_interaction, turn_of.reward, suffix=suffix)

  def check_done(self) -> None:
    """Raises if a turn that ended was never recorded (a turn before it never ended)."""
    left = {g: sorted(w) for g, w in self.waiting.items() if w}
    if left:
      raise RuntimeError(f"turns ended but never recorded (group: branch ids): {left}")


def _close_turn(episode: Episode, result: Any, text: str, step: tuple[StepResult, float | None],
               last_turn: bool, tokenizer: Tokenizer, cfg: RolloutConfig
               ) -> tuple[bool, list[int]]:
  """Appends a turn to `episode`: its sample (`result`, a Completion; `text` its decoded
  reply) and its environment step (`step`: `_env_turn`'s outcome and cut-off reward).
  -> (True, the closing tokens) when the episode ended (reward set; the end-of-turn token
  forced after a reply the engine cut), else (False, the tokens its next turn prefills:
  the rendered observation)."""
  episode.extend(result.tokens, generated=True, logprobs=result.logprobs,
                 entropies=result.entropies)
  episode.turns += 1
  episode.messages.append({"role": "assistant", "content": text})
  forced_end = [] if result.stopped else [tokenizer.im_end_id]
  outcome, cut_off_reward = step
  suffix = []
  if not outcome.done:
    episode.messages += outcome.observation
    suffix = forced_end + tokenizer.encode(
        continuation_text(outcome.observation, cfg.template, episode.tools))
  too_long = len(episode.tokens) + len(suffix) + cfg.max_new_tokens > cfg.max_length
  if not (outcome.done or last_turn or too_long):
    episode.extend(suffix, generated=False)
    return False, suffix
  if not outcome.done:  # cut off by the turn limit or max_length: drop the observation
    del episode.messages[len(episode.messages) - len(outcome.observation):]
    outcome.reward = episode.env.finish() if cut_off_reward is None else cut_off_reward
  episode.extend(forced_end, generated=False)
  episode.reward, episode.done = float(outcome.reward), True
  return True, forced_end


def _run_turns(engine: Engine, live: list[Episode], news: list[list[int]], tokenizer: Tokenizer,
               rng: jax.Array, cfg: RolloutConfig, manager: TrajectoryManager | None,
               pool: concurrent.futures.Executor) -> tuple[list[Episode], float]:
  """The turns of `tree_rollout`, without a turn barrier: live episodes (with the tokens each
  prefills before its first turn) -> (every finished episode, seconds the engine sat idle
  waiting for environment steps).

  One thread drives the engine (`Engine.step`). Between scheduler rounds, each sample that
  ended starts its environment step on the pool, and each environment step that is done
  closes its turn and, if the episode goes on, submits the next turn at once (continuing the
  sample's kept KV), while the other episodes' turns still decode. Turn t's request key is
  fold_in(turn_keys[t], `_tree_index`) (turn_keys: the split chain of `rng`), so the sampled
  tokens do not depend on the order in which turns or environment steps end."""
  stop = tokenizer.im_end_id
  turn_keys = []
  for _ in range(cfg.max_turns):
    rng, key = jax.random.split(rng)
    turn_keys.append(key)
  recorder = _Recorder(manager, cfg) if manager is not None else None
  owners: dict[int, tuple[Episode, int]] = {}  # sample id -> (its episode, turn)
  in_flight: list[_TurnEnd] = []
  finished: list[Episode] = []
  env_wait = 0.0

  def submit_turn(episode: Episode, new: list[int], sequence: int | None, turn: int) -> None:
    copies = _copies(cfg, turn)
    key = jax.random.fold_in(turn_keys[turn],
                             _tree_index(episode.group, episode.branch_id, cfg))
    ids = engine.submit(Request(new, cfg.max_new_tokens, sampling=cfg.sampling,
                                stop_ids=(stop,), num_samples=copies, rng=key,
                                keep=turn < cfg.max_turns - 1, continue_from=sequence))
    for branch, sid in zip(_fork(episode, len(ids)), ids):
      owners[sid] = (branch, turn)

  def sample_ended(sid: int, result) -> None:
    """Its environment step (tool call, reward check) starts now, on the pool."""
    episode, turn = owners.pop(sid)
    if result.error is not None:
      raise ValueError(f"episode of task {episode.group}: {result.error}")
    text, action, cut_off = _reply(episode, result, turn, tokenizer, cfg)
    in_flight.append(_TurnEnd(episode, turn, result, text, pool.submit(
        _env_turn, episode.env, action, cut_off)))

  def step_ended(end: _TurnEnd) -> None:
    """Closes the turn: the episode ends or starts its next turn."""
    episode, result = end.episode, end.result
    prompt = np.asarray(episode.tokens, np.int64)
    ended, tokens = _close_turn(episode, result, end.text, end.step.result(),
                               end.turn == cfg.max_turns - 1, tokenizer, cfg)
    if recorder is not None:
      recorder.ended(episode, prompt, result, continues=not ended, suffix=tokens if ended else ())
    if ended:
      finished.append(episode)
      if result.sequence is not None:
        engine.release(result.sequence)
    else:
      submit_turn(episode, tokens, result.sequence, end.turn + 1)

  for episode, new in zip(live, news):
    if recorder is not None:
      recorder.start(episode)
    submit_turn(episode, new, None, 0)
  while True:
    progressed = False
    for sid, result in sorted(engine.take_finished().items()):
      sample_ended(sid, result)
      progressed = True
    for end in [e for e in in_flight if e.step.done()]:
      in_flight.remove(end)
      step_ended(end)
      progressed = True
    if engine.busy:
      engine.step()
    elif in_flight:  # nothing to decode until an environment step returns
      wait_start = time.perf_counter()
      concurrent.futures.wait([e.step for e in in_flight],
                              return_when=concurrent.futures.FIRST_COMPLETED)
      env_wait += time.perf_counter() - wait_start
    elif not progressed:
      break
  if recorder is not None:
    recorder.check_done()
  return finished, env_wait


def _fork(episode: Episode, copies: int) -> list[Episode]:
  """The branches of a turn with `copies` samples: the episode and copies - 1 deep copies of
  it, made before any branch's turn changes it; branch c's id gains c."""
  family = [episode] + [copy.deepcopy(episode) for _ in range(copies - 1)]
  for c, branch in enumerate(family):
    branch.branch_id += (c,)
  return family


def _reply(episode: Episode, result: Any, turn: int, tokenizer: Tokenizer,
           cfg: RolloutConfig) -> tuple[str, ParsedAction, bool]:
  """A sampled turn of `episode` (`result`: its Completion, not yet in the episode) -> (the
  reply's text without the end-of-turn token, its parsed tool calls, cut_off: the episode
  ends whatever its environment step returns, at the turn limit or with no room for
  another turn)."""
  text = tokenizer.decode(result.tokens[:-1] if result.stopped else result.tokens)
  cut_off = turn == cfg.max_turns - 1 or (len(episode.tokens) + len(result.tokens)
                                          + cfg.max_new_tokens > cfg.max_length)
  return text, parse_tool_calls(text, cfg.tool_format), cut_off


def _env_turn(env: Environment, action: ParsedAction,
              cut_off: bool) -> tuple[StepResult, float | None]:
  """One sample's environment step, run on the pool -> (its outcome, the episode's
  `finish()` reward if the step left it open and `cut_off` says no turn can follow, else
  None). Scoring a cut-off episode (a code task runs its tests) thus overlaps decoding too."""
  outcome = env.step(action)
  return outcome, (env.finish() if cut_off and not outcome.done else None)
