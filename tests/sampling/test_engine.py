"""Rollout engine vs the static Sampler and the training forward: greedy tokens, log-probs,
entropies, shared prompt pages, forks, multi-turn extends, bad requests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import Decoder, get_preset, init_params
from kat_jax.sampling import GREEDY, Sampler, SamplingParams, prepare_params
from kat_jax.sampling.engine import DEFAULT_COMPACT_WIDTHS, Engine, EngineSampler, Request
from kat_jax.sampling.engine import attention_plan
from kat_jax.testing import relative_error

_CONFIG = dict(num_layers=1, initializer_range=0.3)
# One engine shape for most tests, so its programs compile once for the module.
_ENGINE = dict(num_slots=4, num_pages=32, page_size=4, steps_per_call=3, prefill_chunk=16)


@pytest.fixture(scope="module")
def model():
  config = get_preset("tiny", **_CONFIG)
  params = init_params(config, jax.random.key(0))
  return config, params, prepare_params(params, config)


@functools.partial(jax.jit, static_argnums=2)
def _log_probs(params, tokens, temperature=1.0):
  logits = Decoder(get_preset("tiny", **_CONFIG)).apply({"params": params}, tokens)[0]
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _check_against_training_forward(params, prompt, completion, temperature=1.0):
  """The completion's log-probs / entropies equal the training forward's (float32) at
  `temperature` (log_softmax(logits / temperature))."""
  tokens = completion.tokens
  seq = np.zeros((1, 64), np.int32)
  seq[0, :len(prompt) + len(tokens)] = list(prompt) + tokens
  pred = np.asarray(_log_probs(params, jnp.asarray(seq), temperature))[len(prompt) - 1:][
      :len(tokens)]
  assert relative_error(completion.logprobs, pred[np.arange(len(tokens)), tokens]) < 1e-5
  assert relative_error(completion.entropies, -np.sum(np.exp(pred) * pred, axis=-1)) < 1e-5


@pytest.fixture(scope="module")
def greedy_reference(model):
  """Prompts of 1-40 tokens and the static Sampler's 9 greedy tokens for each."""
  config, _, dparams = model
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (1, 3, 8, 13, 40)]
  want = Sampler(config).generate(dparams, prompts, jax.random.key(0), max_new_tokens=9,
                                  sampling=GREEDY)
  return prompts, want


def test_greedy_equals_the_static_sampler_for_random_orders_slots_pages_and_prompts(
    model, greedy_reference):
  """Every request's greedy tokens equal the static Sampler's (a prefix of them: requests have
  their own max_new_tokens), whatever the admission order, slot count, page size and prompt
  length (prompts cross prefill chunks), with the longest slot attending over the whole page
  table and the others over a cut one (`split_attend`); the pool is empty afterwards."""
  config, _, dparams = model
  prompts, want = greedy_reference
  want = want.token_lists()
  rng = np.random.default_rng(1)
  for num_slots, page_size, long_rows in ((2, 8, 0), (3, 4, 1)):
    engine = Engine(config, dparams, **dict(_ENGINE, num_slots=num_slots, page_size=page_size,
                                            long_rows=long_rows))
    order = rng.permutation(len(prompts))
    new_tokens = rng.integers(1, 10, size=len(prompts))
    ids = {int(i): engine.submit(Request(prompts[i], int(new_tokens[i]), sampling=GREEDY))[0]
           for i in order}
    done = engine.run()
    for i, sid in ids.items():
      assert done[sid].error is None
      assert done[sid].tokens == want[i][:new_tokens[i]], (num_slots, page_size, i)
    assert engine.allocator.num_used == 0
  assert engine.stats["split_calls"] > 0  # the last engine used the cut table
  assert len({t for row in want for t in row}) > 5  # not a degenerate echo


def test_engine_sampler_generate_equals_sampler_generate(model, greedy_reference):
  """`EngineSampler.generate` returns the static Sampler's `GenerationResult` (rows grouped by
  prompt; a stop token ends a row, kept, with pad_id and mask False after it, stopped set);
  a bad prompt raises a ValueError naming it."""
  config, _, dparams = model
  prompts, want = greedy_reference
  tokens = np.asarray(want.tokens)
  stop = int(tokens[1, 2])
  # The static result with stop_ids=(stop,): greedy rows cut after their first stop token.
  ends = [list(row).index(stop) + 1 if stop in row else 9 for row in tokens]
  mask = np.arange(9)[None, :] < np.asarray(ends)[:, None]
  want_stopped = dict(tokens=np.where(mask, tokens, 0), mask=mask,
                      stopped=np.asarray([stop in row for row in tokens]),
                      logprobs=np.where(mask, want.logprobs, 0))
  sampler = EngineSampler(config, **_ENGINE)
  got = sampler.generate(dparams, prompts, jax.random.key(0), max_new_tokens=9,
                         sampling=GREEDY, stop_ids=(stop,), num_samples=2)
  for g in range(2):
    for name in ("tokens", "mask", "stopped"):
      np.testing.assert_array_equal(np.asarray(getattr(got, name))[g::2], want_stopped[name])
    assert relative_error(np.asarray(got.logprobs)[g::2], want_stopped["logprobs"]) < 1e-5
  assert want_stopped["stopped"].sum() >= 1 and not want_stopped["stopped"].all()
  with pytest.raises(ValueError, match=r"prompt 1: error: request \d+: prompt token"):
    sampler.generate(dparams, [[1, 2], [config.vocab_size]], jax.random.key(0),
                     max_new_tokens=2)


