"""A test reference: tree rollout turns run turn by turn (a barrier between turns).

The driver `kat_jax.agentic.rollout` used before its turns stopped waiting for each other,
with its request keys derived as the rollout's are now (`_tree_index`), so the two must give
the same episodes and trajectory-manager records. Swap it in for `rollout._run_turns`.
"""

import concurrent.futures
import copy
import time

import jax

# pylint: disable-next=protected-access
from kat_jax.agentic.rollout import Episode, RolloutConfig, _close_turn, _env_turn, _tree_index
from kat_jax.agentic.tool_calls import parse_tool_calls
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.sampling import Engine, Request


def run_turns_with_barrier(engine: Engine, live: list[Episode], news: list[list[int]],
                           tokenizer: Tokenizer, rng: jax.Array, cfg: RolloutConfig,
                           manager: TrajectoryManager | None,
                           pool: concurrent.futures.Executor) -> tuple[list[Episode], float]:
  """`tree_rollout`'s turns with a turn barrier, the rollout's earlier driver: each turn is
  one `Engine.run` over every live episode, and the next turn starts after all of them ended
  (environment steps start in the run as samples end). Request keys as the rollout's."""
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
                                 rng=jax.random.fold_in(key, _tree_index(
                                     parent.group, parent.branch_id, cfg)),
                                 keep=not last_turn, continue_from=seq))
           for parent, new, seq in zip(live, news, sequences)]
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
        wait_start = time.perf_counter()
        step = steps[sid].result()
        env_wait += time.perf_counter() - wait_start
        ended, suffix = _close_turn(episode, result, texts[sid], step, last_turn, tokenizer, cfg)
        if ended:
          if manager is not None:
            manager.set_reward(episode.last_interaction, episode.reward, suffix=suffix)
          finished.append(episode)
          if result.sequence is not None:
            engine.release(result.sequence)
        else:
          next_live.append(episode)
          news.append(suffix)
          sequences.append(result.sequence)
    live = next_live
    if not live:
      break
  return finished, env_wait
