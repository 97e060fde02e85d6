"""`kat_jax.checkpoint.models`: every model source loads the same way, and bad ones say why."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import default
from kat_jax.checkpoint import models
from kat_jax.checkpoint.hf import save_pretrained
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.model import get_preset, init_params
from kat_jax.model.mtp import init_mtp_params


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _tiny_params(seed=0, **overrides):
  config = get_preset("tiny", num_layers=1, **overrides)
  return config, jax.jit(lambda r: init_params(config, r))(jax.random.key(seed))


def test_hf_directory_loads_with_its_config_and_weights_sharded_too(tmp_path):
  config, params = _tiny_params(tie_word_embeddings=False)
  save_pretrained(tmp_path / "one", config, params)
  save_pretrained(tmp_path / "sharded", config, params, max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  for name in ("one", "sharded"):
    spec = str(tmp_path / name)
    assert models.model_source_kind(spec) == "hf"
    loaded_config, loaded = models.load_model(spec)
    assert loaded_config.num_layers == 1 and not loaded_config.tie_word_embeddings
    assert_trees_equal(loaded, params)


def test_execution_fields_replace_the_sources_and_cast_the_params(tmp_path):
  config, params = _tiny_params()
  save_pretrained(tmp_path, config, params)
  execution = get_preset("tiny", dtype="bfloat16", param_dtype="bfloat16",
                         remat_policy="full")
  loaded_config, loaded = models.load_model(str(tmp_path), execution=execution)
  assert loaded_config.param_dtype == "bfloat16" and loaded_config.remat_policy == "full"
  assert loaded_config.num_layers == 1  # the architecture stays the source's
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {np.dtype(jax.numpy.bfloat16)}


def test_preset_name_and_model_config_give_the_seeded_random_init():
  assert models.model_source_kind("tiny") == "preset"
  assert models.load_model_config("tiny") == get_preset("tiny")
  small = get_preset("tiny", num_layers=1)
  small_config, small_params = models.load_model(small, seed=3)
  assert small_config == small
  assert_trees_equal(small_params, init_params(small, jax.random.key(3)))


def test_run_workdir_loads_the_latest_step_a_given_step_and_path_at_step(pretrain_run):
  assert models.model_source_kind(pretrain_run) == "run"
  assert models.run_steps(pretrain_run) == [2, 3]
  config, latest = models.load_model(pretrain_run)
  assert config.num_layers == 1 and config.vocab_size == 512
  _, at_two = models.load_model(pretrain_run, step=2)
  _, at_two_spec = models.load_model(f"{pretrain_run}@2")
  assert_trees_equal(at_two_spec, at_two)
  differ = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(latest),
                                                     jax.tree.leaves(at_two))]
  assert any(differ)  # one more optimizer step changed the weights
  assert models.source_tokenizer(pretrain_run) == "bytes"
  assert models.saved_run_config(pretrain_run)["train"]["steps"] == 3


def test_loading_a_run_workdir_logs_no_orbax_warnings(pretrain_run, caplog):
  # Orbax warns on read-only opens and item-only metadata reads; before every chat, eval or
  # export these alarmed users ("Metadata file does not exist") while nothing was wrong.
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    with caplog.at_level("INFO"):
      models.load_model(pretrain_run)
  finally:
    absl_logging.set_verbosity(previous)
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
  assert absl_logging.get_verbosity() == previous


def test_unreadable_latest_step_loads_the_step_before_and_says_so(pretrain_run, tmp_path,
                                                                  monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  from kat_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrain_run, workdir)
  state_dir = os.path.join(workdir, "checkpoints", "3", "state")
  files = [os.path.join(d, f) for d, _, names in os.walk(state_dir) for f in names]
  for path in files:  # a copy cut short: the step looks complete but cannot be read
    if os.path.getsize(path) > 100:  # every data file: which one holds the params varies
      with open(path, "r+b") as f:
        f.truncate(100)
  warnings = []
  monkeypatch.setattr(models.absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
  _, params = models.load_model(workdir, what="--model")
  assert_trees_equal(params, models.load_model(pretrain_run, step=2)[1])
  ours = [w for w in warnings if w.startswith("--model: ")]  # (absl's, shared with Orbax)
  assert len(ours) == 1 and ours[0].startswith(f"--model: loaded step 2 of {workdir} "
                                               "instead of step 3, which cannot be read ("), ours
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]  # unchanged
  with pytest.raises(CheckpointError, match=f"--model: no checkpoint of {workdir} can be read; "
                     "step 3: "):
    models.load_model(f"{workdir}@3", what="--model")


def test_run_workdir_round_trips_through_save_model_to_an_hf_directory(pretrain_run, tmp_path):
  config, params = models.load_model(pretrain_run)
  models.save_model(str(tmp_path / "hf"), config, params)
  assert models.model_source_kind(str(tmp_path / "hf")) == "hf"
  hf_config, hf_params = models.load_model(str(tmp_path / "hf"))
  assert hf_config.num_layers == config.num_layers
  assert_trees_equal(hf_params, params)


def test_run_that_saved_only_its_run_config_follows_its_model_fields(tmp_path):
  # e.g. step_srpo: the checkpoint meta has {"config": ...} but no "model_config".
  from kat_jax.checkpoint.manager import RunCheckpointer  # pylint: disable=g-import-not-at-top
  config, params = _tiny_params(seed=1)
  run_config = default.get_config()
  run_config.model.num_layers = 1
  checkpointer = RunCheckpointer(str(tmp_path / "checkpoints"), save_every=1, async_save=False)
  checkpointer.save(5, {"params": params}, None, {"config": run_config.to_dict()}, force=True)
  checkpointer.close()
  loaded_config, loaded = models.load_model(str(tmp_path))
  assert loaded_config == config
  assert_trees_equal(loaded, params)


def test_distill_student_run_keeps_its_mtp_heads_only_when_asked(tmp_path):
  # A distill student's checkpoint: params carry "mtp", meta the student's model_config.
  from kat_jax.checkpoint.manager import RunCheckpointer  # pylint: disable=g-import-not-at-top
  config, params = _tiny_params(seed=5)
  params = {**params, "mtp": init_mtp_params(config, 2, jax.random.key(6))}
  state = {"step": np.int32(4), "params": params, "opt_state": {"mu": params}}
  checkpointer = RunCheckpointer(str(tmp_path / "checkpoints"), save_every=1, async_save=False)
  checkpointer.save(4, state, None, {"model_config": config.to_dict()}, force=True)
  checkpointer.close()
  loaded_config, plain = models.load_model(str(tmp_path))
  assert loaded_config == config and "mtp" not in plain
  _, with_mtp = models.load_model(str(tmp_path), mtp=True)
  assert_trees_equal(with_mtp, params)


def test_saved_model_directory_keeps_mtp_heads_only_when_asked(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config, params = _tiny_params(seed=2)
  params = {**params, "mtp": init_mtp_params(config, 1, jax.random.key(4))}
  (tmp_path / "final").mkdir()
  (tmp_path / "final" / "model_config.json").write_text(json.dumps(config.to_dict()))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "final" / "params"), params)
  checkpointer.wait_until_finished()
  spec = str(tmp_path / "final")
  assert models.model_source_kind(spec) == "saved"
  _, plain = models.load_model(spec)
  assert "mtp" not in plain
  _, with_mtp = models.load_model(spec, mtp=True)
  assert_trees_equal(with_mtp, params)
  models.save_model(str(tmp_path / "hf"), config, with_mtp)
  assert (tmp_path / "hf" / "mtp.safetensors").exists()
  _, hf_mtp = models.load_model(str(tmp_path / "hf"), mtp=True)
  assert_trees_equal(hf_mtp["mtp"], params["mtp"])


def test_bad_sources_name_the_path_and_the_field(tmp_path, pretrain_run):
  with pytest.raises(ConfigError, match=f"config.model.init_from: no such path {tmp_path}/nope"):
    models.load_model(str(tmp_path / "nope"), what="config.model.init_from")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match="empty is neither a Hugging Face directory"):
    models.model_source_kind(str(tmp_path / "empty"))
  (tmp_path / "outer" / "student").mkdir(parents=True)
  os.symlink(os.path.join(pretrain_run, "checkpoints"),
             tmp_path / "outer" / "student" / "checkpoints")
  with pytest.raises(ConfigError, match="model sources inside it: student"):
    models.model_source_kind(str(tmp_path / "outer"))
  (tmp_path / "unfinished" / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(ConfigError, match="no complete checkpoint under .*unfinished"):
    models.load_model(str(tmp_path / "unfinished"))
  with pytest.raises(ConfigError, match=r"has no complete checkpoint at step 7; steps: \[2, 3\]"):
    models.load_model(f"{pretrain_run}@7")


def test_check_vocab_refuses_a_tokenizer_larger_than_the_model():
  models.check_vocab(get_preset("tiny"), get_tokenizer("bytes"))
  models.check_vocab(get_preset("qwen2.5-0.5b"), get_tokenizer("qwen2.5"))
  with pytest.raises(ConfigError, match="config.model: the model's vocab_size 512 is smaller "
                     "than the QwenTokenizer's 151673 ids"):
    models.check_vocab(get_preset("tiny"), get_tokenizer("qwen2.5"))
