"""Dual-regime documents, stored teacher top-k aligned with packed batches, distill smoke run."""

import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from kat_jax.tasks import dual_regime as autothink_tasks
from kat_jax.data import sources
from kat_jax.data.packing import validate_batch
from kat_jax.data.tokenizer import get_tokenizer, kat_tag_ids
from kat_jax.distill import dual_regime, teacher_logits
from kat_jax.distill.losses import topk_logprobs
from kat_jax.distill.objective import Objective
from kat_jax.errors import ConfigError
from kat_jax.model import Decoder, get_preset, init_params, lm_head_kernel

TOK = get_tokenizer("bytes")
TEACHER = get_preset("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
                     num_kv_heads=1, vocab_size=TOK.vocab_size)


def test_dual_regime_records_and_trigger_excluded_from_loss():
  records = dual_regime.generate_records(60, seed=0)
  modes = {r["mode"] for r in records}
  assert modes == {"think_on", "think_off"}
  # The AutoThink task stream, rendered: mode by regime, the task's own texts and tags.
  for r, task in zip(records, autothink_tasks.generate_tasks(60, 0, hard_fraction=0.35)):
    assert r["id"] == task.id and r["domain"] == task.domain
    assert r["difficulty"] == task.difficulty and r["regime"] == task.regime
    assert r["mode"] == ("think_on" if task.regime == "hard" else "think_off")
    assert r["messages"][1]["content"] == task.prompt
    assert task.answer in r["messages"][2]["content"]
    assert (task.think in r["messages"][2]["content"]) == (r["mode"] == "think_on")
  assert len({r["domain"] for r in records}) >= 3
  for r in records[:20]:
    doc = dual_regime.dual_regime_document(r, TOK)
    on, off = kat_tag_ids(TOK)["<think_on>"], kat_tag_ids(TOK)["<think_off>"]
    trigger = on if r["mode"] == "think_on" else off
    where = np.flatnonzero(doc.tokens == trigger)
    assert len(where) == 1 and doc.loss_mask[where[0]] == 0  # input, not target
    assert doc.loss_mask[where[0] + 1] == 1  # the token after the trigger is trained
    assert doc.tokens[-1] == TOK.eos_id and doc.loss_mask[-1] == 1
    # The prompt is not trained.
    assert doc.loss_mask[:where[0]].sum() == 0


