"""A trained run workdir is used by one command each: export (transformers loads it with equal
logits), generate, eval and chat; a tokenizer that does not fit the model stops with one
`error:` line. Commands run in-process through `experiments.run`'s flag parsing and main."""

import json
import os
import sys
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from kat_jax.checkpoint import models
from kat_jax.model import Decoder


def run_command(*args: str) -> None:
  """`python -m experiments.run ARGS`, in this process: ml_collections reads the overrides
  from sys.argv and registers one flag per override, dropped here before the next parse."""
  from experiments import run  # pylint: disable=g-import-not-at-top
  argv = ["experiments.run", *args]
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  with mock.patch.object(sys, "argv", argv):
    run.parse_flags(argv)
    run.main(argv[:1])


def test_export_of_a_run_workdir_loads_in_transformers_with_equal_logits(pretrain_run,
                                                                         tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  out = tmp_path / "hf"
  run_command("--config", "experiments/configs/export.py",
              f"--config.export.source={pretrain_run}", f"--config.workdir={out}")
  info = json.loads((out / models.EXPORT_INFO_FILE).read_text())
  assert info["kind"] == "run" and info["step"] == 3 and info["tokenizer"] == "bytes"
  assert (out / "TOKENIZER.md").exists() and (out / "model.safetensors").exists()
  config, params = models.load_model(pretrain_run)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)).astype(np.int32)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
  assert float(np.abs(theirs).max()) > 1e-3  # the compared logits are not all ~0
  # The exported directory is itself a model source and names its tokenizer.
  assert models.tokenizer_name(str(out)) == "bytes"


def test_generate_and_eval_commands_take_a_run_workdir_at_a_step(pretrain_run, tmp_path):
  run_command("--config", "experiments/configs/generate.py",
              f"--config.model.init_from={pretrain_run}@2", f"--config.workdir={tmp_path}/gen",
              "--config.generate.max_new_tokens=4", "--config.generate.temperature=0")
  rows = [json.loads(line) for line in open(tmp_path / "gen" / "completions.jsonl")]
  assert len(rows) == 2 and all(0 < r["num_tokens"] <= 4 for r in rows)
  run_command("--config", "experiments/configs/eval.py",
              f"--config.eval.checkpoints={pretrain_run}", f"--config.workdir={tmp_path}/eval",
              "--config.eval.benchmarks=generated", "--config.eval.num_generated=2",
              "--config.eval.max_new_tokens=4", "--config.eval.workers=1")
  results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
  label = os.path.basename(pretrain_run)
  assert results["checkpoints"][label]["path"] == pretrain_run
  assert results["checkpoints"][label]["generated"]["num_tasks"] == 2


def test_chat_cli_answers_from_a_run_workdir(pretrain_run, capsys):
  from kat_jax.sampling import chat_cli  # pylint: disable=g-import-not-at-top
  chat_cli.main(["--model", pretrain_run, "--prompt", "hi", "--max_new_tokens", "3",
                 "--think_mode", "off", "--dtype", "float32", "--max_length", "96"])
  assert capsys.readouterr().out.startswith("assistant> <judge>\n\n</judge>\n\n<think_off>\n")


@pytest.mark.parametrize("command", [
    ["--config", "experiments/configs/generate.py", "--config.data.tokenizer=qwen2.5",
     "--config.model.num_layers=1"],
    ["--config", "experiments/configs/export.py", "--config.export.source=tiny",
     "--config.export.tokenizer=qwen2.5"],
    ["--config", "experiments/configs/eval.py", "--config.data.tokenizer=qwen2.5",
     "--config.eval.benchmarks=generated", "--config.model.num_layers=1"],
])
def test_a_tokenizer_larger_than_the_model_stops_with_one_error_line(command, tmp_path,
                                                                      capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_command(*command, f"--config.workdir={tmp_path}")
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  assert "vocab_size 512 is smaller than the QwenTokenizer's 151673 ids" in err[0]


def test_export_refuses_to_write_into_a_run_workdir(pretrain_run, capsys):
  with pytest.raises(SystemExit):
    run_command("--config", "experiments/configs/export.py", "--config.export.source=tiny",
                f"--config.workdir={pretrain_run}")
  assert capsys.readouterr().err.strip() == (
      f"error: config.workdir {pretrain_run} is a run workdir; export to another directory")


def test_chat_cli_refuses_a_tokenizer_larger_than_the_model(capsys):
  from kat_jax.sampling import chat_cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_info:
    chat_cli.main(["--model", "tiny", "--tokenizer", "qwen2.5", "--prompt", "hi"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --model: the model's vocab_size 512 is smaller than the "
                 "QwenTokenizer's 151673 ids; pick the tokenizer the model was trained with "
                 "(config.data.tokenizer) or a matching model"]
