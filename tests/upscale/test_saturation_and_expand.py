"""Saturation statistics and the layer-duplication map: exactness, maps, errors, 32B -> 40B."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.data import packing
from kat_jax.model import Decoder, get_preset, init_params, param_shapes
from kat_jax.model.decoder import DecoderBlock
from kat_jax.model.layers import rope_cos_sin
from experiments.configs import kat_v1_40b_upscale
from kat_jax.upscale import config as upscale_config, expand, saturation


def _config(num_layers=3, **overrides):
  return get_preset("tiny", num_layers=num_layers, **overrides)


def _packed_batch(rng, batch=2, length=24):
  """Packed rows with two documents and trailing padding (segment_id 0)."""
  rows = []
  for _ in range(batch):
    docs = [packing.Document(rng.integers(0, 500, n)) for n in (9, 10)]
    rows.append(packing.layout_row(docs, length, pad_id=0))
  return {k: jnp.asarray(v) for k, v in packing.stack_rows(rows).items()}


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, batch):
  return Decoder(config).apply({"params": params}, batch["tokens"], batch["positions"],
                               batch["kv_end"])


def _with_identity_layer(params, index):
  """Zero layer `index`'s o_kernel and down_proj: its output equals its input."""
  layers = jax.tree.map(lambda x: x, params["layers"])
  for group, name in (("attn", "o_kernel"), ("mlp", "down_proj")):
    layers[group][name] = layers[group][name].at[index].set(0.0)
  return {**params, "layers": layers}


def test_scanned_stack_matches_decoder_hidden_states():
  config = _config()
  params = init_params(config, jax.random.key(0))
  batch = _packed_batch(np.random.default_rng(0))
  expected = jax.jit(lambda p, b: Decoder(config).apply(
      {"params": p}, b["tokens"], b["positions"], b["kv_end"], return_hidden=True))(params, batch)
  hidden, stats = jax.jit(lambda p, b: saturation.run_layers_with_stats(
      config, p, b["tokens"], b["positions"], b["kv_end"], b["segment_ids"] > 0))(params, batch)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(expected), rtol=0, atol=1e-6)
  assert stats["cos_sum"].shape == (config.num_layers,)
  assert float(stats["count"]) == float(np.sum(np.asarray(batch["segment_ids"]) > 0)) == 38


