"""MTP heads: validity masks on packed/tree rows, loss vs a naive per-depth reference,
Orbax round trip with the train state, self-speculative decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open

from kat_jax.checkpoint.hf import MTP_FILE, load_pretrained, save_pretrained
from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.distill.objective import Objective, make_loss_fn
from kat_jax.distill.speculative import greedy_decode, self_speculative_decode
from kat_jax.model import Decoder, get_preset, init_params, lm_head_kernel
from kat_jax.model.mtp import (MTPHeads, MTPLayer, chain_valid, init_mtp_params, mtp_kv_end,
                               mtp_targets)
from kat_jax.model.layers import rope_cos_sin
from kat_jax.testing import assert_trees_close, relative_error
from kat_jax.train.state import create_train_state

CFG = get_preset("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
                 num_kv_heads=1, vocab_size=40)

# Two packed documents [0,3) and [3,7), padding at 7.
PACKED_KV_END = np.array([[3, 3, 3, 7, 7, 7, 7, 8]])
# Prefix tree, depth first: root tokens 0,1 (subtree end 6); branch A 2,3; branch B 4,5.
TREE_KV_END = np.array([[6, 6, 4, 4, 6, 6]])


def test_chain_validity_packed_rows_by_hand():
  kv = jnp.asarray(PACKED_KV_END)
  np.testing.assert_array_equal(chain_valid(kv, 1)[0], [1, 1, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(chain_valid(kv, 2)[0], [1, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(chain_valid(kv, 3)[0], [0, 0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(chain_valid(kv, 0)[0], [1] * 8)


def test_chain_validity_and_block_mask_on_a_tree_by_hand():
  kv = jnp.asarray(TREE_KV_END)
  # 1 -> 2 enters branch A (first child); 3 -> 4 would jump to branch B: invalid.
  np.testing.assert_array_equal(chain_valid(kv, 1)[0], [1, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(chain_valid(kv, 2)[0], [1, 1, 0, 0, 0, 0])
  # Depth 1: key 1 carries t_2 (branch A), so branch-B queries (4, 5) must not see it;
  # key 0 carries t_1 (root), seen by every query that has a depth-1 target.
  np.testing.assert_array_equal(mtp_kv_end(kv, 1)[0], [5, 3, 3, 4, 5, 6])
  targets, w = mtp_targets(jnp.arange(6)[None], jnp.ones((1, 6)), kv, 1)
  np.testing.assert_array_equal(targets[0], [2, 3, 4, 5, 0, 0])
  np.testing.assert_array_equal(w[0], [1, 1, 0, 0, 0, 0])  # 2 -> 4 crosses branches


@functools.partial(jax.jit, static_argnums=5)
def _mtp_outputs(params, mtp_params, tokens, positions, kv_end, depth):
  hidden = Decoder(CFG).apply({"params": params}, tokens, positions, kv_end, return_hidden=True)
  return MTPHeads(CFG, depth).apply({"params": mtp_params}, hidden, tokens,
                                    params["embed"]["embedding"], positions, kv_end)


@pytest.mark.parametrize("kv_end,positions,changed,depth,kept", [
    # doc 2 changes: doc 1's position 0 at depth 2 (input t_2, target t_3 absent) is unchanged
    (PACKED_KV_END, [0, 1, 2, 0, 1, 2, 3, 0], [4, 5, 6], 2, [0]),
    (PACKED_KV_END, [0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2], 2, [3, 4]),
    # branch A changes: root position 0 and branch-B position 4 at depth 1 are unchanged
    (TREE_KV_END, [0, 1, 2, 3, 2, 3], [2, 3], 1, [0, 4]),
])
def test_mtp_outputs_never_see_other_documents_or_branches(kv_end, positions, changed, depth,
                                                           kept):
  params = init_params(CFG, jax.random.key(0))
  mtp_params = init_mtp_params(CFG, 2, jax.random.key(1))
  t = kv_end.shape[1]
  tokens = jnp.asarray(np.arange(1, t + 1)[None], jnp.int32)
  other = tokens.at[0, jnp.asarray(changed)].set(33)
  kv = jnp.asarray(kv_end, jnp.int32)
  pos = jnp.asarray([positions], jnp.int32)
  a = _mtp_outputs(params, mtp_params, tokens, pos, kv, 2)
  b = _mtp_outputs(params, mtp_params, other, pos, kv, 2)
  assert all(bool(chain_valid(kv, depth)[0, i]) for i in kept)
  for i in kept:
    np.testing.assert_allclose(a[depth - 1][0, i], b[depth - 1][0, i], rtol=1e-6, atol=1e-6)
  # The change is visible somewhere, so the test can fail.
  assert float(jnp.abs(a[depth - 1] - b[depth - 1]).max()) > 1e-3


def _naive_mtp_loss(params, tokens, weights, docs, depth, lam):
  """Each document alone (causal), Python loops per depth and position, full logits."""
  dec = {k: v for k, v in params.items() if k != "mtp"}
  emb = dec["embed"]["embedding"]
  head = lm_head_kernel(dec, CFG)
  total = 0.0
  for start, end in docs:
    tok = tokens[0, start:end][None]
    w = weights[0, start:end]
    length = end - start
    h = Decoder(CFG).apply({"params": dec}, tok, return_hidden=True)
    logp = jax.nn.log_softmax(h[0] @ head, -1)
    total += sum(-w[i + 1] * logp[i, tok[0, i + 1]] for i in range(length - 1))
    cos, sin = rope_cos_sin(jnp.arange(length)[None], CFG.head_dim, CFG.rope_theta,
                            jnp.float32)
    hk = h
    for k in range(1, depth + 1):
      n = length - k  # positions with an input token t_{i+k}
      emb_k = emb[tok[0, k:]][None]
      hk, normed = MTPLayer(CFG).apply({"params": params["mtp"][f"depth_{k}"]}, hk[:, :n],
                                       emb_k, cos[:, :n], sin[:, :n], None)
      lp = jax.nn.log_softmax(normed[0] @ head, -1)
      total += lam / depth * sum(-w[i + k + 1] * lp[i, tok[0, i + k + 1]]
                                 for i in range(length - k - 1))
  return total


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_equals_naive_per_depth_reference(depth):
  params = dict(init_params(CFG, jax.random.key(2)))
  params["mtp"] = init_mtp_params(CFG, depth, jax.random.key(3))
  tokens = jnp.asarray([[5, 9, 2, 7, 1, 3, 8, 4, 0]], jnp.int32)
  docs = [(0, 3), (3, 8)]
  weights = np.zeros((1, 9), np.float32)
  weights[0, 1:3] = [1.0, 0.5]
  weights[0, 4:8] = [1.0, 0.0, 2.0, 1.0]
  pred = np.array([[0, 0, 1, 3, 3, 4, 5, 6, 8]])
  batch = {"tokens": tokens, "positions": jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4, 0]]),
           "kv_end": jnp.asarray([[3, 3, 3, 8, 8, 8, 8, 8, 9]]),
           "pred_index": jnp.asarray(pred), "weights": jnp.asarray(weights)}
  objective = Objective(mtp_depth=depth, mtp_lambda=(0.7,), loss_chunk=4)
  loss, aux = jax.jit(make_loss_fn(CFG, None, objective))(params, None, batch,
                                                          jnp.float32(0.7))
  expected = jax.jit(lambda p: _naive_mtp_loss(p, tokens, jnp.asarray(weights), docs, depth,
                                               0.7))(params)
  assert relative_error(loss, expected) < 1e-5
  # depth 1 targets t_{i+2}: doc 1 index 2 (0.5); doc 2 indices 5, 6, 7 (0, 2, 1).
  assert float(aux["mtp1_weight_sum"]) == 0.5 + 0.0 + 2.0 + 1.0
  if depth == 2:
    assert float(aux["mtp2_weight_sum"]) == 2.0 + 1.0  # doc 2 indices 6, 7


def test_mtp_params_round_trip_through_orbax_with_the_train_state(tmp_path):
  params = dict(init_params(CFG, jax.random.key(4)))
  params["mtp"] = init_mtp_params(CFG, 2, jax.random.key(5))
  optimizer = optax.adamw(1e-3)
  state = create_train_state(params, optimizer)
  ckpt = RunCheckpointer(str(tmp_path / "ckpt"), save_every=1, async_save=False)
  ckpt.save(1, state, None, {"note": "mtp"}, force=True)
  ckpt.wait()
  blank = jax.tree.map(jnp.zeros_like, state)
  restored, meta = ckpt.restore(blank, None)
  ckpt.close()
  assert meta == {"note": "mtp"}
  assert set(restored.params["mtp"]) == {"depth_1", "depth_2"}
  assert_trees_close(restored.params, state.params, rtol=1e-7)
  assert_trees_close(restored.opt_state, state.opt_state, rtol=1e-7)


def test_mtp_params_round_trip_through_a_hugging_face_directory(tmp_path):
  params = dict(init_params(CFG, jax.random.key(8)))
  params["mtp"] = init_mtp_params(CFG, 2, jax.random.key(9))
  save_pretrained(tmp_path, CFG, params, dtype="float32")
  with safe_open(str(tmp_path / MTP_FILE), framework="numpy") as f:
    names = set(f.keys())
  assert "mtp.1.eh_proj" in names and "mtp.2.final_norm.scale" in names
  assert all(n.startswith(("mtp.1.", "mtp.2.")) for n in names)
  cfg, loaded = load_pretrained(tmp_path, load_mtp=True)
  assert_trees_close(loaded, params, rtol=1e-7)  # float32 on disk: bit-exact
  _, without = load_pretrained(tmp_path)  # heads are opt-in
  assert "mtp" not in without
  # Saving without heads removes the stale file: loading gives no heads back.
  save_pretrained(tmp_path, cfg, without, dtype="float32")
  assert "mtp" not in load_pretrained(tmp_path, load_mtp=True)[1]
  # Heads of another config's shape are refused with the file named.
  other = get_preset("tiny", num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2,
                     num_kv_heads=1, vocab_size=40)
  save_pretrained(tmp_path, CFG, {**without, "mtp": init_mtp_params(other, 1,
                                                                     jax.random.key(0))})
  with pytest.raises(ValueError, match=MTP_FILE):
    load_pretrained(tmp_path, load_mtp=True)


def test_self_speculative_decoding_equals_greedy_and_reports_accept_rate():
  cfg = CFG.replace(vocab_size=16)
  params = dict(init_params(cfg, jax.random.key(6)))
  # A sharp random model so greedy paths vary; MTP = depth 2.
  params["embed"] = {"embedding": params["embed"]["embedding"] * 40}
  params["mtp"] = init_mtp_params(cfg, 2, jax.random.key(7))
  prompt = [3, 1, 4, 1, 5]
  expected = greedy_decode(params, cfg, prompt, 10)
  got, stats = self_speculative_decode(params, cfg, prompt, 10)
  assert got == expected
  assert len(got) == 10
  assert 0.0 <= stats.accept_rate <= 1.0 and stats.drafted > 0
  assert stats.main_forwards <= 10
  # Stop ids end both the same way.
  stop = [expected[3]]
  assert (self_speculative_decode(params, cfg, prompt, 10, stop_ids=stop)[0]
          == greedy_decode(params, cfg, prompt, 10, stop_ids=stop))
  with pytest.raises(ValueError, match="MTP"):
    self_speculative_decode({k: v for k, v in params.items() if k != "mtp"}, cfg, prompt, 4)
