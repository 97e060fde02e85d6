"""Rollout engine vs the static Sampler and the training forward: greedy tokens, log-probs,
entropies, shared prompt pages, forks, multi-turn extends, bad requests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import Decoder, get_preset, init_params
from kat_jax.sampling import GREEDY, Sampler, SamplingParams, prepare_params
from kat_jax.sampling.engine import Engine, EngineSampler, Request
from kat_jax.testing import relative_error

_CONFIG = dict(num_layers=1, initializer_range=0.3)
# One engine shape for most tests, so its programs compile once for the module.
_ENGINE = dict(num_slots=4, num_pages=32, page_size=4, steps_per_call=3, prefill_chunk=16)


@pytest.fixture(scope="module")
def model():
  config = get_preset("tiny", **_CONFIG)
  params = init_params(config, jax.random.key(0))
  return config, params, prepare_params(params, config)


@jax.jit
def _log_probs(params, tokens):
  logits = Decoder(get_preset("tiny", **_CONFIG)).apply({"params": params}, tokens)[0]
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _check_against_training_forward(params, prompt, completion):
  """The completion's log-probs / entropies equal the training forward's (float32)."""
  tokens = completion.tokens
  seq = np.zeros((1, 64), np.int32)
  seq[0, :len(prompt) + len(tokens)] = list(prompt) + tokens
  pred = np.asarray(_log_probs(params, jnp.asarray(seq)))[len(prompt) - 1:][:len(tokens)]
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
