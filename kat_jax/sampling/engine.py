"""Rollout engine: continuous batching over a paged KV cache, with shared prefixes.

    engine = Engine(config, dparams, num_slots=64, num_pages=4096, page_size=16)
    ids = engine.submit(Request(prompt, max_new_tokens=1024, num_samples=8,
                                sampling=SamplingParams(1.0), stop_ids=tok.stop_ids, rng=key))
    done = engine.run()                  # {sample id: Completion}
    # multi-turn / tree rollouts (Request(keep=True) keeps a sample's KV when it ends):
    branches = engine.fork(done[i].sequence, 4)          # 4 sequences sharing every page
    engine.submit(Request(tool_output, max_new_tokens=256, continue_from=branches[0]))

A fixed number of decode slots run one jitted multi-step decode call at a time (`steps_per_call`
steps, pages reserved for them first), each slot at its own position. Between calls the host
takes finished samples out and refills their slots; prompts are prefilled in chunks
(`prefill_chunk` tokens, `prefill_chunks_per_call` chunks between two decode calls), so running
samples keep decoding. With `compact_widths`, a call with few busy slots moves them into the
lowest slots and runs only that many rows (the batch's long tail). The G samples of a request
share its prompt's pages (one prefill, one copy of the KV); the last, partial prompt page is
copied when a sample first writes into it.

Each sample gives the static `Sampler`'s result for its row: the same greedy tokens and the
same log-probs / entropies (tested); a sampled token comes from the request's own key stream
(`fold_in(fold_in(rng, sample), step)`), so it does not depend on slots or admission order.

A request the engine cannot run (a token or stop id outside the vocabulary, more tokens than
the positions or the page pool hold, ...) ends at once with `Completion.error` set; the other
requests are not affected.

Weight updates (off-policy RL): `Engine.set_params(params, version)` may be called from another
thread while `run()` / `step()` runs; each prefill chunk and decode call reads the
(params, version) pair once, so no call mixes weights. A request in flight at a weight update
continues under the new weights; its earlier KV stays (no recompute); every token records the
version it was sampled with (`Completion.versions`: the weights that computed the logits it was
drawn from, which for the first token of a decode call are the previous call's or the
prefill's), so the trainer's importance ratio uses the recorded behaviour log-prob.
`set_params` is the one method for other threads; the others belong to the thread running it.

Streaming: `run(on_finish=...)` hands each sample over in the scheduler round it ends;
a caller driving `step()` itself collects them with `take_finished()`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.kernels.paged_attention import default_backend
from kat_jax.model.config import ModelConfig
from kat_jax.progress import Progress
from kat_jax.sampling import paged
from kat_jax.sampling.autothink import THINK_MODES, forced_mode_prefix
from kat_jax.sampling.forward import DecodeParams
from kat_jax.sampling.logits import SamplingParams
from kat_jax.sampling.pages import SCRATCH_PAGE, PageAllocator, PagedSequence, live_tokens
from kat_jax.sampling.sampler import GenerationResult, Sampler

MAX_STOP_IDS = 16
# Engine(compact_widths=None): a batch's tail runs 32 rows (those below num_slots). Measured on
# an H100 (qwen2.5-1.5b, the RL benchmark draw): 12,946 -> 14,342 tokens/s.
DEFAULT_COMPACT_WIDTHS = (32,)
# The batch generators behind `make_batch_sampler`: the engine, or the static Sampler.
BATCH_SAMPLERS = ("paged", "static")


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt and how to continue it.

  prompt: token ids (appended to `continue_from`'s sequence when given; may then be empty).
  max_new_tokens: tokens each sample may generate (the stop token included); one int, or one
  per sample.
  sampling / stop_ids: as `Sampler.decode` takes them. think_mode: "auto", or "on"/"off" to
  force an AutoThink mode by prefilling its prefix (needs the Engine's tokenizer).
  num_samples: G samples sharing the prompt's pages. rng: the request's key (sample g draws
  from fold_in(rng, g)); None means key 0. keep: keep each sample's KV when it ends, for
  `Engine.fork` / a continuing request. continue_from: a kept sequence id to continue (the
  request takes it over).
  """
  prompt: Sequence[int]
  max_new_tokens: int | Sequence[int]
  sampling: SamplingParams = SamplingParams()
  stop_ids: Sequence[int] = ()
  think_mode: str = "auto"
  num_samples: int = 1
  rng: jax.Array | None = None
  keep: bool = False
  continue_from: int | None = None


@dataclasses.dataclass
class Completion:
  """One sample's result: generated tokens (the stop token kept), their log-probs and
  entropies (untempered, as `GenerationResult` has them, unless the request's
  `SamplingParams.tempered_stats`), whether a stop id ended it; error
  is the reason a bad request did not run (then everything else is empty); sequence is the
  kept sequence id (Request.keep) for `Engine.fork` / `continue_from`; versions [n] int32 the
  weight version (`Engine.set_params`) whose logits each token was sampled from."""
  request: int
  sample: int
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
  entropies: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
  stopped: bool = False
  error: str | None = None
  sequence: int | None = None
  versions: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))