def test_logprobs_and_entropies_equal_training_forward_with_mixed_sampling_and_stops(
    model, greedy_reference):
  """Greedy, tempered and top-p requests in one batch, each with its own stop id: log-probs
  and entropies (untempered) equal the training forward; a stop id ends the sample with the
  stop token kept; the same request gives the same tokens in another slot layout."""
  config, params, dparams = model
  rng = np.random.default_rng(2)
  reference_prompts, want = greedy_reference
  prompts = [reference_prompts[2]] + [rng.integers(1, config.vocab_size, size=n).tolist()
                                      for n in (11, 6)]
  greedy = want.token_lists()[2]
  requests = [Request(prompts[0], 8, sampling=GREEDY, stop_ids=(greedy[4],)),
              Request(prompts[1], 7, sampling=SamplingParams(1.0), rng=jax.random.key(5),
                      num_samples=2),
              Request(prompts[2], 6, sampling=SamplingParams(0.7, top_p=0.9),
                      rng=jax.random.key(6))]
  runs = []
  for order in (1, -1):  # another admission order: other slots, other neighbours
    engine = Engine(config, dparams, **_ENGINE)
    ids = [engine.submit(r) for r in requests[::order]][::order]
    done = engine.run()
    runs.append([[done[sid] for sid in sample_ids] for sample_ids in ids])
  done = {sid: c for sample_ids, cs in zip(ids, runs[1]) for sid, c in zip(sample_ids, cs)}
  stopped = done[ids[0][0]]
  assert stopped.stopped and stopped.tokens == greedy[:greedy.index(greedy[4]) + 1]
  for request, first, second in zip(requests, *runs):
    for a, b in zip(first, second):
      _check_against_training_forward(params, request.prompt, b)
      assert a.tokens == b.tokens
  assert done[ids[1][0]].tokens != done[ids[1][1]].tokens  # two samples, two key streams


def test_tempered_stats_record_the_log_probs_of_the_tempered_distribution(model):
  """With SamplingParams.tempered_stats the log-probs and entropies are those of
  softmax(logits / T) (what an RL loss tempered like its rollouts sees), the tokens unchanged."""
  config, params, dparams = model
  prompt = np.random.default_rng(4).integers(1, config.vocab_size, size=7).tolist()
  runs = {}
  for tempered in (False, True):
    engine = Engine(config, dparams, **_ENGINE)
    [sid] = engine.submit(Request(prompt, 9, sampling=SamplingParams(
        0.6, vocab_limit=config.vocab_size - 3, tempered_stats=tempered), rng=jax.random.key(8)))
    runs[tempered] = engine.run()[sid]
  assert runs[True].tokens == runs[False].tokens
  _check_against_training_forward(params, prompt, runs[True], temperature=0.6)
  _check_against_training_forward(params, prompt, runs[False])
  assert relative_error(runs[True].logprobs, runs[False].logprobs) > 1e-2


def test_a_group_of_8_samples_holds_its_prompt_pages_once(model):
  config, _, dparams = model
  engine = Engine(config, dparams, **dict(_ENGINE, num_slots=8))
  prompt = list(range(1, 22))  # 5 full pages + 1 token
  engine.submit(Request(prompt, 5, sampling=GREEDY, num_samples=8))
  engine.step()  # prefill, fork 8, three decode steps each
  # The 5 full prompt pages once; each sample its own copy of the partial sixth page.
  assert engine.allocator.num_used == 5 + 8
  assert engine.memory() == {"held_tokens": 13 * 4, "live_tokens": 20 + 8 * 4}
  done = engine.run()
  assert len({tuple(c.tokens) for c in done.values()}) == 1  # greedy: 8 equal samples
  assert engine.allocator.num_used == 0


