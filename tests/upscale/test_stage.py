"""The `upscale` stage end to end at tiny size: outputs, reloading, the 40B recipe at 8 -> 10."""

import json

import jax
import numpy as np
import pytest

from experiments.configs import kat_v1_40b_upscale, pretrain, upscale_tiny
from kat_jax.checkpoint import models
from kat_jax.checkpoint.hf import load_pretrained, save_pretrained
from kat_jax.model import get_preset, init_params
from kat_jax.testing import assert_trees_close
from kat_jax.errors import ConfigError
from kat_jax.train.loop import run_pretrain
from kat_jax.upscale import config as upscale_config, stage


def _small(config, workdir):
  """Shrinks the calibration data so a stage runs in seconds."""
  config.workdir = str(workdir)
  config.data.synthetic_docs = 60
  config.data.synthetic_eval_docs = 2
  config.data.seq_len = 64
  config.data.batch_size = 2
  config.upscale.calibration_batches = 2
  config.upscale.check_batches = 1
  return config


def test_tiny_stage_writes_loadable_outputs_and_identity_keeps_the_loss(tmp_path):
  config = _small(upscale_tiny.get_config(), tmp_path)
  config.upscale.init = "identity"
  summary = stage.run_upscale(config)
  assert summary["source_num_layers"] == 8 and summary["new_num_layers"] == 10
  assert len(summary["duplicated_layers"]) == 2
  assert all(1 <= i <= 6 for i in summary["duplicated_layers"])  # first/last excluded
  assert abs(summary["loss_after"] - summary["loss_before"]) < 1e-6

  sat = json.loads((tmp_path / "saturation.json").read_text())
  assert len(sat["mean_cosine"]) == 8 and sat["num_tokens"] > 0
  top = sorted(range(1, 7), key=lambda i: -sat["mean_cosine"][i])[:2]
  assert sorted(top) == summary["duplicated_layers"]
  assert (tmp_path / "saturation.png").exists()
  layer_map = json.loads((tmp_path / "layer_map.json").read_text())
  assert layer_map["new_num_layers"] == 10 and layer_map["init"] == "identity"
  assert sum(row["inserted"] for row in layer_map["layers"]) == 2

  hf_config, hf_params = load_pretrained(tmp_path / "upscaled" / "hf")
  assert hf_config.num_layers == 10
  orbax_params = stage.restore_orbax_params(str(tmp_path / "upscaled" / "orbax_params"),
                                            hf_params)
  assert_trees_close(orbax_params, hf_params, rtol=1e-7)
  # The output directory (model_config.json + orbax_params/) is a model source of its own.
  saved_config, saved_params = models.load_model(str(tmp_path / "upscaled"))
  assert saved_config.num_layers == 10
  assert_trees_close(saved_params, hf_params, rtol=1e-7)
  sources = [row["source_index"] for row in layer_map["layers"]]
  _, source_params = models.load_configured_model(config.model, seed=config.seed)
  np.testing.assert_array_equal(
      np.asarray(hf_params["layers"]["attn"]["q_kernel"]),
      np.asarray(source_params["layers"]["attn"]["q_kernel"])[sources])

  # The up-scaled HF directory is what continued pre-training starts from.
  cpt = pretrain.get_config()
  cpt.workdir = str(tmp_path / "cpt")
  cpt.model.init_from = str(tmp_path / "upscaled" / "hf")
  cpt.model.dtype, cpt.model.remat_policy = "float32", "none"
  cpt.data.tokenizer, cpt.data.source = config.data.tokenizer, "synthetic"
  cpt.data.synthetic_docs, cpt.data.seq_len, cpt.data.batch_size = 60, 64, 8
  cpt.optim.lr, cpt.optim.warmup_steps = 3e-3, 1
  cpt.train.steps, cpt.train.checkpoint_every, cpt.train.eval_every = 8, 8, 0
  cpt.train.log_every, cpt.train.tensorboard = 1, False
  run_pretrain(cpt)
  with open(tmp_path / "cpt" / "metrics.jsonl", encoding="utf-8") as f:
    losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(losses) == 8 and losses[-1] < losses[0]
  cpt_config = json.loads((tmp_path / "cpt" / "config.json").read_text())
  assert cpt_config["model_config"]["num_layers"] == 10


