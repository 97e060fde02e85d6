"""Decoder tests: parameter counts, the kv_end mask semantics, dtype/remat/scan invariance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels.reference import attention_reference, visibility_mask
from kat_jax.testing import assert_trees_close
from kat_jax.model import Decoder, ModelConfig, get_preset, init_params, param_shapes


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, expected", [
    ("qwen2.5-0.5b", 494_032_768),  # published (docs/spec.md §1.2)
    ("qwen2.5-1.5b", 1_543_714_304),  # published (docs/spec.md §1.2)
    # The issue quotes 7,615,624,192; the shapes of docs/spec.md §1.3 give 7,615,616,512, which is
    # what HF's model.safetensors.index.json declares (total_size 15,231,233,024 bf16 bytes).
    ("qwen2.5-7b", 7_615_616_512),
    ("qwen2.5-32b", 32_763_876_352),  # published (docs/spec.md §1.2)
    ("kat-v1-40b", 40_565_560_320),  # 32B shapes with 80 layers
])
def test_param_count_matches_published(name, expected):
  config = get_preset(name)
  shapes = param_shapes(config)  # eval_shape: nothing is allocated
  assert _count(shapes) == expected
  assert config.num_params() == expected


def test_unknown_preset_and_bad_fields_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
    get_preset("qwen9")
  with pytest.raises(ValueError, match="unknown ModelConfig fields"):
    get_preset("tiny", hiden_size=3)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    get_preset("tiny", num_kv_heads=3)


def _tiny(**overrides) -> ModelConfig:
  return get_preset("tiny", **{"num_layers": 2, **overrides})


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, positions=None, kv_end=None):
  return Decoder(config).apply({"params": params}, tokens, positions, kv_end)


def test_packed_documents_equal_separate_forwards():
  """Two documents packed into one row with kv_end/positions give each document's own logits."""
  config = _tiny()
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(0, 500, 7), rng.integers(0, 500, 5)
  packed = np.concatenate([doc_a, doc_b])[None]
  positions = np.concatenate([np.arange(7), np.arange(5)])[None]
  kv_end = np.array([[7] * 7 + [12] * 5])
  out = _forward(config, params, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(kv_end))
  alone_a = _forward(config, params, jnp.asarray(doc_a[None]))
  alone_b = _forward(config, params, jnp.asarray(doc_b[None]))
  np.testing.assert_allclose(out[0, :7], alone_a[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 7:], alone_b[0], rtol=1e-5, atol=1e-5)


def test_tree_row_equals_unrolled_paths():
  """A prefix tree (root + two children) laid out depth-first equals its two unrolled paths."""
  config = _tiny()
  params = init_params(config, jax.random.key(1))
  rng = np.random.default_rng(1)
  root, left, right = rng.integers(0, 500, 4), rng.integers(0, 500, 3), rng.integers(0, 500, 2)
  row = np.concatenate([root, left, right])[None]
  positions = np.concatenate([np.arange(4), 4 + np.arange(3), 4 + np.arange(2)])[None]
  kv_end = np.array([[9] * 4 + [7] * 3 + [9] * 2])  # subtree ends in depth-first order
  out = _forward(config, params, jnp.asarray(row), jnp.asarray(positions), jnp.asarray(kv_end))
  path_l = _forward(config, params, jnp.asarray(np.concatenate([root, left])[None]))
  path_r = _forward(config, params, jnp.asarray(np.concatenate([root, right])[None]))
  np.testing.assert_allclose(out[0, :7], path_l[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 7:], path_r[0, 4:], rtol=1e-5, atol=1e-5)


def test_visibility_mask_rule():
  kv_end = jnp.array([[3, 2, 3, 4]])
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(visibility_mask(kv_end)[0], expected)


def test_attention_reference_matches_dense_softmax_gqa():
  rng = np.random.default_rng(2)
  q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
  kv_end = np.array([[6] * 6, [3, 3, 3, 6, 6, 6]], np.int32)
  out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_end))
  mask = np.asarray(visibility_mask(jnp.asarray(kv_end)))
  for b in range(2):
    for h in range(4):
      s = q[b, :, h] @ k[b, :, h // 2].T / np.sqrt(8)
      s = np.where(mask[b], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(out[b, :, h], p @ v[b, :, h // 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    {"remat_policy": "full"}, {"remat_policy": "dots"}, {"scan_unroll": 2},
])
def test_remat_and_unroll_do_not_change_values_or_grads(overrides):
  base = _tiny()
  params = init_params(base, jax.random.key(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 500)

  def loss(config, p):
    return jnp.mean(_forward(config, p, tokens) ** 2)

  ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
  new_loss, new_grad = jax.jit(jax.value_and_grad(
      lambda p: loss(base.replace(**overrides), p)))(params)
  np.testing.assert_allclose(new_loss, ref_loss, rtol=1e-6)
  assert_trees_close(new_grad, ref_grad, rtol=1e-5)


def test_bfloat16_compute_tracks_float32():
  config = _tiny()
  params = init_params(config, jax.random.key(5))
  tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 500)
  ref = _forward(config, params, tokens)
  out = _forward(config.replace(dtype="bfloat16"), params, tokens)
  assert out.dtype == jnp.bfloat16
  rel = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
  assert rel < 2e-2


def test_untied_head_has_its_own_kernel():
  config = _tiny(tie_word_embeddings=False)
  params = init_params(config, jax.random.key(7))
  assert params["lm_head"]["kernel"].shape == (config.hidden_size, config.vocab_size)
  tied = init_params(_tiny(), jax.random.key(7))
  assert "lm_head" not in tied


def test_auto_attention_backend_choice(monkeypatch):
  from kat_jax.model import attention  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  assert attention.resolve_backend("auto", causal=True, dtype=jnp.bfloat16) == "cudnn"
  assert attention.resolve_backend("auto", causal=True, dtype=jnp.float32) == "tree"  # cuDNN: 16-bit only
  assert attention.resolve_backend("auto", causal=False, dtype=jnp.bfloat16) == "tree"
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "cpu")
  assert attention.resolve_backend("auto", causal=False) == "reference"
  assert attention.resolve_backend("tree", causal=True) == "tree"