@dataclasses.dataclass
class _Sample:
  """A sample waiting for or holding a decode slot."""
  id: int
  request: int
  index: int
  spec: Request
  seq: PagedSequence
  logits: jax.Array  # [V] float32, its next-token logits
  logits_version: int  # the weight version that computed them
  key: np.ndarray  # [2] uint32 key data
  max_new: int
  tokens: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  entropies: list = dataclasses.field(default_factory=list)
  versions: list = dataclasses.field(default_factory=list)

  @property
  def remaining(self) -> int:
    return self.max_new - len(self.tokens)


@dataclasses.dataclass
class _Prefill:
  """A request being prefilled, chunk by chunk, into one sequence."""
  request: int
  spec: Request
  tokens: list[int]
  seq: PagedSequence
  sample_ids: list[int]
  done: int = 0
  logits: jax.Array | None = None
  logits_version: int = 0


def _per_sample(request: Request) -> list[int]:
  """max_new_tokens of each sample."""
  new = request.max_new_tokens
  if isinstance(new, (int, np.integer)):
    return [int(new)] * int(request.num_samples)
  return [int(n) for n in new]


def _bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _buckets(minimum: int, n: int) -> list[int]:
  """Every `_bucket(m, minimum)` for m in 1..n (powers of two from minimum, a power of two)."""
  top = _bucket(n, minimum)
  return [minimum << i for i in range((top // minimum).bit_length())]


def _empty_rows(n: int) -> tuple[np.ndarray, ...]:
  """A decode call's per-slot inputs for n empty slots (`paged.decode_loop`): positions,
  budget, counts [n] int32, stop table [n, MAX_STOP_IDS] int32 (-1: none), sampling choice
  [n] int32, key data [n, 2] uint32."""
  return (np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32),
          np.full((n, MAX_STOP_IDS), -1, np.int32), np.zeros(n, np.int32),
          np.zeros((n, 2), np.uint32))


@jax.jit
def _sample_keys(rng: jax.Array, samples: jax.Array) -> jax.Array:
  """[G, 2] key data of fold_in(rng, g) for each g of samples [G]: a request's samples' keys
  in one call (one host round trip instead of G)."""
  return jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, samples))


def _check_params(params: Any) -> None:
  if not isinstance(params, DecodeParams):
    raise ValueError("Engine takes DecodeParams; convert the model's param tree once with "
                     "kat_jax.sampling.prepare_params(params, config)")


@dataclasses.dataclass(frozen=True)
class _Kept:
  """A kept sequence: its pages and its next-token logits [V] with their weight version."""
  seq: PagedSequence
  logits: jax.Array
  logits_version: int


