"""KV-cache sampler vs the full training forward: greedy, log-probs, entropies, filters, forks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import Decoder, get_preset, init_params
from kat_jax.sampling import (GREEDY, Sampler, SamplingParams, cache_logical_axes, fork,
                              prepare_params, shard_decode_params)
from kat_jax.model.layers import rope_cos_sin
from kat_jax.sampling.forward import forward_chunk, fused_kernels_fit, rope_tables
from kat_jax.sampling.sampler import GPU_DECODE_COMPILER_OPTIONS, init_state
from kat_jax.sampling.logits import (choose_tokens, filter_logits, logprob_and_entropy,
                                     max_and_argmax, sample_with_stats)
from kat_jax.testing import relative_error

PROMPTS = [[3, 17, 250, 9], [100, 5, 7, 8, 9, 10, 11, 12, 13, 14, 60], [42]]


@pytest.fixture(scope="module")
def model():
  # A wider init than the default makes greedy outputs vary instead of echoing the input.
  config = get_preset("tiny", num_layers=2, initializer_range=0.3)
  params = init_params(config, jax.random.key(0))
  return config, params, prepare_params(params, config)


_REF_LEN = 64


@jax.jit
def _padded_log_probs(params, tokens):
  config = get_preset("tiny", num_layers=2, initializer_range=0.3)
  logits = Decoder(config).apply({"params": params}, tokens)[0]
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _full_log_probs(config, params, seq):
  """Training forward over one unpadded sequence -> float32 log-probs [T, V].

  Causal, so right-padding to one fixed length (one compile) leaves positions < T unchanged.
  """
  assert config == get_preset("tiny", num_layers=2, initializer_range=0.3)
  tokens = np.zeros((1, _REF_LEN), np.int32)
  tokens[0, :len(seq)] = seq
  return np.asarray(_padded_log_probs(params, jnp.asarray(tokens)))[:len(seq)]


def _greedy_reference(config, params, prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(np.argmax(_full_log_probs(config, params, seq)[-1])))
  return seq[len(prompt):]


def _check_against_full_forward(config, params, prompt, result, row):
  """Log-probs and entropies of `row`'s generated tokens equal the full forward's."""
  tokens = result.token_lists()[row]
  log_probs = _full_log_probs(config, params, list(prompt) + tokens)
  pred = log_probs[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
  expected_lp = pred[np.arange(len(tokens)), tokens]
  expected_ent = -np.sum(np.exp(pred) * pred, axis=-1)
  n = len(tokens)
  assert relative_error(np.asarray(result.logprobs)[row, :n], expected_lp) < 1e-5
  assert relative_error(np.asarray(result.entropies)[row, :n], expected_ent) < 1e-5


def test_greedy_equals_stepwise_full_forward_argmax(model):
  config, params, dparams = model
  sampler = Sampler(config)
  result = sampler.generate(dparams, PROMPTS, jax.random.key(0), max_new_tokens=7,
                            sampling=GREEDY)
  got = result.token_lists()
  for row, prompt in enumerate(PROMPTS):
    assert got[row] == _greedy_reference(config, params, prompt, 7)
    _check_against_full_forward(config, params, prompt, result, row)
  assert len({t for row in got for t in row}) > 3  # not a degenerate echo
  assert np.asarray(result.mask).all() and not np.asarray(result.stopped).any()


def test_sampled_logprobs_and_entropies_equal_training_forward(model):
  config, params, dparams = model
  result = Sampler(config).generate(dparams, PROMPTS, jax.random.key(3), max_new_tokens=9,
                                    sampling=SamplingParams(temperature=1.0))
  for row, prompt in enumerate(PROMPTS):
    _check_against_full_forward(config, params, prompt, result, row)
  assert np.all(np.asarray(result.entropies) > 0)


def _allowed(logits, top_k, top_p, temperature):
  """Numpy statement of the filters: top-k by logit, then the smallest top-p mass prefix."""
  scaled = logits / temperature
  allowed = np.ones_like(scaled, bool)
  if top_k:
    kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
    allowed &= scaled >= kth
  if top_p < 1:
    for b in range(scaled.shape[0]):
      vals = np.where(allowed[b], scaled[b], -np.inf)
      order = np.argsort(-vals, kind="stable")
      probs = np.exp(vals[order] - vals[order][0])
      probs /= probs.sum()
      keep = (np.cumsum(probs) - probs) < top_p
      threshold = vals[order][keep].min()
      allowed[b] &= vals >= threshold
  return allowed


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_logprob_and_entropy_match_float64_definitions(scale):
  """Flat, typical and peaked distributions over a Qwen-sized vocabulary; -inf logits add 0."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 151936)) * scale
  logits[2, ::7] = -np.inf
  tokens = np.array([0, int(np.argmax(logits[1])), 5])
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  p = np.exp(log_p)
  want_ent = -np.sum(p * np.where(p > 0, log_p, 0.0), -1)
  got, ent = logprob_and_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens))
  assert relative_error(got, log_p[np.arange(3), tokens]) < 1e-5
  assert relative_error(ent, want_ent) < 1e-5
  assert np.all(np.isfinite(np.asarray(ent)))