def test_extend_and_fork_equal_the_static_sampler_on_the_whole_text(model):
  """A kept sample continued with a tool output (multi-turn extend), and two forks of it
  continued with different outputs (a tree branch point), each give the static Sampler's
  greedy continuation of its whole text; all pages come back after release."""
  config, _, dparams = model
  sampler = Sampler(config)
  prompt, tool_a, tool_b = [5, 9, 33, 2, 71], [400, 401, 402], [17, 18]
  engine = Engine(config, dparams, **_ENGINE)
  [sid] = engine.submit(Request(prompt, 6, sampling=GREEDY, keep=True))
  turn1 = engine.run()[sid]
  assert engine.kept_length(turn1.sequence) == len(prompt) + 6
  branch_a, branch_b = engine.fork(turn1.sequence, 2)
  engine.release(turn1.sequence)
  [a] = engine.extend(branch_a, tool_a, max_new_tokens=5, sampling=GREEDY)
  [b] = engine.extend(branch_b, tool_b, max_new_tokens=5, sampling=GREEDY)
  done = engine.run()
  for tool, sid in ((tool_a, a), (tool_b, b)):
    text = prompt + turn1.tokens + tool
    want = sampler.generate(dparams, [text], jax.random.key(0), max_new_tokens=5,
                            sampling=GREEDY).token_lists()[0]
    assert done[sid].tokens == want
  assert engine.allocator.num_used == 0


class _FakeTokenizer:
  """One id per whitespace-separated word (a short forced prefix)."""

  def encode(self, text):
    return [1 + sum(map(ord, word)) % 500 for word in text.split()]


def test_bad_requests_error_alone_and_think_mode_forcing(model):
  """Bad requests (unknown stop id, prompt longer than the positions or the page pool, token
  outside the vocabulary, unknown sequence) end with an `error:` naming the field; the good
  ones beside them (one with a forced think mode) give the static Sampler's tokens."""
  config, _, dparams = model
  tok = _FakeTokenizer()
  prompt = [7, 8, 9, 10]
  engine = Engine(config, dparams, tokenizer=tok, **_ENGINE)
  bad = {"stop id": Request(prompt, 4, stop_ids=(config.vocab_size,)),
         "max_position_embeddings": Request([1] * config.max_position_embeddings, 4),
         "KV pages": Request([1] * 200, 8),
         "prompt token": Request([1, -3], 4),
         "continue_from": Request([1], 4, continue_from=99)}
  ids = {}
  for i, (field, request) in enumerate(bad.items()):
    ids[field] = engine.submit(request)[0]
    if i == 1:
      good = engine.submit(Request(prompt, 5, sampling=GREEDY))[0]
      forced = engine.submit(Request(prompt, 5, sampling=GREEDY, think_mode="off"))[0]
  done = engine.run()
  for field, sid in ids.items():
    assert done[sid].error.startswith("error: request") and field in done[sid].error
    assert done[sid].tokens == []
  from kat_jax.sampling.autothink import think_mode_prompts  # pylint: disable=g-import-not-at-top
  want = Sampler(config).generate(dparams, [prompt] + think_mode_prompts(tok, [prompt], "off"),
                                  jax.random.key(0), max_new_tokens=5,
                                  sampling=GREEDY).token_lists()
  assert [done[good].tokens, done[forced].tokens] == want
  assert engine.allocator.num_used == 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: the CPU run's virtual "
                    "devices (tests/conftest.py); a one-GPU run (KAT_TEST_GPU=1) has one")
def test_engine_on_a_device_mesh_keeps_the_output(model):
  """Tensor-parallel decode weights (`shard_decode_params`) inside the mesh's sharding
  context: the pages are split over kv heads (from their creation on) and the tokens and
  log-probs are unchanged."""
  from kat_jax.parallel.mesh import make_mesh, sharding_context  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import shard_decode_params  # pylint: disable=g-import-not-at-top
  config, _, dparams = model
  requests = [Request([3, 17, 250, 9], 6, sampling=SamplingParams(1.0), num_samples=2),
              Request([42, 5], 4, sampling=GREEDY)]
  engine = Engine(config, dparams, **_ENGINE)
  ids = [engine.submit(r) for r in requests]
  want = engine.run()
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  with sharding_context(mesh):
    engine = Engine(config, shard_decode_params(dparams, mesh), **_ENGINE)
    assert tuple(engine.cache["k"][0].sharding.spec)[0] == "tensor"  # placed from the start
    assert [engine.submit(r) for r in requests] == ids
    got = engine.run()
  assert tuple(engine.cache["k"][0].sharding.spec)[0] == "tensor"
  for sid, completion in want.items():
    assert got[sid].tokens == completion.tokens
    assert relative_error(got[sid].logprobs, completion.logprobs) < 1e-5