class Engine:
  """Continuous batching over a paged KV cache for one model; its weights may be swapped
  between device calls (`set_params`)."""

  def __init__(self, config: ModelConfig, params: DecodeParams, *, num_slots: int = 64,
               num_pages: int = 1024, page_size: int = 16, prefill_chunk: int = 512,
               prefill_chunks_per_call: int = 1, steps_per_call: int = 8, pad_id: int = 0,
               tokenizer: Any = None, attention: str = "auto", long_rows: int | None = None,
               min_table_pages: int = 8, version: int = 0,
               compact_widths: Sequence[int] | None = None):
    """num_slots: rows of every decode call; num_pages × page_size: the KV pool (page 0 is
    scratch); steps_per_call: decode steps per jitted call (one host round trip each);
    tokenizer encodes forced think-mode prefixes; attention: the `paged.attend` backend
    ("auto": `paged_attention.default_backend` for a pool on one device; "xla" for a pool
    spread over a mesh, which XLA partitions by kv head where a Pallas call would gather it);
    long_rows: the slots with the longest caches (up to this many) attend over the whole page
    table and the others over a table cut to their own longest (`paged.split_attend`: the XLA
    backend gathers every row at the table's width); 0 = one table for all; None = 8 for the
    XLA backend, 0 for a kernel that reads only live pages; min_table_pages:
    the narrowest page table of a decode call (tables are powers of two >= it, one compiled
    program each: a width that covers the longest request compiles only the cut widths);
    version: the weights' version number (`Completion.versions`, `set_params`);
    compact_widths: narrower decode widths for a batch's tail: a decode call with at most w
    slots busy (w the narrowest such width) first moves the busy samples into slots [0, w)
    and runs those w rows only (`paged.decode_loop`; one more compiled program per width and
    table width); () = every call runs num_slots rows."""
    for name, value in (("num_slots", num_slots), ("prefill_chunk", prefill_chunk),
                        ("prefill_chunks_per_call", prefill_chunks_per_call),
                        ("steps_per_call", steps_per_call)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if compact_widths is None:
      compact_widths = [w for w in DEFAULT_COMPACT_WIDTHS if w < num_slots]
    bad = [w for w in compact_widths if not 1 <= int(w) < num_slots]
    if bad:
      raise ValueError(f"compact_widths must lie in [1, num_slots={num_slots}), got {bad[0]}")
    self.compact_widths = tuple(sorted({int(w) for w in compact_widths}))
    self.config = config
    _check_params(params)
    self._weights = (params, int(version))
    self._weights_lock = threading.Lock()
    self.num_slots, self.page_size = int(num_slots), int(page_size)
    self.prefill_chunk, self.steps_per_call = int(prefill_chunk), int(steps_per_call)
    self.prefill_chunks_per_call = int(prefill_chunks_per_call)
    self.pad_id, self.tokenizer = int(pad_id), tokenizer
    self.min_table_pages = _bucket(int(min_table_pages), 8)
    self.allocator = PageAllocator(num_pages, page_size)
    self.cache = paged.init_pages(config, num_pages, page_size)
    self.attention, default_long_rows = attention_plan(
        attention, config, page_size, spread=len(self.cache["k"][0].sharding.device_set) > 1)
    self.long_rows = int(default_long_rows if long_rows is None else long_rows)
    self.logits = jnp.zeros((num_slots, config.vocab_size), jnp.float32)
    self._fns = paged.jitted(config, self.pad_id, self.attention)
    self._slots: list[_Sample | None] = [None] * num_slots
    self._pending: collections.deque[_Prefill] = collections.deque()
    self._ready: collections.deque[_Sample] = collections.deque()
    self._kept: dict[int, _Kept] = {}
    # Every SamplingParams of the queued / running samples, in arrival order: the decode
    # program is compiled per tuple, so it only grows (and empties when the engine idles).
    self._samplings: tuple[SamplingParams, ...] = ()
    self._done: dict[int, Completion] = {}
    self._ids = itertools.count()
    self._requests = itertools.count()
    self._sequences = itertools.count()
    # decode_calls, decode_steps, slot_steps, prefill_chunks, split_calls; compact_calls and
    # compact_steps (calls / steps run narrower than num_slots), moved_samples (slot moves).
    self.stats = collections.Counter()
    # Per decode call: wall seconds (host work and the result's transfer included), slots
    # active at its start, steps run, tokens in the active slots' caches at its start, prefill
    # chunks queued since the previous call (their device time lands in this call's).
    # The latest 100,000 calls (a long-lived engine must not grow without bound).
    self.decode_log: collections.deque[tuple[float, int, int, int, int]] = collections.deque(
        maxlen=100_000)
    self._chunks_at_last_call = 0

  # ---- public API ----

  def set_params(self, params: DecodeParams, version: int) -> bool:
    """Swaps the weights (safe from another thread while `run` / `step` runs): the next
    prefill chunk or decode call uses them, and tokens sampled from their logits record
    `version`. The KV written under earlier weights stays. Weights never go back: a version
    lower than the current one is ignored (returns False; an equal one is applied)."""
    _check_params(params)
    with self._weights_lock:  # racing pushers: the check and the swap are one step
      if version < self._weights[1]:
        return False
      # One attribute, replaced whole: a reader sees either the old or the new pair.
      self._weights = (params, int(version))
    return True

  @property
  def params(self) -> DecodeParams:
    return self._weights[0]

  @property
  def version(self) -> int:
    """The version of the weights the next device call uses."""
    return self._weights[1]

  def submit(self, request: Request) -> list[int]:
    """Queues a request; returns its samples' ids (a bad request's samples end at once with
    `Completion.error`)."""
    rid = next(self._requests)
    ids = [next(self._ids) for _ in range(max(1, int(request.num_samples)))]
    tokens, error = self._check(request)
    if error is not None:
      for g, sid in enumerate(ids):
        self._done[sid] = Completion(rid, g, error=f"error: request {rid}: {error}")
      return ids
    prefill = _Prefill(rid, request, tokens, PagedSequence(), ids)
    if request.continue_from is not None:
      kept = self._kept.pop(request.continue_from)
      prefill.seq, prefill.logits, prefill.logits_version = (kept.seq, kept.logits,
                                                             kept.logits_version)
    if request.sampling not in self._samplings:
      self._samplings += (request.sampling,)
    self._pending.append(prefill)
    return ids

  def fork(self, sequence: int, count: int) -> list[int]:
    """`count` new kept sequences sharing every page (and the next-token logits) of a kept
    one, which stays; each may be continued by its own request (an agentic branch point)."""
    if sequence not in self._kept:
      raise ValueError(f"no kept sequence {sequence}")
    kept = self._kept[sequence]
    out = []
    for _ in range(count):
      sid = next(self._sequences)
      self._kept[sid] = dataclasses.replace(kept, seq=kept.seq.fork(self.allocator))
      out.append(sid)
    return out

  def release(self, sequence: int) -> None:
    """Returns a kept sequence's pages to the pool."""
    self._kept.pop(sequence).seq.free(self.allocator)

  def kept_length(self, sequence: int) -> int:
    """Tokens in a kept sequence's cache."""
    return self._kept[sequence].seq.length

  def extend(self, sequence: int, tokens: Sequence[int], **request: Any) -> list[int]:
    """Multi-turn: appends `tokens` (a tool output + the next turn's header) to a kept
    sequence and continues it; keywords are the Request's."""
    return self.submit(Request(list(tokens), continue_from=sequence, **request))

  def precompile(self, max_length: int, samplings: Sequence[SamplingParams], *,
                 prompt_length: int | None = None, workers: int = 8) -> int:
    """Compiles the device programs a run can call, `workers` at a time (XLA compiles them
    side by side instead of one by one as the run first meets them); returns how many.

    max_length: the most tokens a sequence reaches (prompt + generated): the decode calls'
    table widths up to it, at every row count (num_slots and `compact_widths`) and cut width;
    samplings: the run's SamplingParams in arrival order (one decode program per tuple);
    prompt_length: the most tokens a prefill reaches (default max_length): the prefill
    chunks' shapes. Shapes the run never meets compile too. A later call with the same
    argument shapes and shardings runs the compiled program (tested); the weights passed to
    `set_params` must keep the current ones' shardings."""
    params, size = self._weights[0], self.page_size
    samplings = tuple(samplings)
    jobs = []  # (jitted function, arguments, static keywords)
    for rows in (self.num_slots,) + self.compact_widths:
      for width in _buckets(self.min_table_pages, -(-max_length // size)):
        split = self.long_rows and rows > self.long_rows
        for short in (_buckets(8, width) if split else [width]):
          args = ((np.zeros((rows, width), np.int32),) + _empty_rows(rows)
                  + (np.full(max(self.long_rows, 1), rows, np.int32),))
          jobs.append((self._fns["decode"], (params, self.cache, self.logits) + args,
                       dict(samplings=samplings, steps=self.steps_per_call,
                            short_pages=short)))
    for chunk in _buckets(16, self.prefill_chunk):
      least = _bucket(-(-(chunk // 2 + 1) // size), 8)  # the pages its tokens fill at least
      for width in _buckets(8, -(-(prompt_length or max_length) // size)):
        if width >= least:
          jobs.append((self._fns["prefill"], (params, self.cache, np.zeros(chunk, np.int32),
                                              np.int32(0), np.int32(1),
                                              np.zeros(width, np.int32)), {}))
    for width in _buckets(4, self.num_slots):  # one copy per slot at most
      pages = np.zeros(width, np.int32)
      jobs.append((self._fns["copy"], (self.cache, pages, pages), {}))
    row = jnp.zeros(self.config.vocab_size, jnp.float32)
    jobs.append((self._fns["set_row"], (self.logits, row, np.int32(0)), {}))
    if self.compact_widths:
      moves = np.zeros(self.num_slots, np.int32)
      jobs.append((self._fns["move_rows"], (self.logits, moves, moves), {}))
    progress = Progress("engine precompile", len(jobs), unit="programs")
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      for done in concurrent.futures.as_completed(
          [pool.submit(lambda f, a, k: f.lower(*a, **k).compile(), *job) for job in jobs]):
        done.result()
        progress.update()
    progress.finish()
    return len(jobs)

  @property
  def busy(self) -> bool:
    return bool(self._pending or self._ready or any(s is not None for s in self._slots))

  def run(self, on_step: Callable[[int], None] | None = None,
          on_finish: Callable[[int, Completion], None] | None = None) -> dict[int, Completion]:
    """Runs until every submitted request ended; returns and forgets their completions.

    on_finish(sample id, completion) is called once per sample as soon as it ends (after the
    scheduler round it ended in, before the next decode call; samples of a bad request before
    the first round); it may submit, fork or extend (a new request joins this run).
    on_step(samples ended so far) is called after every scheduler round (progress output).
    """
    done: dict[int, Completion] = {}

    def deliver():
      while self._done:  # a callback's bad request ends at once: hand it over too
        for sid, completion in self.take_finished().items():
          done[sid] = completion
          if on_finish is not None:
            on_finish(sid, completion)

    deliver()
    while self.busy:
      self.step()
      deliver()
      if on_step is not None:
        on_step(len(done))
    return done

  def take_finished(self) -> dict[int, Completion]:
    """Returns and forgets the completions of the samples ended so far (for a caller that
    drives `step` itself)."""
    done, self._done = self._done, {}
    return done

  def step(self) -> None:
    """One scheduler round: fill free slots, prefill some chunks, one multi-step decode call.

    Prefill runs while prefilled samples are fewer than free slots: `prefill_chunks_per_call`
    chunks, or more while over half the slots would stay empty (the start of a batch).
    """
    self._admit()
    budget = self.prefill_chunks_per_call
    while self._pending:
      empty = self._free_slots() - len(self._ready)
      if empty <= 0 or (budget <= 0 and 2 * empty <= self.num_slots):
        break
      if not self._prefill_one_chunk():
        break
      budget -= 1
      self._admit()
    if self._active():
      self._decode()
    elif not self._ready and self._pending and not self._prefill_possible():
      self._fail(self._pending.popleft(), "needs more KV pages than the pool has free")
    if not self.busy:
      self._samplings = ()

  # ---- accounting ----

  def memory(self) -> dict[str, int]:
    """KV pool use in tokens: held (pages in use × page_size) and live (tokens stored, a
    shared page counted once)."""
    seqs = [s.seq for s in self._slots if s is not None] + [s.seq for s in self._ready]
    seqs += [p.seq for p in self._pending] + [k.seq for k in self._kept.values()]
    return {"held_tokens": self.allocator.num_used * self.page_size,
            "live_tokens": live_tokens(seqs, self.page_size)}

  # ---- internals ----

  def _check(self, r: Request) -> tuple[list[int], str | None]:
    """The request's prefill tokens, or why it cannot run."""
    vocab = self.config.vocab_size
    if r.num_samples < 1:
      return [], f"num_samples must be >= 1, got {r.num_samples}"
    new = _per_sample(r)
    if len(new) != r.num_samples:
      return [], f"{len(new)} max_new_tokens for {r.num_samples} samples"
    if min(new) < 1:
      return [], f"max_new_tokens must be >= 1, got {min(new)}"
    if r.think_mode not in THINK_MODES:
      return [], f"think_mode {r.think_mode!r} not in {THINK_MODES}"
    if len(r.stop_ids) > MAX_STOP_IDS:
      return [], f"{len(r.stop_ids)} stop ids, at most {MAX_STOP_IDS}"
    bad = [s for s in r.stop_ids if not 0 <= int(s) < vocab]
    if bad:
      return [], f"stop id {bad[0]} outside the vocabulary [0, {vocab})"
    tokens = [int(t) for t in r.prompt]
    if r.think_mode != "auto":
      if self.tokenizer is None:
        return [], f"think_mode {r.think_mode!r} needs the Engine's tokenizer"
      tokens += list(self.tokenizer.encode(forced_mode_prefix(r.think_mode)))
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
      return [], f"prompt token {bad[0]} outside the vocabulary [0, {vocab})"
    start = 0
    if r.continue_from is not None:
      if r.continue_from not in self._kept:
        return [], f"continue_from {r.continue_from} is not a kept sequence"
      start = self._kept[r.continue_from].seq.length
    elif not tokens:
      return [], "empty prompt"
    total = start + len(tokens) + max(new)
    if total > self.config.max_position_embeddings:
      return [], (f"{start} cached + {len(tokens)} prompt + {max(new)} new tokens = "
                  f"{total} exceed max_position_embeddings {self.config.max_position_embeddings}")
    need = self._pages_for(start + len(tokens), new)
    if need > self.allocator.num_pages - 1:
      return [], (f"needs {need} KV pages of {self.page_size} tokens, the pool has "
                  f"{self.allocator.num_pages - 1}")
    return tokens, None

  def _pages_for(self, prompt: int, new: list[int]) -> int:
    """Pages a request needs at most: its prompt once, then each sample's own pages."""
    size = self.page_size
    return -(-prompt // size) + sum(-(-(prompt + n) // size) - prompt // size for n in new)

  def _active(self) -> bool:
    return any(s is not None for s in self._slots)

  def _free_slots(self) -> int:
    return sum(s is None for s in self._slots)

  def _committed(self) -> int:
    """Pages the admitted samples may still take (their worst case)."""
    samples = [s for s in self._slots if s is not None] + list(self._ready)
    return sum(s.seq.pages_to_write(self.allocator, s.remaining) for s in samples)

  def _prefill_possible(self) -> bool:
    p = self._pending[0]
    # +1: a continued sequence's shared partial page is copied before its prefill writes.
    need = self._pages_for(p.seq.length + len(p.tokens) - p.done,
                           _per_sample(p.spec)) - len(p.seq.pages) + 1
    return need <= self.allocator.num_free - self._committed()

  def _fail(self, p: _Prefill, error: str) -> None:
    p.seq.free(self.allocator)
    for g, sid in enumerate(p.sample_ids):
      self._done[sid] = Completion(p.request, g, error=f"error: request {p.request}: {error}")

  def _prefill_one_chunk(self) -> bool:
    """Prefills the next chunk of the first pending request; False when the pool cannot take
    it yet. A request whose prompt is done becomes its samples (forks of its sequence)."""
    p = self._pending[0]
    if p.done == 0 and not self._prefill_possible():
      return False
    count = min(self.prefill_chunk, len(p.tokens) - p.done)
    if count:
      copies = p.seq.reserve(self.allocator, count)
      self._copy(copies)
      width = _bucket(count, 16)
      tokens = np.full(width, self.pad_id, np.int32)
      tokens[:count] = p.tokens[p.done:p.done + count]
      table = self._table([p.seq.pages], 8)[0]
      params, p.logits_version = self._weights
      self.cache, p.logits = self._fns["prefill"](
          params, self.cache, tokens, np.int32(p.seq.length), np.int32(count), table)
      p.seq.length += count
      p.done += count
      self.stats["prefill_chunks"] += 1
    if p.done < len(p.tokens):
      return True
    self._pending.popleft()
    rng = p.spec.rng if p.spec.rng is not None else jax.random.key(0)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a raw uint32 PRNGKey
      rng = jax.random.wrap_key_data(rng)
    keys = np.asarray(_sample_keys(rng, np.arange(len(p.sample_ids))), np.uint32)
    for g, (sid, new, key) in enumerate(zip(p.sample_ids, _per_sample(p.spec), keys)):
      seq = p.seq.fork(self.allocator)
      self._ready.append(_Sample(sid, p.request, g, p.spec, seq, p.logits, p.logits_version,
                                 key, new))
    p.seq.free(self.allocator)  # the samples hold the pages now
    return True

  def _admit(self) -> None:
    for i in range(self.num_slots):
      if not self._ready:
        return
      if self._slots[i] is None:
        sample = self._ready.popleft()
        self.logits = self._fns["set_row"](self.logits, sample.logits, np.int32(i))
        self._slots[i] = sample

  def _copy(self, copies: list[tuple[int, int]]) -> None:
    if not copies:
      return
    width = _bucket(len(copies), 4)
    src = np.full(width, SCRATCH_PAGE, np.int32)
    dst = np.full(width, SCRATCH_PAGE, np.int32)
    src[:len(copies)], dst[:len(copies)] = zip(*copies)
    self.cache = self._fns["copy"](self.cache, src, dst)

  def _table(self, page_lists: list[list[int]], minimum: int) -> np.ndarray:
    """Page lists -> a [rows, M] int32 table, M a power of two >= minimum (few compiled
    shapes). Host arrays like this one go to the jitted calls as they are: the call's
    dispatch moves them, in less host time than a jnp.asarray each."""
    counts = np.fromiter(map(len, page_lists), np.int64, len(page_lists))
    width = _bucket(int(counts.max()), minimum)
    table = np.full((len(page_lists), width), SCRATCH_PAGE, np.int32)
    # Row-major boolean assignment: row r's first counts[r] entries get its pages, in order.
    table[np.arange(width) < counts[:, None]] = np.fromiter(
        itertools.chain.from_iterable(page_lists), np.int32, int(counts.sum()))
    return table

  def _split(self, pages: list[int], width: int) -> tuple[np.ndarray, int]:
    """(long_rows [N], short_pages) for `paged.split_attend` of a call over the slots with
    `pages` pages each: the `long_rows` slots with the most pages (the call's row count =
    none), and the table width (a power of two >= 8) the others fit. Which slots are long
    depends on the page counts only (a slot past the cut has more pages than every slot
    short of it), so a compacted call splits its samples as the full one would."""
    n, none = self.long_rows, len(pages)
    order = np.argsort(pages, kind="stable")[::-1]
    if n == 0 or len(pages) <= n:
      return np.full(max(n, 1), none, np.int32), width
    short = _bucket(pages[order[n]], 8)
    if short >= width:
      return np.full(n, none, np.int32), width
    rows = np.where(np.asarray(pages)[order[:n]] > short, order[:n], none)
    return rows.astype(np.int32), short

  def _width(self) -> int:
    """Rows of the next decode call: the narrowest compact width that holds every busy slot,
    else num_slots."""
    busy = self.num_slots - self._free_slots()
    return min((w for w in self.compact_widths if w >= busy), default=self.num_slots)

  def _move_into(self, width: int) -> None:
    """Moves the samples of slots >= width into free slots < width, their carried logits rows
    with them (the caller checked that they fit). A sample's draws do not depend on its slot
    (its key stream is its own), so this changes no token."""
    free = [i for i in range(width) if self._slots[i] is None]
    moves = list(zip([i for i in range(width, self.num_slots) if self._slots[i] is not None],
                     free))
    if not moves:
      return
    source = np.zeros(self.num_slots, np.int32)
    dest = np.full(self.num_slots, self.num_slots, np.int32)  # one shape: padded to the slots
    source[:len(moves)], dest[:len(moves)] = zip(*moves)
    self.logits = self._fns["move_rows"](self.logits, source, dest)
    for src, dst in moves:
      self._slots[dst], self._slots[src] = self._slots[src], None
    self.stats["moved_samples"] += len(moves)

  def _decode(self) -> None:
    steps = self.steps_per_call
    n = self._width()
    if n < self.num_slots:
      self._move_into(n)
    slots = self._slots[:n]
    busy = [(i, s) for i, s in enumerate(slots) if s is not None]
    copies = []
    for _, s in busy:
      copies += s.seq.reserve(self.allocator, min(steps, s.remaining))
    self._copy(copies)
    samplings = self._samplings
    choices = {sampling: index for index, sampling in enumerate(samplings)}
    positions, budget, counts, stops, choice, keys = _empty_rows(n)
    for i, s in busy:
      positions[i], budget[i], counts[i] = s.seq.length, s.remaining, len(s.tokens)
      if s.spec.stop_ids:
        stops[i, :len(s.spec.stop_ids)] = s.spec.stop_ids
      choice[i] = choices[s.spec.sampling]
      keys[i] = s.key
    table = self._table([s.seq.pages if s is not None else [] for s in slots],
                        self.min_table_pages)
    long_rows, short_pages = self._split([len(s.seq.pages) if s is not None else 0
                                          for s in slots], table.shape[1])
    self.stats["split_calls"] += int(short_pages < table.shape[1])
    start = time.perf_counter()
    params, version = self._weights
    self.cache, self.logits, records = self._fns["decode"](
        params, self.cache, self.logits, table, positions, budget, counts, stops, choice, keys,
        long_rows, samplings=samplings, steps=steps, short_pages=short_pages)
    records = np.asarray(records)  # the one host sync per call
    self.stats["decode_calls"] += 1
    mask = records[..., 3] > 0
    run = int(mask.any(axis=0).sum())
    chunks = self.stats["prefill_chunks"]
    self.decode_log.append((time.perf_counter() - start, int((budget > 0).sum()), run,
                            int(positions[budget > 0].sum()), chunks - self._chunks_at_last_call))
    self._chunks_at_last_call = chunks
    self.stats["decode_steps"] += run
    self.stats["slot_steps"] += int(mask.sum())
    if n < self.num_slots:
      self.stats["compact_calls"] += 1
      self.stats["compact_steps"] += run
    # A slot's records are a prefix of the steps (once its budget is 0 it stays 0).
    made = mask.sum(axis=1).tolist()
    tokens = records[..., 0].astype(np.int64)
    for i, s in busy:
      k = made[i]
      if k:
        s.tokens += tokens[i, :k].tolist()
        s.logprobs += records[i, :k, 1].tolist()
        s.entropies += records[i, :k, 2].tolist()
        # The first token came from the logits carried into this call; the others (and the
        # logits carried out) from this call's weights.
        s.versions += [s.logits_version] + [version] * (k - 1)
        s.logits_version = version
        s.seq.length += k
      stopped = bool(k) and s.tokens[-1] in s.spec.stop_ids
      if stopped or s.remaining <= 0:
        self._finish(i, s, stopped)

  def _finish(self, slot: int, s: _Sample, stopped: bool) -> None:
    self._slots[slot] = None
    s.seq.trim(self.allocator)
    sequence = None
    if s.spec.keep:
      sequence = next(self._sequences)
      self._kept[sequence] = _Kept(s.seq, self.logits[slot], s.logits_version)
    else:
      s.seq.free(self.allocator)
    self._done[s.id] = Completion(s.request, s.index, s.tokens,
                                  np.asarray(s.logprobs, np.float32),
                                  np.asarray(s.entropies, np.float32), stopped,
                                  sequence=sequence, versions=np.asarray(s.versions, np.int32))


class EngineSampler:
  """The engine behind `Sampler.generate`'s interface, for callers that take a whole batch.

      sampler = EngineSampler(config, pad_id=tok.pad_id)        # instead of Sampler(...)
      result = sampler.generate(dparams, prompts, rng, max_new_tokens=512, num_samples=8,
                                sampling=SamplingParams(1.0), stop_ids=tok.stop_ids)

  Returns the same `GenerationResult` (rows grouped by prompt: row i*G + g; tokens past a
  row's end hold pad_id). Prompt i's samples draw from fold_in(rng, i). The page pool is sized
  at the first call that needs more (every slot at its longest prompt + max_new_tokens) and
  kept, or fixed by `num_pages`; `dparams` may change between calls (a weight update), and
  `set_params` pushes versioned weights from any thread, during a call too.
  """

  def __init__(self, config: ModelConfig, *, pad_id: int = 0, prefill_chunk: int = 512,
               num_slots: int = 64, page_size: int = 16, num_pages: int | None = None,
               **engine_kwargs: Any):
    self.config, self.pad_id, self.prefill_chunk = config, int(pad_id), int(prefill_chunk)
    self.num_pages = num_pages
    self.num_slots, self.page_size = int(num_slots), int(page_size)
    self.engine_kwargs = engine_kwargs
    self.engine: Engine | None = None
    self._weights: tuple[DecodeParams, int] | None = None  # the latest (params, version)
    self._lock = threading.Lock()  # a push never lands between two engines

  def set_params(self, params: DecodeParams, version: int) -> bool:
    """`Engine.set_params` (from any thread): applied to the engine, remembered for one built
    later; a version lower than the latest is ignored (False)."""
    _check_params(params)
    with self._lock:
      if self._weights is not None and version < self._weights[1]:
        return False
      self._weights = (params, int(version))
      if self.engine is not None:
        self.engine.set_params(params, version)
      return True

  def _engine(self, params: DecodeParams, version: int | None, num_pages: int) -> Engine:
    if version is None:  # new weights under the latest version number
      version = 0 if self._weights is None else self._weights[1]
    self.set_params(params, version)
    with self._lock:
      if self.engine is None or self.engine.allocator.num_pages < num_pages:
        self.engine = None  # free the old pool first
        params, version = self._weights
        self.engine = Engine(self.config, params, version=version, num_slots=self.num_slots,
                             num_pages=num_pages, page_size=self.page_size,
                             prefill_chunk=self.prefill_chunk, pad_id=self.pad_id,
                             **self.engine_kwargs)
      return self.engine

  def generate(self, params: DecodeParams, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
               max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids: Sequence[int] = (), num_samples: int = 1,
               max_length: int | None = None,
               on_step: Callable[[int], None] | None = None,
               on_finish: Callable[[int, Completion], None] | None = None,
               version: int | None = None) -> GenerationResult:
    """As `Sampler.generate` (max_length is accepted and unused: pages grow as needed);
    on_step as `Engine.run` takes it; on_finish(row, completion) is called as each sample
    ends, row = i*G + g its row in the result (a bad prompt's rows too, with the error);
    version: `params`' version (`set_params`: ignored with them if lower than the latest
    pushed); None keeps the latest version number. Raises ValueError naming every bad prompt
    (the others still ran)."""
    del max_length
    if not prompts:
      raise ValueError("generate needs at least one prompt")
    longest = max(len(p) for p in prompts)
    per_slot = -(-(longest + max_new_tokens) // self.page_size) + 1
    engine = self._engine(params, version, self.num_pages or self.num_slots * per_slot + 2)
    ids = [engine.submit(Request(p, max_new_tokens, sampling=sampling, stop_ids=tuple(stop_ids),
                                 num_samples=num_samples, rng=jax.random.fold_in(rng, i)))
           for i, p in enumerate(prompts)]
    row_of = {sid: row for row, sid in enumerate(s for sample_ids in ids for s in sample_ids)}
    done = engine.run(on_step, None if on_finish is None else
                      lambda sid, completion: on_finish(row_of[sid], completion))
    rows = [done[sid] for sample_ids in ids for sid in sample_ids]
    errors = [f"prompt {i}: {done[s[0]].error}" for i, s in enumerate(ids) if done[s[0]].error]
    if errors:
      raise ValueError("; ".join(errors))
    shape = (len(rows), max_new_tokens)
    tokens = np.full(shape, self.pad_id, np.int32)
    logprobs, entropies = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    for r, c in enumerate(rows):
      n = len(c.tokens)
      tokens[r, :n], logprobs[r, :n], entropies[r, :n], mask[r, :n] = (
          c.tokens, c.logprobs, c.entropies, True)
    return GenerationResult(tokens=jnp.asarray(tokens), logprobs=jnp.asarray(logprobs),
                            entropies=jnp.asarray(entropies), mask=jnp.asarray(mask),
                            stopped=jnp.asarray([c.stopped for c in rows]))


def make_batch_sampler(config: ModelConfig, kind: str = "paged", *, pad_id: int = 0,
                       prefill_chunk: int = 512, num_slots: int = 64, page_size: int = 16,
                       num_pages: int | None = None) -> EngineSampler | Sampler:
  """The generator of a batch-generating caller (generate stage, evaluation): "paged" = the
  engine (`EngineSampler`; continuous batching, so a long response does not hold up the
  batch), "static" = the static `Sampler` (num_slots, page_size, num_pages unused). Both
  give the same greedy tokens and the same `generate` interface."""
  if kind not in BATCH_SAMPLERS:
    raise ValueError(f"sampler kind {kind!r} not in {BATCH_SAMPLERS}")
  if kind == "static":
    return Sampler(config, pad_id=pad_id, prefill_chunk=prefill_chunk)
  for name, value in (("num_slots", num_slots), ("page_size", page_size),
                      ("prefill_chunk", prefill_chunk)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if num_pages is not None and num_pages < 2:
    raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
  return EngineSampler(config, pad_id=pad_id, prefill_chunk=prefill_chunk, num_slots=num_slots,
                       page_size=page_size, num_pages=num_pages)


def attention_plan(attention: str, config: ModelConfig, page_size: int,
                   spread: bool = False) -> tuple[str, int]:
  """(paged-attention backend, default `long_rows`) of an engine given `attention` for a
  `config` model with pages of `page_size` tokens; spread: the pool spans several devices."""
  if attention == "auto":
    attention = "xla" if spread else default_backend(
        config.compute_dtype, config.num_heads // config.num_kv_heads, config.head_dim,
        page_size)
  return attention, 8 if attention in ("xla", "reference") else 0
