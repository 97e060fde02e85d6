"""HF Qwen2 import/export against transformers itself: logit parity, round trips, errors, bf16."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch
import transformers

from kat_jax.checkpoint import config_from_hf, config_to_hf, load_pretrained, save_pretrained
from kat_jax.model import Decoder, get_preset

VOCAB = 128


def _hf_model(*, tie: bool, layers: int = 2, seed: int = 0) -> transformers.Qwen2ForCausalLM:
  """A tiny random Qwen2 in eval mode with non-trivial norms and biases (HF inits them 1 / 0)."""
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
      max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
      attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)
  return model


def _hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
  kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), **kwargs).logits.float().numpy()


def _our_logits(config, params, tokens, positions=None, kv_end=None) -> np.ndarray:
  return np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(tokens),
                                          positions=positions, kv_end=kv_end))


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def _assert_trees_identical(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# kind -> (tie_word_embeddings, HF max_shard_size)
_KINDS = {"tied": (True, "5GB"), "untied": (False, "5GB"), "sharded": (False, "100KB")}


@pytest.fixture(scope="module", params=sorted(_KINDS))
def hf_checkpoint(request, tmp_path_factory):
  tie, shard_size = _KINDS[request.param]
  model = _hf_model(tie=tie, layers=3 if request.param == "sharded" else 2)
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size)
  assert os.path.exists(path / "model.safetensors.index.json") == (request.param == "sharded")
  return request.param, model, path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
  model = _hf_model(tie=False, seed=1)
  path = tmp_path_factory.mktemp("hf_untied_errors")
  model.save_pretrained(path, safe_serialization=True)
  return path


# --- (1) logit parity ---------------------------------------------------------------------------


def test_logits_match_transformers(hf_checkpoint):
  kind, model, path = hf_checkpoint
  config, params = load_pretrained(path)
  assert config.tie_word_embeddings == (kind == "tied")
  assert ("lm_head" in params) == (kind != "tied")
  assert params["layers"]["attn"]["q_kernel"].shape == (config.num_layers, 64, 4, 16)
  tokens = _tokens(2, 12)
  assert _rel_err(_our_logits(config, params, tokens), _hf_logits(model, tokens)) < 1e-5


def test_logits_match_with_explicit_positions(hf_checkpoint):
  """Offset positions with repeats and gaps (RoPE is relative, so a plain shift changes nothing)."""
  _, model, path = hf_checkpoint
  config, params = load_pretrained(path)
  tokens = _tokens(2, 10, seed=1)
  steps = np.random.RandomState(2).randint(0, 3, (2, 10))
  positions = (np.cumsum(steps, axis=1) + np.array([[3], [41]])).astype(np.int32)
  ours = _our_logits(config, params, tokens, positions=jnp.asarray(positions))
  theirs = _hf_logits(model, tokens, positions)
  assert _rel_err(ours, theirs) < 1e-5
  # The positions matter: default positions give different logits.
  assert _rel_err(_hf_logits(model, tokens), theirs) > 1e-3


def test_packed_row_matches_separate_sequences(hf_checkpoint):
  """One packed row (positions restart at 0, kv_end = document end) == each document alone."""
  _, model, path = hf_checkpoint
  config, params = load_pretrained(path)
  lengths = (5, 7)
  docs = [_tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
  tokens = np.concatenate(docs, axis=1)
  positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
  kv_end = np.concatenate([np.full(n, end) for n, end in zip(lengths, np.cumsum(lengths))])
  ours = _our_logits(config, params, tokens, positions=jnp.asarray(positions),
                     kv_end=jnp.asarray(kv_end[None].astype(np.int32)))
  theirs = np.concatenate([_hf_logits(model, doc) for doc in docs], axis=1)
  assert _rel_err(ours, theirs) < 1e-5


# --- (2) round trips ----------------------------------------------------------------------------


def test_round_trip_is_bit_identical_and_transformers_loads_it(hf_checkpoint, tmp_path):
  kind, model, path = hf_checkpoint
  config, params = load_pretrained(path)
  save_pretrained(tmp_path, config, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json",
                                          "model.safetensors"]
  # A tied save carries no lm_head copy.
  assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (kind != "tied")
  config2, params2 = load_pretrained(tmp_path)
  assert config2 == config
  _assert_trees_identical(params, params2)

  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  tokens = _tokens(2, 12, seed=3)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_sharded_save_is_loadable_by_transformers(hf_checkpoint, tmp_path):
  _, model, path = hf_checkpoint
  config, params = load_pretrained(path)
  save_pretrained(tmp_path, config, params, max_shard_size="60KB")
  with open(tmp_path / "model.safetensors.index.json") as fp:
    index = json.load(fp)
  shard_files = sorted(set(index["weight_map"].values()))
  n = len(shard_files)
  assert n > 2
  assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert not os.path.exists(tmp_path / "model.safetensors")
  tensors = {}
  for file in shard_files:
    tensors.update(load_file(tmp_path / file))
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  assert set(index["weight_map"]) == set(tensors)
  assert config.num_params() == sum(t.size for t in tensors.values())

  _, params2 = load_pretrained(tmp_path)
  _assert_trees_identical(params, params2)
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  tokens = _tokens(1, 9, seed=4)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))

  # Saving again unsharded removes the stale shards and index.
  save_pretrained(tmp_path, config, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json",
                                          "model.safetensors"]


def test_tied_checkpoint_with_lm_head_copy_is_accepted(tmp_path):
  model = _hf_model(tie=True, seed=2)
  model.save_pretrained(tmp_path, safe_serialization=True)
  tensors = load_file(tmp_path / "model.safetensors")
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  config, params = load_pretrained(tmp_path)
  assert "lm_head" not in params
  tokens = _tokens(1, 8)
  assert _rel_err(_our_logits(config, params, tokens), _hf_logits(model, tokens)) < 1e-5

  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match="lm_head.weight"):
    load_pretrained(tmp_path)


# --- (3) config and errors ----------------------------------------------------------------------


def test_config_round_trip_through_transformers():
  config = get_preset("qwen2.5-0.5b")
  hf = config_to_hf(config)
  assert hf["architectures"] == ["Qwen2ForCausalLM"] and hf["model_type"] == "qwen2"
  assert hf["bos_token_id"] == hf["eos_token_id"] == 151643
  hf_config = transformers.Qwen2Config(**hf)
  assert hf_config.head_dim == 64 and hf_config.rope_parameters["rope_theta"] == 1e6
  assert config_from_hf(hf_config.to_dict()) == config
  # transformers 4.x layout: top-level rope_theta, torch_dtype, no head_dim.
  legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", "head_dim", "dtype")}
  assert config_from_hf({**legacy, "torch_dtype": "bfloat16"}) == config.replace(
      param_dtype="bfloat16")
  # A tiny vocabulary has no room for the Qwen2.5 special ids.
  assert "eos_token_id" not in config_to_hf(config.replace(vocab_size=VOCAB))


@pytest.mark.parametrize("change, error, match", [
    ({"model_type": "llama"}, ValueError, "llama"),
    ({"use_sliding_window": True}, NotImplementedError, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, NotImplementedError, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, NotImplementedError, "yarn"),
    ({"hidden_size": None}, ValueError, "hidden_size"),
])
def test_config_from_hf_rejects(change, error, match):
  hf = config_to_hf(get_preset("tiny"))
  hf.update(change)
  hf = {k: v for k, v in hf.items() if v is not None}
  with pytest.raises(error, match=match):
    config_from_hf(hf)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_missing_config_json_names_file_and_directory(untied_dir, tmp_path):
  path = _copy(untied_dir, tmp_path / "ckpt")
  os.remove(path / "config.json")
  with pytest.raises(FileNotFoundError, match=f"config.json in {path}"):
    load_pretrained(path)


def test_wrong_model_type_is_named(untied_dir, tmp_path):
  path = _copy(untied_dir, tmp_path / "ckpt")
  hf = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**hf, "model_type": "mistral"}))
  with pytest.raises(ValueError, match="'mistral'"):
    load_pretrained(path)


def test_missing_weights_file_is_named(untied_dir, tmp_path):
  path = _copy(untied_dir, tmp_path / "ckpt")
  os.remove(path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_pretrained(path)


def test_missing_shard_file_is_named(tmp_path):
  model = _hf_model(tie=False)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
  shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
  os.remove(tmp_path / shard)
  with pytest.raises(FileNotFoundError, match=f"{shard}.*{tmp_path}"):
    load_pretrained(tmp_path)


@pytest.mark.parametrize("drop, match", [
    ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
    ("lm_head.weight", "lm_head.weight.*tie_word_embeddings"),
])
def test_missing_tensor_is_named(untied_dir, tmp_path, drop, match):
  path = _copy(untied_dir, tmp_path / "ckpt")
  tensors = load_file(path / "model.safetensors")
  del tensors[drop]
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(KeyError, match=match):
    load_pretrained(path)


def test_unexpected_and_misshaped_tensors_are_named(untied_dir, tmp_path):
  path = _copy(untied_dir, tmp_path / "ckpt")
  tensors = load_file(path / "model.safetensors")
  save_file({**tensors, "model.layers.2.mlp.up_proj.weight": np.zeros((2,), np.float32)},
            path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match="unexpected.*model.layers.2.mlp.up_proj.weight"):
    load_pretrained(path)
  tensors["model.norm.weight"] = np.ones((3,), np.float32)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model.norm.weight.*\(3,\)"):
    load_pretrained(path)


def test_overrides_apply_and_shape_changes_are_refused(untied_dir):
  config, _ = load_pretrained(untied_dir, config_overrides={"remat_policy": "full"})
  assert config.remat_policy == "full"
  with pytest.raises(ValueError, match="num_layers"):
    load_pretrained(untied_dir, config_overrides={"num_layers": 4})


def test_save_rejects_params_of_another_shape(untied_dir, tmp_path):
  config, params = load_pretrained(untied_dir)
  with pytest.raises(ValueError, match=r"layers/mlp/gate_proj.*\(2, 64, 96\)"):
    save_pretrained(tmp_path, config.replace(intermediate_size=32), params)


# --- (4) bfloat16 -------------------------------------------------------------------------------


def test_bf16_checkpoint_loads_exactly(tmp_path):
  model = _hf_model(tie=False, seed=5).to(torch.bfloat16)
  model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_pretrained(tmp_path)
  assert config.param_dtype == "bfloat16"
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
  torch_f32 = {k: v.float().numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32),
                                torch_f32["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"], np.float32),
                                torch_f32["lm_head.weight"].T)
  q = np.asarray(params["layers"]["attn"]["q_kernel"][1], np.float32)
  np.testing.assert_array_equal(q.reshape(64, 64).T,
                                torch_f32["model.layers.1.self_attn.q_proj.weight"])
  down = np.asarray(params["layers"]["mlp"]["down_proj"][0], np.float32)
  np.testing.assert_array_equal(down.T, torch_f32["model.layers.0.mlp.down_proj.weight"])

  # Cast on load to float32, and bf16 written back bit-exactly.
  config32, params32 = load_pretrained(tmp_path, dtype="float32")
  assert config32.param_dtype == "float32"
  np.testing.assert_array_equal(
      np.asarray(params32["embed"]["embedding"]), torch_f32["model.embed_tokens.weight"])
  save_pretrained(tmp_path / "out", config32, params32, dtype=jnp.bfloat16)
  written = load_file(tmp_path / "out" / "model.safetensors")
  original = load_file(tmp_path / "model.safetensors")
  assert set(written) == set(original)
  for name, value in original.items():
    assert written[name].dtype == value.dtype
    np.testing.assert_array_equal(written[name], value)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