def test_max_and_argmax_equal_jnp_max_and_argmax():
  """Ties take the first index (as jnp.argmax does); -inf and all -inf rows included."""
  rng = np.random.default_rng(2)
  logits = rng.integers(-3, 4, size=(5, 1000)).astype(np.float32)  # many ties
  logits[1, ::3] = -np.inf
  logits[2] = -np.inf
  logits[3, 999] = 10.0
  m, index = max_and_argmax(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(m), logits.max(-1))
  np.testing.assert_array_equal(np.asarray(index), np.argmax(logits, -1))
  assert index.dtype == jnp.int32


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(0.0, vocab_limit=100),
                                      SamplingParams(0.8, top_k=20)])
def test_sample_with_stats_equals_choose_then_logprob_and_entropy(sampling):
  """The greedy shortcut (no gather: the argmax's shifted logit is 0) gives the same bits as
  choosing the token and then computing its log-prob and the entropy."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 151936)) * 4, jnp.float32)
  key = jax.random.key(1)
  tokens, logprob, entropy = jax.jit(sample_with_stats, static_argnums=2)(logits, key, sampling)
  want_tokens = choose_tokens(logits, key, sampling)
  want_logprob, want_entropy = logprob_and_entropy(logits, want_tokens)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))
  np.testing.assert_array_equal(np.asarray(logprob), np.asarray(want_logprob))
  np.testing.assert_array_equal(np.asarray(entropy), np.asarray(want_entropy))
  if sampling.vocab_limit:
    assert np.all(np.asarray(tokens) < sampling.vocab_limit)


def test_rope_tables_hold_each_positions_rows(model):
  """Row p of the tables is rope_cos_sin at position p, and a prefill chunk and a decode step
  given the tables equal the same calls computing their own."""
  config, _, dparams = model
  cos, sin = rope_tables(config, 40)
  want_cos, want_sin = rope_cos_sin(jnp.arange(40)[None], config.head_dim, config.rope_theta,
                                    config.compute_dtype)
  np.testing.assert_array_equal(np.asarray(cos), np.asarray(want_cos[0, :, 0]))
  np.testing.assert_array_equal(np.asarray(sin), np.asarray(want_sin[0, :, 0]))
  state = init_state(config, 2, 40)
  tokens = jnp.asarray([[0, 5, 6, 7], [1, 2, 3, 4]])
  valid = jnp.asarray([[False, True, True, True], [True] * 4])
  for kernels, length in (("xla", 4), ("fused_interpret", 1)):
    args = (dparams, config, state.cache, tokens[:, -length:], valid[:, -length:],
            jnp.int32(0), kernels)
    cache, logits = forward_chunk(*args)
    cache_t, logits_t = forward_chunk(*args, rope=(cos, sin))
    np.testing.assert_array_equal(np.asarray(logits_t), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(cache_t["k"][1]), np.asarray(cache["k"][1]))


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (20, 0.8)])
def test_filters_never_sample_outside_the_allowed_set(top_k, top_p):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
  sampling = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
  keys = jax.random.split(jax.random.key(0), 400)
  samples = np.asarray(jax.vmap(lambda k: choose_tokens(logits, k, sampling))(keys))  # [400, 4]
  allowed = _allowed(np.asarray(logits), top_k, top_p, 0.7)
  for b in range(4):
    assert allowed[b][samples[:, b]].all()
    assert 1 < allowed[b].sum() < 64
    assert len(set(samples[:, b])) > 1  # really sampling
  kept = np.isfinite(np.asarray(filter_logits(logits, sampling)))
  np.testing.assert_array_equal(kept, allowed)


def test_top_k_in_decode_loop_stays_in_full_forward_top_k(model):
  config, params, dparams = model
  result = Sampler(config).generate(dparams, PROMPTS[:2], jax.random.key(1), max_new_tokens=6,
                                    sampling=SamplingParams(temperature=2.0, top_k=3))
  for row, prompt in enumerate(PROMPTS[:2]):
    tokens = result.token_lists()[row]
    log_probs = _full_log_probs(config, params, list(prompt) + tokens)
    for t, token in enumerate(tokens):
      top3 = np.argsort(-log_probs[len(prompt) - 1 + t])[:3]
      assert token in top3


def test_stop_tokens_end_sequences(model):
  config, _, dparams = model
  sampler = Sampler(config, pad_id=0)
  free = sampler.generate(dparams, PROMPTS, jax.random.key(0), max_new_tokens=8,
                          sampling=GREEDY).token_lists()
  stop = free[0][2]  # row 0 stops at its 3rd token
  result = sampler.generate(dparams, PROMPTS, jax.random.key(0), max_new_tokens=8,
                            sampling=GREEDY, stop_ids=(stop,))
  got = result.token_lists()
  mask, tokens = np.asarray(result.mask), np.asarray(result.tokens)
  first = free[0].index(stop)
  assert got[0] == free[0][:first + 1] and bool(result.stopped[0])
  assert not mask[0, first + 1:].any() and (tokens[0, first + 1:] == 0).all()
  assert (np.asarray(result.logprobs)[0, first + 1:] == 0).all()
  for row in (1, 2):  # other rows run on unless they emit the stop token too
    n = free[row].index(stop) + 1 if stop in free[row] else 8
    assert got[row] == free[row][:n]
    assert bool(result.stopped[row]) == (stop in free[row])


def test_loop_ends_when_all_rows_stop(model):
  config, _, dparams = model
  sampler = Sampler(config)
  first = sampler.generate(dparams, PROMPTS[:1], jax.random.key(0), max_new_tokens=3,
                           sampling=GREEDY).token_lists()[0][0]
  result = sampler.generate(dparams, PROMPTS[:1], jax.random.key(0), max_new_tokens=50,
                            sampling=GREEDY, stop_ids=(first,))
  assert result.token_lists() == [[first]] and result.lengths.tolist() == [1]


def test_compiler_options_reach_the_decode_loop(model):
  """The GPU default options (command buffers over the while loop) compile here too and
  change no token; a bad value fails the decode's compilation naming the option."""
  config, _, dparams = model
  generate = lambda sampler: sampler.generate(dparams, PROMPTS, jax.random.key(5),
                                              max_new_tokens=5, sampling=GREEDY)
  want = generate(Sampler(config, compiler_options={}))
  got = generate(Sampler(config, compiler_options=GPU_DECODE_COMPILER_OPTIONS))
  assert got.token_lists() == want.token_lists()
  with pytest.raises(Exception, match="xla_gpu_enable_command_buffer.*BOGUS"):
    generate(Sampler(config, compiler_options={"xla_gpu_enable_command_buffer": "BOGUS"}))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_kernels_equal_xla_decode(model, dtype):
  """The fused Pallas decode step (interpret mode here) generates what the XLA step does, at
  1 and 4 rows; 5 rows (above MAX_BATCH) fall back to the XLA step."""
  config, params, _ = model
  config = config.replace(dtype=dtype)
  dparams = prepare_params(params, config)
  sampling = SamplingParams(temperature=1.0, top_k=20)
  prompts = PROMPTS + [[7, 8, 9], [11, 12]]
  assert fused_kernels_fit(config, 4) and not fused_kernels_fit(config, 5)
  # The fallback above MAX_BATCH does not depend on the dtype: float32 checks it.
  for rows in (prompts[:1], prompts[:4]) + ((prompts,) if dtype == "float32" else ()):
    want = Sampler(config, kernels="xla").generate(dparams, rows, jax.random.key(4),
                                                   max_new_tokens=6, sampling=sampling,
                                                   stop_ids=(5,))
    got = Sampler(config, kernels="fused_interpret").generate(
        dparams, rows, jax.random.key(4), max_new_tokens=6, sampling=sampling, stop_ids=(5,))
    # Whole generated sequences, every token's log-prob. bf16 roundings differ between the
    # two steps (log-probs up to ~0.08 apart here); none of these choices is near enough a
    # tie to flip, so a token mismatch is a real difference.
    assert got.token_lists() == want.token_lists()
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    if dtype == "float32":
      assert relative_error(got.logprobs, want.logprobs) < 1e-5
    else:
      diff = np.abs(np.asarray(got.logprobs) - np.asarray(want.logprobs))
      assert float(np.max(diff * np.asarray(want.mask))) < 0.15
  with pytest.raises(ValueError, match="kernels"):
    Sampler(config, kernels="triton")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Triton "
                    "kernels; run with KAT_TEST_GPU=1); the interpreted test above is the CPU "
                    "counterpart")