def test_split_attend_equals_one_attention_over_the_whole_table():
  """`split_attend` (rows cut to 2 pages, 2 long rows over all 4) equals the reference over
  the whole table: rows exactly at the cut, past it, empty, and an unused long-row entry."""
  from kat_jax.kernels.paged_attention import paged_decode_attention_reference  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.paged import split_attend  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  hkv, hq, d, size, num_pages = 2, 4, 8, 4, 16
  k_pages, v_pages = (jnp.asarray(rng.normal(size=(hkv, num_pages, size, d)), jnp.float32)
                      for _ in range(2))
  table = jnp.asarray(rng.integers(1, num_pages, size=(5, 4)), jnp.int32)
  lengths = jnp.asarray([8, 13, 0, 5, 16], jnp.int32)  # rows 1 and 4 need more than 2 pages
  q = jnp.asarray(rng.normal(size=(5, hq, d)), jnp.float32)
  long_rows = jnp.asarray([4, 1, 5], jnp.int32)  # 5 = no row
  got = split_attend(q, k_pages, v_pages, table, lengths, long_rows, short_pages=2,
                     backend="xla")
  want = paged_decode_attention_reference(q, k_pages, v_pages, table, lengths)
  assert relative_error(got, want) < 1e-6
  np.testing.assert_array_equal(np.asarray(got)[2], 0)


# ---- weight swaps (Completion.versions) and streaming (on_finish, take_finished) ----

# Four requests on 4 slots, 3 steps per call: the third request's 3 samples do not all get a
# slot at once, so one waits and starts decoding under newer weights than its prefill's.
_SWAP_NEW_TOKENS, _SWAP_GROUPS = (7, 12, 7, 9), (1, 1, 3, 1)


def _swap_requests(config):
  rng = np.random.default_rng(3)
  prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (5, 9, 3, 6)]
  return [Request(p, n, sampling=SamplingParams(1.0), num_samples=g, rng=jax.random.key(i))
          for i, (p, n, g) in enumerate(zip(prompts, _SWAP_NEW_TOKENS, _SWAP_GROUPS))]


def _run_with_swaps(config, dparams, requests, swaps):
  """Runs `requests` on a fresh engine (weights `dparams`, version 0); swaps = {decode calls
  done: (params, version)} pushed from on_step. -> (sample ids per request, completions,
  {sample id: decode calls done when its on_finish fired}, engine)."""
  engine = Engine(config, dparams, **_ENGINE)
  ids = [engine.submit(r) for r in requests]
  ended = {}

  def on_step(_):
    calls = engine.stats["decode_calls"]
    if calls in swaps and engine.version != swaps[calls][1]:
      engine.set_params(*swaps[calls])

  def on_finish(sid, _):
    assert sid not in ended
    ended[sid] = engine.stats["decode_calls"]

  done = engine.run(on_step, on_finish)
  return ids, done, ended, engine