def test_teacher_topk_write_read_round_trip_aligned_with_packed_batches(tmp_path):
  params = init_params(TEACHER, jax.random.key(0))
  records = dual_regime.generate_records(9, seed=1)
  to_doc = dual_regime.DualRegimeToDocument(TOK)
  seq_len, k = 64, 4  # documents are 60-250 tokens: split into pieces
  path = str(tmp_path / "t.array_record")
  written = sources.write_array_record(teacher_logits.records_with_teacher(
      records, to_doc, params, TEACHER, k=k, seq_len=seq_len, batch_size=4,
      vocab=TOK.vocab_size, dtype="float32", chunk_size=24), path)  # 64 = 24+24+16: padded
  assert written == 9
  source = sources.ArrayRecordSource(path)
  ds = teacher_logits.make_teacher_dataset(source, to_document=to_doc, k=k, seq_len=seq_len,
                                           batch_size=2, seed=0, pad_id=TOK.pad_id,
                                           shuffle=False, num_epochs=1)
  model = Decoder(TEACHER)
  head = lm_head_kernel(params, TEACHER)

  @jax.jit  # one compile for every batch (same shapes) instead of op-by-op dispatch
  def reference_topk(tokens, positions, kv_end):
    hidden = model.apply({"params": params}, tokens, positions, kv_end, return_hidden=True)
    return topk_logprobs(hidden @ head, k, TOK.vocab_size)

  rows = 0
  for batch in ds:
    validate_batch(batch)
    assert batch["teacher_logprobs"].shape == batch["tokens"].shape + (k,)
    lp, ids = reference_topk(batch["tokens"], batch["positions"], batch["kv_end"])
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(batch["teacher_logprobs"][real], np.asarray(lp)[real],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(batch["teacher_ids"][real], np.asarray(ids)[real])
    assert np.all(batch["teacher_logprobs"][~real] == 0)
    rows += batch["tokens"].shape[0]
  assert rows >= 9 * 1  # split documents made extra rows


def test_teacher_records_stream_and_shard_over_the_mesh():
  """Records are pulled lazily (not all loaded first); rows split over a 4x2 mesh give the
  same top-k as one device."""
  from kat_jax.distill.stage import place_teacher  # pylint: disable=g-import-not-at-top
  from kat_jax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  params = init_params(TEACHER, jax.random.key(3))
  records = dual_regime.generate_records(20, seed=4)
  to_doc = dual_regime.DualRegimeToDocument(TOK)
  pulled = []

  def lazy():
    for r in records:
      pulled.append(r)
      yield r

  kw = dict(k=3, seq_len=128, batch_size=8, vocab=TOK.vocab_size, dtype="float32",
            chunk_size=48)
  stream = teacher_logits.records_with_teacher(lazy(), to_doc, params, TEACHER, **kw)
  first = next(stream)
  assert len(pulled) <= 9  # one batch of 8 pieces (+ the one that overflowed it)
  plain = [first] + list(stream)
  assert len(plain) == 20 and len(pulled) == 20
  mesh = make_mesh(4, 2, 1)
  sharded_params, _ = place_teacher(TEACHER, params, mesh)
  sharded = list(teacher_logits.records_with_teacher(records, to_doc, sharded_params, TEACHER,
                                                     mesh=mesh, **kw))
  for a, b in zip(plain, sharded):
    for key in ("logprobs", "ids"):
      np.testing.assert_allclose(teacher_logits.decode_array(a["teacher_topk"][key]),
                                 teacher_logits.decode_array(b["teacher_topk"][key]),
                                 rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    next(teacher_logits.records_with_teacher(records, to_doc, sharded_params, TEACHER,
                                             mesh=mesh, **{**kw, "batch_size": 6}))


def test_attach_teacher_rejects_misaligned_records():
  record = dual_regime.generate_records(1, seed=2)[0]
  doc = dual_regime.dual_regime_document(record, TOK)
  bad = {**record, "teacher_topk": {"logprobs": teacher_logits.encode_array(
      np.zeros((3, 2), np.float32)), "ids": teacher_logits.encode_array(np.zeros((3, 2),
                                                                                 np.int32))}}
  with pytest.raises(ValueError, match="covers 3 tokens"):
    teacher_logits.attach_teacher(doc, bad)
  with pytest.raises(ValueError, match="teacher_logits stage"):
    teacher_logits.attach_teacher(doc, record)


def test_objective_rejects_a_teacherless_distillation():
  with pytest.raises(ValueError, match="teacher is 'none'"):
    Objective(distill_weight=1.0)
  with pytest.raises(ValueError, match="one more value"):
    Objective(mtp_depth=1, mtp_lambda=(0.3, 0.1))


def _tiny_config(workdir: str) -> ConfigDict:
  from experiments.configs import distill_tiny  # pylint: disable=g-import-not-at-top
  config = distill_tiny.get_config()
  config.workdir = workdir
  config.mesh.data, config.mesh.fsdp = 4, 2  # 8 virtual CPU devices: teacher + student sharded
  config.data.synthetic_docs = 64
  config.data.synthetic_eval_docs = 8
  config.data.seq_len = 128
  config.data.batch_size = 8
  config.data.read_threads = 1
  config.data.prefetch = 2
  config.train.steps = 2
  config.train.eval_batches = 1
  config.train.log_every = 1
  config.train.async_checkpoint = False
  config.train.loss_chunk = 128
  config.distill.teacher_train_steps = 2
  config.distill.teacher_model.num_layers = 1
  config.distill.teacher_model.hidden_size = 32
  config.distill.teacher_model.intermediate_size = 64
  config.model.num_layers = 1
  config.model.hidden_size = 32
  config.model.intermediate_size = 64
  return config


def test_tiny_distill_smoke_online_then_offline(tmp_path):
  from kat_jax.distill.stage import run_distill  # pylint: disable=g-import-not-at-top
  from kat_jax.distill.teacher_stage import run_teacher_logits  # pylint: disable=g-import-not-at-top
  config = _tiny_config(str(tmp_path / "online"))
  config.distill.compare_variants = "kd_mtp"
  summary = run_distill(config)
  assert set(summary["students"]) == {"kd_mtp"}
  assert np.isfinite(summary["teacher"]["eval"]["loss"])
  for result in summary["students"].values():
    assert np.isfinite(result["eval"]["loss"]) and result["steps"] == 2
  assert np.isfinite(summary["students"]["kd_mtp"]["train"]["mtp1_distill"])
  assert os.path.exists(tmp_path / "online" / "comparison.json")
  assert os.path.exists(tmp_path / "online" / "teacher" / "config.json")  # an HF directory
  # The student's run workdir and its final save load through the one loader, MTP heads kept
  # on request; the distill workdir itself names them.
  from kat_jax.checkpoint import models  # pylint: disable=g-import-not-at-top
  student_config, student = models.load_model(str(tmp_path / "online" / "kd_mtp"), mtp=True)
  assert student_config.hidden_size == 32 and len(student["mtp"]) == config.mtp.depth > 0
  _, final = models.load_model(str(tmp_path / "online" / "kd_mtp" / "final"), mtp=True)
  for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ConfigError, match="model sources inside it: kd_mtp, kd_mtp/final, teacher"):
    models.model_source_kind(str(tmp_path / "online"))

  # Offline: store the same teacher's top-k, then distill from the stored records.
  config_t = _tiny_config(str(tmp_path / "online"))
  config_t.stage = "teacher_logits"
  config_t.distill.compare_variants = ""
  from kat_jax.distill.config import teacher_logits_fields  # pylint: disable=g-import-not-at-top
  config_t.teacher_logits = teacher_logits_fields()
  config_t.teacher_logits.top_k = 8
  out = run_teacher_logits(config_t)
  assert out["records"] == {"train": 64, "eval": 8}
  config_o = _tiny_config(str(tmp_path / "offline"))
  config_o.data.source = "array_record"
  config_o.data.paths = os.path.join(out["output"], "train.array_record")
  config_o.data.eval_paths = os.path.join(out["output"], "eval.array_record")
  config_o.distill.teacher = "offline"
  config_o.distill.teacher_topk = 8
  config_o.distill.loss = "uld"
  config_o.mtp.depth = 0  # the MTP path is smoked online above; keeps this test fast
  config_o.distill.compare_variants = ""
  result = run_distill(config_o)["students"]["student"]
  assert np.isfinite(result["train"]["distill"]) and result["train"]["distill"] > 0


def test_unknown_variant_is_a_config_error(tmp_path):
  from kat_jax.distill.config import objective_from  # pylint: disable=g-import-not-at-top
  config = _tiny_config(str(tmp_path))
  with pytest.raises(ConfigError, match="compare_variants"):
    objective_from(config, TOK, "jsd")


def test_distill_student_with_mtp_killed_after_a_checkpoint_resumes_with_identical_losses(
    tmp_path):
  from kat_jax.checkpoint import models  # pylint: disable=g-import-not-at-top
  from kat_jax.distill.stage import run_distill  # pylint: disable=g-import-not-at-top
  from kat_jax.testing import assert_resume_reproduces  # pylint: disable=g-import-not-at-top
  teacher = get_preset("tiny", num_layers=1, hidden_size=32, intermediate_size=64)
  models.save_model(str(tmp_path / "teacher"), teacher, init_params(teacher, jax.random.key(3)))

  def run(workdir):
    config = _tiny_config(workdir)
    config.distill.update(compare_variants="", loss="kd", teacher_init_from=str(
        tmp_path / "teacher"))
    config.mtp.depth = 1
    config.train.update(steps=4, checkpoint_every=2)
    run_distill(config)

  assert_resume_reproduces(run, str(tmp_path), steps=4, kill_before=4, resumes_at=2,
                           log_dir="student")