def test_gpu_fused_decode_with_default_tiles_equals_xla_decode(model):
  """The compiled fused step with the production `DECODE_TILES` (persistent grids sized by the
  GPU's SM count, 512-column loads where K allows) against the XLA step, float32."""
  config, params, _ = model
  config = config.replace(dtype="float32")
  dparams = prepare_params(params, config)
  for rows in (PROMPTS[:1], PROMPTS[:2] + [[7, 8, 9], [11, 12]]):
    want, got = (Sampler(config, kernels=kernels).generate(
        dparams, rows, jax.random.key(4), max_new_tokens=6, sampling=GREEDY)
                 for kernels in ("xla", "fused"))
    assert got.token_lists() == want.token_lists()  # every row, every generated token
    assert relative_error(got.logprobs, want.logprobs) < 1e-4
    assert relative_error(got.entropies, want.entropies) < 1e-4


def test_group_fork_equals_separate_prefills(model):
  config, _, dparams = model
  sampler = Sampler(config, donate=False)
  forked = fork(sampler.prefill(dparams, PROMPTS[:2], max_length=40), 3)
  separate = sampler.prefill(dparams, [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, max_length=40)
  assert forked.end == separate.end
  for a, b in zip(jax.tree.leaves(forked), jax.tree.leaves(separate)):
    assert relative_error(a, b) < 1e-5  # batch 6 vs 2 may take other matmul paths
  sampling = SamplingParams(temperature=1.0, top_p=0.9)
  got, _ = sampler.decode(dparams, forked, jax.random.key(5), max_new_tokens=6,
                          sampling=sampling)
  want, _ = sampler.decode(dparams, separate, jax.random.key(5), max_new_tokens=6,
                           sampling=sampling)
  assert got.token_lists() == want.token_lists()
  assert relative_error(got.logprobs, want.logprobs) < 1e-5
  # Rows of one group draw different samples from the same prefix.
  assert len({tuple(t) for t in got.token_lists()[:3]}) > 1


def test_multi_turn_continuation_equals_fresh_prefill(model):
  config, _, dparams = model
  sampler = Sampler(config, prefill_chunk=8)
  state = sampler.prefill(dparams, PROMPTS, max_length=80)
  free = Sampler(config).generate(dparams, PROMPTS, jax.random.key(0), max_new_tokens=6,
                                  sampling=GREEDY).token_lists()
  result, state = sampler.decode(dparams, state, jax.random.key(0), max_new_tokens=6,
                                 sampling=GREEDY, stop_ids=(free[1][1],))  # ragged ends
  generated = result.token_lists()
  assert len(generated[1]) == 2 and len(generated[0]) > 2
  tool = [[301, 302, 303, 304, 305], [306, 307], [308, 309, 310, 311, 312, 313, 314, 315, 316]]
  state = sampler.extend(dparams, state, tool)
  whole = [p + g + t for p, g, t in zip(PROMPTS, generated, tool)]
  fresh = Sampler(config).prefill(dparams, whole, max_length=80)
  assert relative_error(state.logits, fresh.logits) < 1e-5
  np.testing.assert_array_equal(np.asarray(state.lengths), [len(w) for w in whole])
  cont, _ = sampler.decode(dparams, state, jax.random.key(1), max_new_tokens=5, sampling=GREEDY)
  ref, _ = Sampler(config).decode(dparams, fresh, jax.random.key(1), max_new_tokens=5,
                                  sampling=GREEDY)
  assert cont.token_lists() == ref.token_lists()
  assert relative_error(cont.logprobs, ref.logprobs) < 1e-5


def test_chunked_prefill_equals_one_chunk(model):
  config, _, dparams = model
  long_prompts = [list(range(1, 30)), list(range(40, 45))]
  one = Sampler(config, prefill_chunk=512).prefill(dparams, long_prompts, max_length=64)
  chunked = Sampler(config, prefill_chunk=8).prefill(dparams, long_prompts, max_length=64)
  assert relative_error(chunked.logits, one.logits) < 1e-5


def test_bfloat16_model_generates(model):
  _, params, _ = model
  config = get_preset("tiny", num_layers=2, initializer_range=0.3, dtype="bfloat16")
  dparams = prepare_params(params, config)
  assert dparams.layers[0]["qkv"].dtype == jnp.bfloat16
  result = Sampler(config).generate(dparams, PROMPTS, jax.random.key(0), max_new_tokens=5,
                                    sampling=SamplingParams(temperature=0.8, top_k=10))
  assert np.isfinite(np.asarray(result.logprobs)).all()
  assert result.lengths.tolist() == [5, 5, 5]


def test_cache_logical_axes(model):
  config, _, dparams = model
  state = Sampler(config).prefill(dparams, PROMPTS, max_length=16)
  axes = cache_logical_axes(state)
  assert tuple(axes.cache["k"][0]) == ("cache_batch", "cache_length", "kv_heads", "head_dim")
  assert len(axes.cache["v"]) == config.num_layers
  assert state.cache["k"][0].shape == (3, 16, config.num_kv_heads, config.head_dim)


def test_clear_errors(model):
  config, params, dparams = model
  sampler = Sampler(config)
  with pytest.raises(ValueError, match="prepare_params"):
    sampler.prefill(params, PROMPTS, max_length=32)
  with pytest.raises(ValueError, match="overflows the cache"):
    sampler.prefill(dparams, PROMPTS, max_length=8)
  state = sampler.prefill(dparams, PROMPTS, max_length=20)
  with pytest.raises(ValueError, match="overflows the cache"):
    sampler.decode(dparams, state, jax.random.key(0), max_new_tokens=10)
  with pytest.raises(ValueError, match="empty prompt"):
    sampler.prefill(dparams, [[1], []], max_length=32)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="3 sequences for a batch of 2"):
    sampler.extend(dparams, sampler.prefill(dparams, PROMPTS[:2], max_length=32), PROMPTS)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: the CPU run's virtual "
                    "devices (tests/conftest.py); a one-GPU run (KAT_TEST_GPU=1) has one")