def test_versions_mark_the_weights_each_token_was_sampled_from(model):
  """Versions 0 -> 1 after the 1st decode call -> 2 after the 3rd, B and C being A's arrays:
  every token's version is the one of the call (or prefill) whose logits it was drawn from,
  derived by hand: a sample decodes 3 tokens per call in consecutive calls up to the call it
  ended in; the first token of a call comes from the logits the previous call (or the
  request's prefill, run in the step of its first sample's first call) left. Tokens, log-probs
  and entropies equal the unswapped run exactly: a swap changes only the labels."""
  config, _, dparams = model
  requests = _swap_requests(config)
  ids, done, ended, engine = _run_with_swaps(config, dparams, requests,
                                             {1: (dparams, 1), 3: (dparams, 2)})
  _, want, _, _ = _run_with_swaps(config, dparams, requests, {})
  steps = _ENGINE["steps_per_call"]
  assert all(run == steps for _, _, run, _, _ in engine.decode_log)  # 3 steps every call
  call_version = {1: 0, 2: 1, 3: 1}  # calls from the 4th on: 2
  version_of_call = lambda c: call_version.get(c, 2)
  carried_differs = waited_across_swap = 0
  for sample_ids, new in zip(ids, _SWAP_NEW_TOKENS):
    first_call = {sid: ended[sid] - -(-new // steps) + 1 for sid in sample_ids}
    prefill_version = version_of_call(min(first_call.values()))
    for sid in sample_ids:
      c0 = first_call[sid]
      expected = [version_of_call(c0 + j // steps) if j % steps else
                  version_of_call(c0 + j // steps - 1) if j else prefill_version
                  for j in range(new)]
      got = done[sid]
      np.testing.assert_array_equal(got.versions, expected)
      assert got.versions.dtype == np.int32 and np.all(np.diff(got.versions) >= 0)
      carried_differs += sum(e != version_of_call(c0 + j // steps)
                             for j, e in enumerate(expected))
      waited_across_swap += expected[0] != version_of_call(c0)
      assert got.tokens == want[sid].tokens
      np.testing.assert_array_equal(got.logprobs, want[sid].logprobs)
      np.testing.assert_array_equal(got.entropies, want[sid].entropies)
      np.testing.assert_array_equal(want[sid].versions, 0)
  # The case the bookkeeping exists for: tokens drawn from an older call's logits, and a
  # sample whose first token comes from a prefill older than its first decode call.
  assert carried_differs >= 2 and waited_across_swap >= 1
  assert {int(v) for c in done.values() for v in c.versions} == {0, 1, 2}


def test_a_swap_to_other_weights_changes_tokens_exactly_where_versions_change(model):
  """A -> B (other weights) after the 1st decode call: each sample's version-0 tokens and
  log-probs equal the A-only run's, its first version-1 token's log-prob differs from it, and
  a sample whose every token is version 1 has the training forward's log-probs under B."""
  config, params, dparams = model
  params_b = init_params(config, jax.random.key(7))
  dparams_b = prepare_params(params_b, config)
  requests = _swap_requests(config)
  ids, done, _, _ = _run_with_swaps(config, dparams, requests, {1: (dparams_b, 1)})
  _, want, _, _ = _run_with_swaps(config, dparams, requests, {})
  mixed = only_b = 0
  for request, sample_ids in zip(requests, ids):
    for sid in sample_ids:
      versions = done[sid].versions
      assert np.all(np.diff(versions) >= 0)
      n = int((versions == 0).sum())  # tokens drawn from A's logits
      assert done[sid].tokens[:n] == want[sid].tokens[:n]
      np.testing.assert_array_equal(done[sid].logprobs[:n], want[sid].logprobs[:n])
      if 0 < n < len(versions):
        mixed += 1
        assert done[sid].logprobs[n] != want[sid].logprobs[n]
      if n == 0:
        only_b += 1
        _check_against_training_forward(params_b, request.prompt, done[sid])
  assert mixed >= 2 and only_b >= 2


def test_set_params_from_another_thread_while_run_loops(model):
  """A thread pushes versions 1..20 (A and B weights in turn) while run() decodes; run()
  waits once, after its 2nd call, until the first push landed. Nothing fails, every version is
  0 or a pushed one, per sample non-decreasing, and some tokens are sampled after a push."""
  import threading  # pylint: disable=g-import-not-at-top
  config, _, dparams = model
  dparams_b = prepare_params(init_params(config, jax.random.key(7)), config)
  engine = Engine(config, dparams, **_ENGINE)
  for r in _swap_requests(config):
    engine.submit(r)
  started, pushed, errors = threading.Event(), threading.Event(), []

  def trainer():
    try:
      started.wait(60)
      for version in range(1, 21):
        engine.set_params(dparams_b if version % 2 else dparams, version)
        pushed.set()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      pushed.set()

  def on_step(_):
    started.set()
    if engine.stats["decode_calls"] == 2:
      assert pushed.wait(60), "the pushing thread never ran"

  thread = threading.Thread(target=trainer)
  thread.start()
  done = engine.run(on_step)
  thread.join(60)
  assert not errors and not thread.is_alive()
  versions = [c.versions for c in done.values()]
  assert all(c.error is None and len(c.versions) == len(c.tokens) for c in done.values())
  assert all(np.all(np.diff(v) >= 0) and set(v.tolist()) <= set(range(21)) for v in versions)
  assert max(int(v.max()) for v in versions) >= 1
  assert engine.version == 20


def test_a_kept_sequence_carries_its_logits_version_into_forks_and_extends(model):
  """A kept sample ends in a call of version 3 (swapped after its first call); after a swap
  to 7, a fork continued with no new tokens samples its first token from the kept logits
  (version 3), a fork extended with a tool output from that prefill's (version 7)."""
  config, _, dparams = model
  request = Request([5, 9, 33, 2, 71], 5, sampling=GREEDY, keep=True)
  [[sid]], done, _, engine = _run_with_swaps(config, dparams, [request], {1: (dparams, 3)})
  np.testing.assert_array_equal(done[sid].versions, [0, 0, 0, 0, 3])
  engine.set_params(dparams, 7)
  carried, extended = engine.fork(done[sid].sequence, 2)
  engine.release(done[sid].sequence)
  [a] = engine.submit(Request([], 4, sampling=GREEDY, continue_from=carried))
  [b] = engine.extend(extended, [400, 401], max_new_tokens=4, sampling=GREEDY)
  turn2 = engine.run()
  np.testing.assert_array_equal(turn2[a].versions, [3, 7, 7, 7])
  np.testing.assert_array_equal(turn2[b].versions, [7, 7, 7, 7])
  assert engine.allocator.num_used == 0


def test_set_params_never_goes_back_to_a_lower_version(model):
  """Engine and EngineSampler: a lower version is refused (False, weights kept), an equal
  one applied; EngineSampler remembers a push made before its engine exists, and
  generate(version=...) labels the tokens with it unless a later version was pushed."""
  config, _, dparams = model
  dparams_b = prepare_params(init_params(config, jax.random.key(7)), config)
  engine = Engine(config, dparams, version=3, **_ENGINE)
  assert not engine.set_params(dparams_b, 2) and engine.params is dparams
  assert engine.set_params(dparams_b, 3) and engine.params is dparams_b and engine.version == 3
  with pytest.raises(ValueError, match="DecodeParams"):
    engine.set_params({"embed": None}, 4)
  sampler = EngineSampler(config, **_ENGINE)
  assert sampler.set_params(dparams, 4)  # no engine yet: remembered
  versions = lambda result_rows: {int(v) for c in result_rows.values() for v in c.versions}
  for version, pushed, want in ((2, None, 4), (6, None, 6), (None, 5, 6), (None, 8, 8)):
    if pushed is not None:
      before = sampler.engine.version
      assert sampler.set_params(dparams, pushed) == (pushed >= before)
    rows = {}
    sampler.generate(dparams, [[3, 4, 5]], jax.random.key(0), max_new_tokens=4,
                     sampling=GREEDY, version=version,
                     on_finish=lambda row, c, rows=rows: rows.setdefault(row, c))
    assert versions(rows) == {want} and sampler.engine.version == want


def test_a_push_landing_during_a_decode_call_counts_from_the_next_call(model):
  """set_params called while a decode call runs (as a trainer thread may): that call's tokens
  and the logits it leaves (kept with the sequence) stay version 0; the continuation's first
  token comes from those logits (0), the rest from the new weights (5)."""
  config, _, dparams = model
  engine = Engine(config, dparams, **_ENGINE)
  decode = engine._fns["decode"]  # pylint: disable=protected-access

  def decode_then_push(*args, **kwargs):
    out = decode(*args, **kwargs)
    engine.set_params(dparams, 5)
    return out

  engine._fns = {**engine._fns, "decode": decode_then_push}  # pylint: disable=protected-access
  [sid] = engine.submit(Request([5, 9, 33], 3, sampling=GREEDY, keep=True))
  first = engine.run()[sid]
  np.testing.assert_array_equal(first.versions, [0, 0, 0])
  [nxt] = engine.submit(Request([], 4, sampling=GREEDY, continue_from=first.sequence))
  np.testing.assert_array_equal(engine.run()[nxt].versions, [0, 5, 5, 5])


def test_on_finish_streams_each_sample_once_and_take_finished_forgets(model):
  """on_finish gets every sample once, with the completion run() returns: a bad request's
  (unknown stop id) before the first decode call, a 2-token request's after the 1st call while
  a 12-token one ends after the 4th. take_finished (for step() callers) returns the ended
  samples, a submit-time error included, and forgets them."""
  config, _, dparams = model
  engine = Engine(config, dparams, **_ENGINE)
  short = engine.submit(Request([3, 4, 5], 2, sampling=GREEDY))
  bad = engine.submit(Request([3, 4], 2, stop_ids=(config.vocab_size,), num_samples=2))
  long = engine.submit(Request([8, 9], 12, sampling=GREEDY))
  calls = {}

  def on_finish(sid, completion):
    assert sid not in calls
    calls[sid] = (engine.stats["decode_calls"], completion)

  done = engine.run(on_finish=on_finish)
  assert set(calls) == set(done) == set(short + bad + long)
  assert all(completion is done[sid] for sid, (_, completion) in calls.items())
  assert [calls[s][0] for s in short + bad + long] == [1, 0, 0, 4]
  assert all("stop id" in done[s].error for s in bad) and done[long[0]].error is None
  assert len(done[long[0]].tokens) == 12
  # Driving step() directly: the ended samples are taken once.
  [error] = engine.submit(Request([1], 0))
  [good] = engine.submit(Request([3, 4, 5], 2, sampling=GREEDY))
  assert set(engine.take_finished()) == {error} and engine.take_finished() == {}
  while engine.busy:
    engine.step()
  finished = engine.take_finished()
  assert set(finished) == {good} and finished[good].tokens == done[short[0]].tokens
  assert engine.take_finished() == {} and engine.run() == {}


def test_engine_sampler_on_finish_gets_each_rows_completion(model, greedy_reference):
  """EngineSampler.generate(on_finish=...) calls it once per row (i*G + g) with the
  completion of that row of the result."""
  config, _, dparams = model
  prompts = greedy_reference[0][:3]
  rows = {}
  result = EngineSampler(config, **_ENGINE).generate(
      dparams, prompts, jax.random.key(0), max_new_tokens=5, num_samples=2,
      sampling=SamplingParams(1.0), on_finish=lambda row, c: rows.setdefault(row, []).append(c))
  assert sorted(rows) == list(range(6)) and all(len(c) == 1 for c in rows.values())
  for row, [completion] in rows.items():
    assert completion.tokens == result.token_lists()[row]
    np.testing.assert_array_equal(completion.logprobs, np.asarray(result.logprobs)[row])


def test_attention_plan_splits_long_rows_only_for_xla_and_keeps_a_spread_pool_on_xla(
    monkeypatch):
  from kat_jax.sampling import engine as engine_module  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny")
  assert attention_plan("auto", config, 16) == ("xla", 8)  # this CPU
  assert attention_plan("mosaic_gpu", config, 16) == ("mosaic_gpu", 0)
  assert attention_plan("xla", config, 16, spread=True) == ("xla", 8)
  monkeypatch.setattr(engine_module, "default_backend", lambda *a: "mosaic_gpu")  # a Hopper GPU
  assert attention_plan("auto", config, 16) == ("mosaic_gpu", 0)
  # A pool over several devices: XLA partitions its attention by kv head; a Pallas call would
  # gather the whole pool onto every device.
  assert attention_plan("auto", config, 16, spread=True) == ("xla", 8)


# ---- tail compaction (Engine(compact_widths=...)) ----


_TAIL_SAMPLING = SamplingParams(1.0, top_k=5)  # one params set: one program per shape


def _tail_run(config, dparams, compact_widths):
  """A long-tailed batch on 6 slots: 4 requests x 2 samples (one kept, forked in two and both
  branches extended from on_finish, so the busy count rises again after the tail began), a
  weight swap after the 2nd decode call; -> (completions, decode widths called, engine)."""
  engine = Engine(config, dparams, num_slots=6, num_pages=64, page_size=4, steps_per_call=3,
                  prefill_chunk=16, long_rows=1, min_table_pages=16,
                  compact_widths=compact_widths)
  widths = []
  decode = engine._fns["decode"]

  def counted(params, cache, logits, table, *args, **kwargs):
    widths.append(int(table.shape[0]))
    return decode(params, cache, logits, table, *args, **kwargs)

  engine._fns = dict(engine._fns, decode=counted)  # this engine's copy only
  rng = np.random.default_rng(7)
  # Request 3 (kept) waits for a slot; its second sample ends while only request 2's long one
  # runs beside it, so its forks' extends lift the busy count past 3 again.
  for i, new in enumerate(([3, 4], [5, 6], [7, 30], [8, 14])):
    prompt = rng.integers(1, config.vocab_size, size=3 + 4 * i).tolist()
    engine.submit(Request(prompt, new, sampling=_TAIL_SAMPLING, num_samples=2,
                          rng=jax.random.key(i), keep=i == 3, stop_ids=(3,) * (i == 0)))

  def on_step(_):
    if engine.stats["decode_calls"] == 2 and engine.version == 0:
      engine.set_params(dparams, 1)

  def on_finish(_, completion):
    if completion.sequence is not None:
      a, b = engine.fork(completion.sequence, 2)
      engine.release(completion.sequence)
      engine.extend(a, [5, 6, 7], max_new_tokens=9, sampling=_TAIL_SAMPLING,
                    rng=jax.random.key(10))
      engine.extend(b, [8], max_new_tokens=4, sampling=_TAIL_SAMPLING)

  return engine.run(on_step, on_finish), widths, engine


def test_tail_compaction_gives_the_full_width_engines_tokens_logprobs_and_versions(model):
  """With compact_widths=(3,), calls with <= 3 busy slots run 3 rows after moving the busy
  samples down, and the batch's busy count crosses 3 both ways (the forks' extends); every
  sample's tokens, log-probs, entropies, stop flag and versions equal the full-width engine's
  bit for bit, and every page comes back."""
  config, _, dparams = model
  want, full_widths, _ = _tail_run(config, dparams, ())
  got, widths, engine = _tail_run(config, dparams, (3,))
  assert set(full_widths) == {6} and len(widths) == len(full_widths)
  first_compact = widths.index(3)
  assert 6 in widths[first_compact:], "the busy count never rose past 3 after the tail began"
  assert engine.stats["compact_calls"] == widths.count(3) and engine.stats["moved_samples"] > 0
  assert want.keys() == got.keys() and len(want) == 12
  for sid, w in want.items():
    g = got[sid]
    assert (g.request, g.sample, g.tokens, g.stopped) == (w.request, w.sample, w.tokens,
                                                          w.stopped), sid
    for field in ("logprobs", "entropies", "versions"):
      np.testing.assert_array_equal(getattr(g, field), getattr(w, field), err_msg=f"{sid}")
  assert {v for c in got.values() for v in c.versions} == {0, 1}
  assert engine.allocator.num_used == 0


def test_move_rows_moves_rows_read_before_writes_and_skips_padding():
  from kat_jax.sampling.paged import move_rows  # pylint: disable=g-import-not-at-top
  logits = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
  # rows 4 -> 0 and 0 -> 4 (a swap: both read first); padding entries (dest 5) move nothing
  got = move_rows(jnp.asarray(logits), jnp.asarray([4, 0, 0, 0, 0]),
                  jnp.asarray([0, 4, 5, 5, 5]))
  np.testing.assert_array_equal(got, logits[[4, 1, 2, 3, 0]])


def test_compact_widths_outside_the_slots_error(model):
  config, _, dparams = model
  with pytest.raises(ValueError, match=r"compact_widths must lie in \[1, num_slots=4\), got 4"):
    Engine(config, dparams, **_ENGINE, compact_widths=(2, 4))


def test_compact_widths_default_to_the_engine_widths_below_num_slots(model):
  config, _, dparams = model
  wide = dict(_ENGINE, num_slots=64)
  assert Engine(config, dparams, **wide).compact_widths == DEFAULT_COMPACT_WIDTHS == (32,)
  assert Engine(config, dparams, **_ENGINE).compact_widths == ()  # 32 >= 4 slots
  assert Engine(config, dparams, **wide, compact_widths=()).compact_widths == ()


def test_page_table_rows_hold_each_sequences_pages_then_scratch(model):
  config, _, dparams = model
  engine = Engine(config, dparams, **_ENGINE)
  pages = [[5, 3], [], [7, 1, 2, 9, 4, 6, 8, 10, 11], [12]]
  table = engine._table(pages, 8)
  assert table.shape == (4, 16) and table.dtype == np.int32  # 9 pages -> a width of 16
  for row, want in zip(table, pages):
    assert row[:len(want)].tolist() == want and not row[len(want):].any()  # scratch page 0


_ENGINE_PROGRAMS = ("jit(decode_loop)", "jit(prefill_chunk)", "jit(copy_pages)", "jit(set_row)",
                    "jit(move_rows)")


def test_precompile_compiles_every_program_a_run_then_calls_and_changes_no_token(model):
  """Engine.precompile (2 threads) compiles each program once: decode at 5 and 2 rows, table
  widths 8 and 16, their cut widths (long_rows=1); prefill, page copies (4 and 8 pages),
  set_row, move_rows. The run afterwards compiles none of them and gives a fresh engine's
  tokens."""
  config, _, dparams = model
  compiled = []

  def listen(event, duration, **kwargs):
    del duration
    if event.endswith("backend_compile_duration") and kwargs.get("fun_name") in _ENGINE_PROGRAMS:
      compiled.append(kwargs["fun_name"])

  # pad_id 7: programs of their own (paged.jitted is cached per pad id), so none exists yet.
  shape = dict(num_slots=5, num_pages=64, page_size=4, steps_per_call=3, prefill_chunk=16,
               compact_widths=(2,), long_rows=1, pad_id=7)
  rng = np.random.default_rng(5)
  requests = [Request(rng.integers(1, config.vocab_size, size=n).tolist(), [3 + 11 * i, 7 + i],
                      sampling=_TAIL_SAMPLING, num_samples=2, rng=jax.random.key(i))
              for i, n in enumerate((3, 7, 12))]  # at most 12 + 25 = 37 tokens: 10 pages
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    engine = Engine(config, dparams, **shape)
    programs = engine.precompile(37, (_TAIL_SAMPLING,), prompt_length=12, workers=2)
    # Tables of 8 pages (cut 8) and 16 (cuts 8, 16) at 5 and 2 rows; one prefill shape. The
    # other programs are plain functions: another test may have compiled them for the same
    # shapes already.
    assert programs == 11
    assert compiled.count("jit(decode_loop)") == 6 and compiled.count("jit(prefill_chunk)") == 1
    assert len(compiled) <= programs
    compiled.clear()
    for r in requests:
      engine.submit(r)
    got = engine.run()
    assert compiled == [] and engine.stats["compact_calls"] > 0
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  fresh = Engine(config, dparams, **shape)
  for r in requests:
    fresh.submit(r)
  want = fresh.run()
  assert {k: c.tokens for k, c in got.items()} == {k: c.tokens for k, c in want.items()}