def test_kat_recipe_at_tiny_scale_from_an_hf_directory(tmp_path):
  """The 40B recipe config (16 of 64 duplicated) run with the same 1/4 ratio: 8 -> 10."""
  source_config = get_preset("tiny", num_layers=8)
  save_pretrained(tmp_path / "source", source_config,
                  init_params(source_config, jax.random.key(7)))
  config = _small(kat_v1_40b_upscale.get_config(), tmp_path / "run")
  config.model.init_from = str(tmp_path / "source")
  config.model.dtype = config.model.param_dtype = "float32"
  config.data.tokenizer, config.data.source = "bytes", "synthetic"
  config.upscale.num_new_layers, config.upscale.expected_num_layers = 2, 10
  config.upscale.save_orbax = False
  summary = stage.run_upscale(config)
  assert summary["new_num_layers"] == 10 and summary["init"] == "copy"
  per_layer = (get_preset("tiny", num_layers=2).num_params()
               - get_preset("tiny", num_layers=1).num_params())
  assert summary["new_params"] - summary["source_params"] == 2 * per_layer
  assert not (tmp_path / "run" / "upscaled" / "orbax_params").exists()
  assert load_pretrained(tmp_path / "run" / "upscaled" / "hf")[0].num_layers == 10


def test_config_mistakes_are_config_errors_before_the_analysis(tmp_path):
  config = _small(upscale_tiny.get_config(), tmp_path)
  up = config.upscale
  up.selection, up.layers, up.num_new_layers = "explicit", "1,9", 2
  with pytest.raises(ConfigError, match=r"config.upscale: layer index \[9\] out of range"):
    stage.run_upscale(config)  # the stage checks its fields before any analysis
  assert not (tmp_path / "saturation.json").exists()
  cases = [
      (dict(layers="1,x"), "not a comma-separated int list"),
      (dict(selection="top_k", num_new_layers=9), "cannot duplicate k=9"),
      (dict(selection="top_k", placement="stack"), "unknown placement"),
      (dict(selection="top_k", expected_num_layers=12), "expected_num_layers is 12"),
      (dict(selection="top_k", init="zeros"), "unknown init 'zeros'"),
      (dict(selection="window", analyze=False), "needs upscale.analyze=True"),
      (dict(selection="top_k", calibration_batches=0), "calibration_batches must be >= 1"),
  ]
  for changes, message in cases:
    bad = up.copy_and_resolve_references()
    bad.update(changes)
    with pytest.raises(ConfigError, match=message):
      upscale_config.check_upscale_fields(bad, 8)
  up.selection, up.layers = "explicit", "3,4"
  upscale_config.check_upscale_fields(up, 8)  # a good config passes


def test_continued_training_of_an_upscaled_model_resumes_with_identical_losses(tmp_path):
  from kat_jax.checkpoint import models  # pylint: disable=g-import-not-at-top
  from kat_jax.testing import assert_resume_reproduces  # pylint: disable=g-import-not-at-top
  from kat_jax.upscale import expand  # pylint: disable=g-import-not-at-top
  base = get_preset("tiny", num_layers=2, dtype="float32")
  layer_map = expand.make_layer_map(2, [0], "interleave")
  upscaled, params = expand.upscale(base, init_params(base, jax.random.key(0)), layer_map,
                                    "copy")
  models.save_model(str(tmp_path / "upscaled"), upscaled, params)

  def run(workdir):
    cpt = pretrain.get_config()
    cpt.workdir = workdir
    cpt.model.init_from = str(tmp_path / "upscaled")
    cpt.model.dtype, cpt.model.remat_policy = "float32", "none"
    cpt.data.tokenizer, cpt.data.source = "bytes", "synthetic"
    cpt.data.synthetic_docs, cpt.data.seq_len = 40, 64
    cpt.data.batch_size = 8
    cpt.optim.warmup_steps = 1
    cpt.train.update(steps=4, checkpoint_every=2, eval_every=0, log_every=1,
                     tensorboard=False, async_checkpoint=False)
    run_pretrain(cpt)

  assert_resume_reproduces(run, str(tmp_path), steps=4, kill_before=4, resumes_at=2)