def test_sampler_on_a_device_mesh_shards_the_cache_and_keeps_the_output(model):
  """On the 8 virtual CPU devices (data 2 × fsdp 2 × tensor 2), the cache is sharded by the
  mesh rules (rows over data and fsdp, kv heads over tensor), the decode weights split over
  tensor (`shard_decode_params`), and generation is unchanged."""
  from kat_jax.parallel.mesh import make_mesh, sharding_context  # pylint: disable=g-import-not-at-top
  config, _, dparams = model
  prompts = PROMPTS + [[1, 2]]
  sampling = SamplingParams(temperature=1.0)
  want = Sampler(config).generate(dparams, prompts, jax.random.key(1), max_new_tokens=6,
                                  sampling=sampling)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharded = shard_decode_params(dparams, mesh)
  assert sharded.head is sharded.embed  # tied: one array
  layer = sharded.layers[0]
  for name, spec, shard_shape in (
      ("qkv", ("tensor", None), (layer["qkv"].shape[0] // 2, config.hidden_size)),
      ("gate_up", ("tensor", None), (config.intermediate_size, config.hidden_size)),
      ("o", (None, "tensor"), (config.hidden_size, layer["o"].shape[1] // 2)),
      ("down", (None, "tensor"), (config.hidden_size, config.intermediate_size // 2))):
    assert tuple(layer[name].sharding.spec) == spec
    assert layer[name].addressable_shards[0].data.shape == shard_shape
  assert tuple(sharded.embed.sharding.spec) == ("tensor", None)
  with sharding_context(mesh):
    sampler = Sampler(config)
    state = sampler.prefill(sharded, prompts, max_length=32)
    got, state = sampler.decode(sharded, state, jax.random.key(1), max_new_tokens=6,
                                sampling=sampling)
  spec = state.cache["k"][0].sharding.spec
  assert tuple(spec)[:3] == (("data", "fsdp"), None, "tensor")
  assert got.token_lists() == want.token_lists()
  assert relative_error(got.logprobs, want.logprobs) < 1e-5
  assert relative_error(got.entropies, want.entropies) < 1e-5


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: the CPU run's virtual "
                    "devices (tests/conftest.py); a one-GPU run (KAT_TEST_GPU=1) has one")
def test_untied_head_shards_its_vocabulary_columns():
  """An untied LM head is [d, V]: its vocabulary (second) dimension goes over tensor."""
  from kat_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny", num_layers=1, tie_word_embeddings=False)
  dparams = prepare_params(init_params(config, jax.random.key(0)), config)
  sharded = shard_decode_params(dparams, make_mesh(data=4, fsdp=1, tensor=2))
  assert sharded.head is not sharded.embed
  assert tuple(sharded.head.sharding.spec) == (None, "tensor")
  assert sharded.head.addressable_shards[0].data.shape == (config.hidden_size,
                                                           config.vocab_size // 2)
  np.testing.assert_array_equal(np.asarray(sharded.head), np.asarray(dparams.head))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: the CPU run's virtual "
                    "devices (tests/conftest.py); a one-GPU run (KAT_TEST_GPU=1) has one")
@pytest.mark.parametrize("tied", [True, False])
def test_prepare_params_on_a_mesh_places_what_shard_decode_params_places(tied):
  """prepare_params(..., mesh) writes the decode copy straight into the tensor-parallel layout:
  the same values and shardings as building it unplaced and then `shard_decode_params`."""
  from kat_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny", num_layers=2, tie_word_embeddings=tied)
  params = init_params(config, jax.random.key(0))
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  want = shard_decode_params(prepare_params(params, config), mesh)
  got = prepare_params(params, config, mesh)
  assert (got.head is got.embed) == tied  # a tied head stays one array
  leaves = lambda p: jax.tree.leaves_with_path(p)  # noqa: E731
  for (path, g), (_, w) in zip(leaves(got), leaves(want), strict=True):
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (path, g.sharding, w.sharding)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))
  assert prepare_params(got, config) is got  # already decode params: returned as they are
