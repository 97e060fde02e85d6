"""Chunked KD / ULD against naive full-logit references, ULD variants, slicing, temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.distill.losses import (DistillSpec, TeacherHidden, TeacherTopK, distill_loss,
                                    forward_kl, forward_kl_topk, token_loss_on_logits,
                                    topk_logprobs, uld, uld_topk_teacher)
from kat_jax.testing import relative_error

B, T, D_S, D_T = 2, 7, 8, 12


def _setup(vs=11, vt=11, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  s_hidden = jax.random.normal(ks[0], (B, T, D_S))
  s_head = jax.random.normal(ks[1], (D_S, vs))
  t_hidden = jax.random.normal(ks[2], (B, T, D_T))
  t_head = 1.5 * jax.random.normal(ks[3], (D_T, vt))
  s_index = jax.random.randint(ks[4], (B, T), 0, T)
  t_index = jax.random.randint(ks[5], (B, T), 0, T)
  weights = jnp.asarray(np.random.default_rng(seed).uniform(0, 2, (B, T)), jnp.float32)
  weights = weights.at[0, 3].set(0.0)
  return s_hidden, s_head, t_hidden, t_head, s_index, t_index, weights


def _naive(spec, s_hidden, s_head, t_hidden, t_head, s_index, t_index, weights):
  """Full [B,T,V] logits of both models, gathered, per-token loss on everything at once."""
  s_logits = jnp.einsum("btd,dv->btv", s_hidden, s_head)
  t_logits = jnp.einsum("btd,dv->btv", t_hidden, t_head)
  s_at = jnp.take_along_axis(s_logits, s_index[..., None], axis=1).reshape(B * T, -1)
  t_at = jnp.take_along_axis(t_logits, t_index[..., None], axis=1).reshape(B * T, -1)
  return jnp.sum(weights.reshape(-1) * token_loss_on_logits(spec, s_at, t_at))


@pytest.mark.parametrize("spec,vs,vt,chunk", [
    (DistillSpec("kd", temperature=2.0), 11, 11, 3),
    (DistillSpec("kd", student_vocab=9, teacher_vocab=9), 11, 13, 64),
    (DistillSpec("uld", student_temperature=1.5), 11, 17, 3),
    (DistillSpec("uld", uld_top_k=4), 11, 11, 5),
])
def test_chunked_distill_matches_naive_values_and_gradients(spec, vs, vt, chunk):
  s_hidden, s_head, t_hidden, t_head, s_index, t_index, w = _setup(vs, vt)

  def chunked(h, head):
    return distill_loss(spec, h, head, s_index, TeacherHidden(t_hidden, t_head), t_index, w,
                        chunk_size=chunk)

  def naive(h, head):
    return _naive(spec, h, head, t_hidden, t_head, s_index, t_index, w)

  v1, g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(s_hidden, s_head)
  v2, g2 = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(s_hidden, s_head)
  assert relative_error(v1, v2) < 1e-5
  for a, b in zip(g1, g2):
    assert relative_error(a, b) < 1e-5
  assert float(v1) > 0


def test_teacher_gets_no_gradient():
  s_hidden, s_head, t_hidden, t_head, s_index, t_index, w = _setup()
  grads = jax.grad(lambda th, tw: distill_loss(
      DistillSpec("kd"), s_hidden, s_head, s_index, TeacherHidden(th, tw), t_index, w),
      argnums=(0, 1))(t_hidden, t_head)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_uld_exact_equals_top_k_with_k_equal_vocab():
  s, t = jax.random.normal(jax.random.key(1), (2, 5, 13))
  exact = uld(s, t)
  np.testing.assert_allclose(uld(s, t, top_k=13), exact, rtol=1e-6)
  np.testing.assert_allclose(uld(s, t, top_k=100), exact, rtol=1e-6)
  assert float(jnp.min(exact - uld(s, t, top_k=3))) >= -1e-7  # truncation only drops terms


def test_uld_zero_pads_the_smaller_vocabulary():
  s = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  t = jnp.log(jnp.array([[0.1, 0.6, 0.1, 0.15, 0.05]]))
  # sorted: s = .5 .3 .2 0 0 ; t = .6 .15 .1 .1 .05
  expected = 0.1 + 0.15 + 0.1 + 0.1 + 0.05
  np.testing.assert_allclose(uld(s, t), [expected], rtol=1e-6)
  np.testing.assert_allclose(uld(t, s), [expected], rtol=1e-6)


def test_vocab_slicing_ignores_padded_rows():
  s, t = jax.random.normal(jax.random.key(2), (2, 4, 10))
  junk = jnp.full((4, 6), 50.0)  # padded vocab rows of different sizes, huge logits
  spec = DistillSpec("kd", student_vocab=10, teacher_vocab=10)
  sliced = token_loss_on_logits(spec, jnp.concatenate([s, junk], -1),
                                jnp.concatenate([t, junk[:, :3]], -1))
  np.testing.assert_allclose(sliced, forward_kl(s, t), rtol=1e-6)
  with pytest.raises(ValueError, match="one vocabulary"):
    forward_kl(s, t[:, :9])
  with pytest.raises(ValueError, match="larger than"):
    token_loss_on_logits(DistillSpec("kd", student_vocab=20), s, t)


def test_temperature_scaling_matches_numpy():
  s, t = np.random.default_rng(3).normal(size=(2, 3, 6)) * 2
  tau = 2.5

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  ps, pt = softmax(s / tau), softmax(t / tau)
  expected = tau**2 * np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  np.testing.assert_allclose(forward_kl(jnp.asarray(s), jnp.asarray(t), tau), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(forward_kl(jnp.asarray(s), jnp.asarray(s), tau), 0, atol=1e-6)


def test_topk_teacher_with_full_k_equals_dense_teacher():
  s, t = jax.random.normal(jax.random.key(4), (2, 6, 9))
  lp, ids = topk_logprobs(t, 9)
  np.testing.assert_allclose(forward_kl_topk(s, lp, ids, 1.7), forward_kl(s, t, 1.7),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(uld_topk_teacher(s, lp), uld(s, t), rtol=1e-5, atol=1e-7)


def test_offline_topk_loss_matches_online_when_k_is_the_vocabulary():
  s_hidden, s_head, t_hidden, t_head, s_index, t_index, w = _setup()
  t_logits = jnp.einsum("btd,dv->btv", t_hidden, t_head)
  lp, ids = jax.vmap(lambda x: topk_logprobs(x, 11))(t_logits)
  for kind in ("kd", "uld"):
    spec = DistillSpec(kind)
    online = distill_loss(spec, s_hidden, s_head, s_index, TeacherHidden(t_hidden, t_head),
                          t_index, w)
    offline = distill_loss(spec, s_hidden, s_head, s_index, TeacherTopK(lp, ids), t_index, w)
    assert relative_error(offline, online) < 1e-5


def test_spec_rejects_bad_fields():
  with pytest.raises(ValueError, match="kind"):
    DistillSpec("jsd")
  with pytest.raises(ValueError, match="temperature"):
    DistillSpec("kd", temperature=0.0)
  with pytest.raises(ValueError, match="uld_top_k"):
    DistillSpec("uld", uld_top_k=0)