def _reference_cosines(config, params, batch):
  """Per-layer per-token cosines [L, B, T] from an explicit Python loop over the layers."""
  h = Decoder(config).apply({"params": params}, batch["tokens"], method=lambda m, t: m.embed(t))
  cos, sin = rope_cos_sin(batch["positions"], config.head_dim, config.rope_theta, jnp.float32)
  out = []
  block = jax.jit(DecoderBlock(config).apply)
  for i in range(config.num_layers):
    layer = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    h_next, _ = block({"params": layer}, h, cos, sin, batch["kv_end"])
    a, b = np.asarray(h, np.float64), np.asarray(h_next, np.float64)
    out.append(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    h = h_next
  return np.stack(out)


def test_streamed_report_matches_reference_over_real_tokens_only():
  config = _config()
  params = init_params(config, jax.random.key(1))
  rng = np.random.default_rng(1)
  batches = [_packed_batch(rng), _packed_batch(rng)]
  report = saturation.analyze_saturation(config, params, iter(batches))
  cosines = np.concatenate([_reference_cosines(config, params, b)[:, np.asarray(
      b["segment_ids"]) > 0] for b in batches], axis=1)  # [L, real tokens]
  np.testing.assert_allclose(report.mean_cosine, cosines.mean(1), atol=1e-5)
  np.testing.assert_allclose(report.std_cosine, cosines.std(1), atol=1e-4)
  np.testing.assert_allclose(report.min_cosine, cosines.min(1), atol=1e-5)
  assert report.num_tokens == cosines.shape[1] == 76 and report.num_batches == 2
  # max_batches stops the stream.
  assert saturation.analyze_saturation(config, params, batches, max_batches=1).num_batches == 1


def test_identity_layer_has_cosine_one(tmp_path):
  config = _config()
  params = _with_identity_layer(init_params(config, jax.random.key(2)), 2)
  report = saturation.analyze_saturation(config, params, [_packed_batch(np.random.default_rng(2))])
  assert abs(report.mean_cosine[2] - 1.0) < 1e-6
  assert report.std_cosine[2] < 1e-3
  assert all(c < 0.999 for i, c in enumerate(report.mean_cosine) if i != 2)
  saturation.plot_saturation(report, tmp_path / "sat.png", selected=[2])
  saturation.save_report_json(report, tmp_path / "sat.json")
  assert (tmp_path / "sat.png").stat().st_size > 1000
  assert (tmp_path / "sat.json").read_text().count("block_influence") == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("placement, duplicated", [("interleave", [0, 2]), ("block", [1, 2])])
def test_identity_init_preserves_logits(placement, duplicated, dtype):
  config = _config(tie_word_embeddings=False, dtype=dtype)
  params = init_params(config, jax.random.key(3))
  batch = _packed_batch(np.random.default_rng(3))
  layer_map = expand.make_layer_map(config.num_layers, duplicated, placement)
  new_config, new_params = expand.upscale(config, params, layer_map, "identity")
  assert new_config.num_layers == 5
  # Exactly: a zeroed o_proj / down_proj adds +0.0 to the residual stream.
  np.testing.assert_array_equal(np.asarray(_logits(new_config, new_params, batch)),
                                np.asarray(_logits(config, params, batch)))
  # The copies of the zeroed tensors are zero; everything else is copied.
  inserted = np.asarray(layer_map.inserted)
  o = np.asarray(new_params["layers"]["attn"]["o_kernel"])
  assert not o[inserted].any() and o[~inserted].any()
  q = np.asarray(new_params["layers"]["attn"]["q_kernel"])
  np.testing.assert_array_equal(q, np.asarray(params["layers"]["attn"]["q_kernel"])[
      list(layer_map.source)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_init_of_an_identity_layer_preserves_logits(dtype):
  config = _config(dtype=dtype)
  params = _with_identity_layer(init_params(config, jax.random.key(4)), 1)
  batch = _packed_batch(np.random.default_rng(4))
  for placement in ("interleave", "block"):
    layer_map = expand.make_layer_map(config.num_layers, [1], placement)
    new_config, new_params = expand.upscale(config, params, layer_map, "copy")
    np.testing.assert_array_equal(np.asarray(_logits(new_config, new_params, batch)),
                                  np.asarray(_logits(config, params, batch)))
  # Copying a layer that does change the stream does change the logits.
  layer_map = expand.make_layer_map(config.num_layers, [2], "interleave")
  new_config, new_params = expand.upscale(config, params, layer_map, "copy")
  assert np.abs(np.asarray(_logits(new_config, new_params, batch) - _logits(
      config, params, batch))).max() > 1e-4


def test_layer_maps():
  interleave = expand.make_layer_map(5, [3, 1], "interleave")
  assert interleave.source == (0, 1, 1, 2, 3, 3, 4)
  assert interleave.inserted == (False, False, True, False, False, True, False)
  assert interleave.duplicated == [1, 3] and interleave.new_num_layers == 7
  block = expand.make_layer_map(5, [1, 2, 3], "block")
  assert block.source == (0, 1, 2, 3, 1, 2, 3, 4)
  assert block.inserted == (False,) * 4 + (True,) * 3 + (False,)
  as_dict = block.to_dict()
  assert as_dict["layers"][4] == {"new_index": 4, "source_index": 1, "inserted": True}
  # Yi-9B: layers 12..27 of 32 repeated once -> 48 layers.
  yi = expand.make_layer_map(32, range(12, 28), "block")
  assert yi.source == tuple(range(28)) + tuple(range(12, 32))
  # LLaMA-Pro: 32 -> 40, a copy after every 4th layer.
  llama_pro = expand.make_layer_map(32, expand.select_uniform(32, 8), "interleave")
  assert llama_pro.duplicated == [3, 7, 11, 15, 19, 23, 27, 31]
  assert llama_pro.source[:6] == (0, 1, 2, 3, 3, 4) and llama_pro.new_num_layers == 40


def test_layer_selection():
  cos = [0.5, 0.9, 0.7, 0.95, 0.8, 0.99]
  assert expand.select_top_k(cos, 2) == [3, 5]
  assert expand.select_top_k(cos, 2, exclude_last=1) == [1, 3]
  assert expand.select_top_k(cos, 3, exclude_first=1, exclude_last=1) == [1, 3, 4]
  assert expand.select_window(cos, 2, exclude_last=1) == [3, 4]
  assert expand.select_window(cos, 3) == [3, 4, 5]
  assert expand.select_layers("explicit", 6, 0, layers=[4, 0]) == [0, 4]
  assert expand.select_layers("top_k", 6, 1, mean_cosine=cos, exclude_last=1) == [3]
  # Ties go to the lower index.
  assert expand.select_top_k([1.0, 1.0, 1.0], 2) == [0, 1]


def test_bad_inputs_raise_clear_errors():
  cos = [0.5, 0.9, 0.7, 0.95]
  with pytest.raises(ValueError, match="cannot duplicate k=5 layers: only 4"):
    expand.select_top_k(cos, 5)
  with pytest.raises(ValueError, match="cannot duplicate k=3 layers: only 2"):
    expand.select_top_k(cos, 3, exclude_first=1, exclude_last=1)
  with pytest.raises(ValueError, match="must be >= 1"):
    expand.select_window(cos, 0)
  with pytest.raises(ValueError, match="unknown placement 'stack'"):
    expand.make_layer_map(4, [1], "stack")
  with pytest.raises(ValueError, match=r"layer index \[4\] out of range \[0, 4\)"):
    expand.make_layer_map(4, [1, 4], "interleave")
  with pytest.raises(ValueError, match="out of range"):
    expand.select_layers("explicit", 4, 0, layers=[-1])
  with pytest.raises(ValueError, match="repeats"):
    expand.make_layer_map(4, [1, 1], "interleave")
  with pytest.raises(ValueError, match="one contiguous range"):
    expand.make_layer_map(4, [0, 2], "block")
  with pytest.raises(ValueError, match="unknown layer selection 'best'"):
    expand.select_layers("best", 4, 1, mean_cosine=cos)
  with pytest.raises(ValueError, match="needs the saturation analysis"):
    expand.select_layers("top_k", 4, 1)
  with pytest.raises(ValueError, match="divide"):
    expand.select_uniform(10, 3)
  with pytest.raises(ValueError, match="source layer"):
    expand.LayerMap((0, 4), (False, True), 4)
  config = _config(4)
  params = init_params(config, jax.random.key(5))
  layer_map = expand.make_layer_map(4, [1], "interleave")
  with pytest.raises(ValueError, match="unknown init 'zeros'"):
    expand.upscale_params(params, layer_map, "zeros")
  with pytest.raises(ValueError, match="layer map is for 4 layers, config has 2"):
    expand.upscale_config(_config(2), layer_map)
  with pytest.raises(ValueError, match="leading size 2"):
    expand.upscale_params(init_params(_config(2), jax.random.key(5)), layer_map)
  with pytest.raises(ValueError, match="no calibration tokens"):
    saturation.analyze_saturation(config, params, [])


def test_qwen25_32b_to_kat_v1_40b_on_shapes_only():
  """The recipe config's own choices (preset, 16 layers, top-k, interleave) on 32B shapes."""
  recipe = kat_v1_40b_upscale.get_config()
  config = get_preset(recipe.model.preset, param_dtype=recipe.model.param_dtype)
  assert config.num_layers == 64
  shapes = param_shapes(config)  # nothing allocated
  cos = list(np.linspace(0.5, 0.99, config.num_layers))  # stand-in saturation profile
  layer_map = upscale_config.choose_layer_map(recipe.upscale, config.num_layers, cos)
  assert [i for i, new in zip(layer_map.source, layer_map.inserted) if new] == list(range(47, 63))
  assert all(layer_map.source[i - 1] == layer_map.source[i]  # each copy right after its source
             for i, new in enumerate(layer_map.inserted) if new)
  new_config = expand.upscale_config(config, layer_map)
  assert new_config.num_layers == recipe.upscale.expected_num_layers
  new_shapes = jax.eval_shape(lambda p: expand.upscale_params(p, layer_map, "identity"), shapes)
  assert new_config.num_layers == 80
  assert expand.count_params(new_shapes) == 40_565_560_320 == new_config.num_params()
  kat = get_preset("kat-v1-40b", param_dtype="bfloat16")
  assert jax.tree.map(lambda s: (s.shape, s.dtype), new_shapes) == jax.tree.map(
      lambda s: (s.shape, s.dtype), nn.meta.unbox(param_shapes(kat)))
