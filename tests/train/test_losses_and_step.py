"""Chunked loss equals the full-logits reference; accumulation leaves the update unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from kat_jax.testing import assert_trees_close, relative_error
from kat_jax.model import Decoder, get_preset, init_params, lm_head_kernel
from kat_jax.train.losses import chunked_cross_entropy, full_logits_cross_entropy, head_logits
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.state import create_train_state
from kat_jax.train.step import make_train_step


def _config():
  return get_preset("tiny", num_layers=2)


def _random_batch(rng, batch, length, vocab=500):
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  pred_index = np.maximum(positions - 1, 0)
  weights = rng.random((batch, length)).astype(np.float32)
  weights[:, 0] = 0.0
  kv_end = np.full((batch, length), length, np.int32)
  return {k: jnp.asarray(v) for k, v in dict(tokens=tokens, positions=positions, kv_end=kv_end,
                                              pred_index=pred_index, weights=weights).items()}


def test_chunked_cross_entropy_matches_full_logits_and_gradients():
  config = _config()
  params = init_params(config, jax.random.key(0))
  batch = _random_batch(np.random.default_rng(0), 3, 11)
  model = Decoder(config)

  def chunked(p):
    hidden = model.apply({"params": p}, batch["tokens"], return_hidden=True)
    loss, _ = chunked_cross_entropy(hidden, lm_head_kernel(p, config), batch["tokens"],
                                    batch["pred_index"], batch["weights"], chunk_size=7)
    return loss

  def full(p):
    logits = model.apply({"params": p}, batch["tokens"])
    return full_logits_cross_entropy(logits, batch["tokens"], batch["pred_index"],
                                     batch["weights"])

  # Jitted: one compile each instead of op-by-op dispatch of the forward and backward passes.
  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params) for f in (chunked, full))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert_trees_close(g1, g2, rtol=1e-5)


def _optim():
  return ConfigDict(dict(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9,
                         b2=0.95, eps=1e-8, clip_norm=1.0))


def test_gradient_accumulation_gives_the_same_update():
  config = _config()
  params = init_params(config, jax.random.key(1))
  optimizer = make_optimizer(_optim(), total_steps=10)
  batch = _random_batch(np.random.default_rng(1), 4, 9)
  results = []
  # 1 = no accumulation; 4 = the same scan over micro-batches as 2 would be, one row each.
  for accum in (1, 4):
    step = jax.jit(make_train_step(config, optimizer, grad_accum=accum, loss_chunk=16))
    state, metrics = step(create_train_state(params, optimizer), batch)
    results.append((state, metrics))
  for state, metrics in results[1:]:
    np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
    assert_trees_close(state.params, results[0][0].params, rtol=1e-6)
  assert int(results[0][0].step) == 1


def test_training_reduces_loss_on_a_fixed_batch():
  config = _config()
  optimizer = make_optimizer(_optim(), total_steps=30)
  state = create_train_state(init_params(config, jax.random.key(2)), optimizer)
  batch = _random_batch(np.random.default_rng(2), 2, 16, vocab=50)
  step = jax.jit(make_train_step(config, optimizer))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]


def _head_grads(hidden, kernel, probe, fn):
  return jax.grad(lambda h, k: jnp.sum(probe * fn(h, k)), argnums=(0, 1))(hidden, kernel)


def _autodiff_head(h, k):
  return jnp.einsum("nd,dv->nv", h, k.astype(h.dtype), preferred_element_type=jnp.float32)


def test_head_logits_float32_equals_autodiff():
  rng = np.random.default_rng(0)
  h, k, probe = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((9, 16), (16, 40), (9, 40)))
  np.testing.assert_array_equal(head_logits(h, k), _autodiff_head(h, k))
  for got, want in zip(_head_grads(h, k, probe, head_logits),
                       _head_grads(h, k, probe, _autodiff_head)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_head_logits_bf16_backward_uses_bf16_products():
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((33, 64)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((64, 300)) * 0.1, jnp.float32)
  probe = jnp.asarray(rng.standard_normal((33, 300)), jnp.float32)
  dh, dk = _head_grads(h, k, probe, head_logits)
  assert dh.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  ref_dh, ref_dk = _head_grads(h.astype(jnp.float32), k, probe, _autodiff_head)
  assert relative_error(dh.astype(jnp.float32), ref_dh) < 1e-2
  assert relative_error(dk, ref_dk) < 1e-2
  jaxpr = jax.make_jaxpr(lambda h, k: _head_grads(h, k, probe, head_logits))(h, k)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2  # d_hidden, d_kernel (grad drops the unused forward product)
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
