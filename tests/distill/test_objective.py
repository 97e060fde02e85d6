"""The distillation objective vs a naive per-document reference (main + MTP-depth KD/ULD,
student-EOS skip), and the λ schedule."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kat_jax.distill.losses import DistillSpec
from kat_jax.distill.objective import Objective, make_distill_step, make_loss_fn, mtp_lambda_at
from kat_jax.model import Decoder, get_preset, init_params, lm_head_kernel
from kat_jax.model.mtp import MTPHeads, init_mtp_params
from kat_jax.testing import relative_error
from kat_jax.train.state import create_train_state

V = 40
STUDENT = get_preset("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
                     num_kv_heads=1, vocab_size=V)
TEACHER = get_preset("tiny", num_layers=1, hidden_size=48, intermediate_size=64, num_heads=2,
                     num_kv_heads=1, vocab_size=V)
EOS = 8
# Two packed documents [0,3) and [3,8), padding at 8. EOS (8) is the target at index 6, so it
# is the main target of position 5, depth-1 target of 4 and depth-2 target of 3.
TOKENS = np.array([[5, 9, 2, 7, 1, 3, 8, 4, 0]])
DOCS = [(0, 3), (3, 8)]
WEIGHTS = np.array([[0, 1.0, 0.5, 0, 1.0, 0.0, 2.0, 1.0, 0]], np.float32)


def _batch() -> dict:
  return {"tokens": jnp.asarray(TOKENS), "positions": jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4, 0]]),
          "kv_end": jnp.asarray([[3, 3, 3, 8, 8, 8, 8, 8, 9]]),
          "pred_index": jnp.asarray([[0, 0, 1, 3, 3, 4, 5, 6, 8]]),
          "weights": jnp.asarray(WEIGHTS)}


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_distill(kind: str, s_logits, t_logits, tau: float) -> float:
  """Numpy KD (τ²·KL(p_T^τ‖p_S^τ)) or exact ULD (L1 of sorted probabilities), one token."""
  if kind == "kd":
    ls, lt = _np_log_softmax(s_logits / tau), _np_log_softmax(t_logits / tau)
    return tau**2 * float(np.sum(np.exp(lt) * (lt - ls)))
  ps = np.sort(np.exp(_np_log_softmax(s_logits)))[::-1]
  pt = np.sort(np.exp(_np_log_softmax(t_logits)))[::-1]
  return float(np.abs(ps - pt).sum())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _doc_outputs(depth, length, params, teacher_params, start):
  """Student hidden + depth outputs and teacher hidden of TOKENS[start:start+length] alone."""
  dec = {k: v for k, v in params.items() if k != "mtp"}
  tok = jax.lax.dynamic_slice_in_dim(jnp.asarray(TOKENS), start, length, axis=1)
  h = Decoder(STUDENT).apply({"params": dec}, tok, return_hidden=True)
  outs = MTPHeads(STUDENT, depth).apply({"params": params["mtp"]}, h, tok,
                                       dec["embed"]["embedding"])
  return [h] + list(outs), Decoder(TEACHER).apply({"params": teacher_params}, tok,
                                                  return_hidden=True)


@functools.partial(jax.jit, static_argnums=0)
def _init(config, rng):
  return init_params(config, rng)


def _naive_objective(params, teacher_params, objective: Objective, lam: float) -> dict:
  """Each document alone, full logits, Python loops over positions and depths."""
  dec = {k: v for k, v in params.items() if k != "mtp"}
  head = np.asarray(lm_head_kernel(dec, STUDENT))
  t_head = np.asarray(lm_head_kernel(teacher_params, TEACHER))
  kind, tau = objective.spec.kind, objective.spec.temperature
  skip = kind == "uld" and objective.skip_student_eos
  depth = objective.mtp_depth
  sums = {"ce": 0.0, "distill": 0.0, **{f"ce{k}": 0.0 for k in range(1, depth + 1)},
          **{f"d{k}": 0.0 for k in range(1, depth + 1)}}
  for start, end in DOCS:
    tok = TOKENS[:, start:end]
    w = WEIGHTS[0, start:end]
    outs, t_hidden = _doc_outputs(depth, end - start, params, teacher_params, start)
    outs = [np.asarray(o)[0] for o in outs]
    t_logits = np.asarray(t_hidden)[0] @ t_head
    for k in range(depth + 1):  # k = 0: the main head, position i predicts t_{i+1}
      logits = outs[k] @ head
      for i in range(end - start - k - 1):
        target = int(tok[0, i + k + 1])
        wt = float(w[i + k + 1])
        sums["ce" if k == 0 else f"ce{k}"] -= wt * _np_log_softmax(logits[i])[target]
        wd = 0.0 if skip and target == EOS else wt
        # The teacher's next-token distribution at i+k predicts the same token t_{i+k+1}.
        sums["distill" if k == 0 else f"d{k}"] += wd * _np_distill(kind, logits[i],
                                                                    t_logits[i + k], tau)
  total = objective.ce_weight * sums["ce"] + objective.distill_weight * sums["distill"]
  if depth:
    total += lam / depth * sum(objective.mtp_ce_weight * sums[f"ce{k}"]
                               + objective.mtp_distill_weight * sums[f"d{k}"]
                               for k in range(1, depth + 1))
  sums["total"] = total
  return sums


# Each kind at each depth, EOS skip on and off (the skip only acts on ULD).
@pytest.mark.parametrize("kind,depth,skip_eos", [("kd", 1, True), ("kd", 2, False),
                                                 ("uld", 1, False), ("uld", 2, True)])
def test_objective_matches_naive_per_document_reference(kind, depth, skip_eos):
  params = dict(_init(STUDENT, jax.random.key(0)))
  params["mtp"] = init_mtp_params(STUDENT, depth, jax.random.key(1))
  teacher_params = _init(TEACHER, jax.random.key(2))
  spec = DistillSpec(kind, temperature=1.7 if kind == "kd" else 1.0)
  objective = Objective(ce_weight=0.5, distill_weight=2.0, spec=spec, teacher="online",
                        mtp_depth=depth, mtp_ce_weight=0.8, mtp_distill_weight=1.3,
                        mtp_lambda=(0.6,), skip_student_eos=skip_eos, eos_id=EOS, loss_chunk=4)
  loss, aux = jax.jit(make_loss_fn(STUDENT, TEACHER, objective))(
      params, teacher_params, _batch(), jnp.float32(0.6))
  ref = _naive_objective(params, teacher_params, objective, 0.6)
  # float32 KL sums of ~0.1 lose ~1e-5 relative to cancellation; an index slip changes O(1).
  assert relative_error(aux["ce_sum"], ref["ce"]) < 1e-5
  assert relative_error(aux["distill_sum"], ref["distill"]) < 1e-4
  for k in range(1, depth + 1):
    assert relative_error(aux[f"mtp{k}_ce_sum"], ref[f"ce{k}"]) < 1e-5
    assert relative_error(aux[f"mtp{k}_distill_sum"], ref[f"d{k}"]) < 1e-4
  assert relative_error(loss, ref["total"]) < 1e-5
  if kind == "uld":  # the EOS target carries weight 2 at every depth: skipping must show
    other = dataclasses.replace(objective, skip_student_eos=not skip_eos)
    flipped = _naive_objective(params, teacher_params, other, 0.6)
    assert abs(flipped[f"d{depth}"] - ref[f"d{depth}"]) > 1e-4
    assert abs(flipped["distill"] - ref["distill"]) > 1e-4


def test_mtp_lambda_schedule_is_piecewise_constant():
  objective = Objective(mtp_depth=1, mtp_lambda=(0.3, 0.1, 0.05), mtp_lambda_boundaries=(2, 5))
  lam = jax.jit(lambda s: mtp_lambda_at(objective, s))
  got = [float(lam(jnp.int32(s))) for s in range(8)]
  np.testing.assert_allclose(got, [0.3, 0.3, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05], rtol=1e-7)
  constant = Objective(mtp_lambda=(0.7,))
  assert float(mtp_lambda_at(constant, jnp.int32(10**6))) == pytest.approx(0.7)
  with pytest.raises(ValueError, match="must increase"):
    Objective(mtp_lambda=(0.3, 0.1, 0.05), mtp_lambda_boundaries=(5, 2))


def test_train_step_uses_the_lambda_of_its_step():
  """λ follows state.step through the jitted step, and scales only the MTP term."""
  params = dict(_init(STUDENT, jax.random.key(3)))
  params["mtp"] = init_mtp_params(STUDENT, 1, jax.random.key(4))
  objective = Objective(mtp_depth=1, mtp_lambda=(0.3, 0.1), mtp_lambda_boundaries=(2,),
                        loss_chunk=4)
  optimizer = optax.sgd(0.0)  # params stay put: every step sees the same losses
  step = jax.jit(make_distill_step(STUDENT, None, objective, optimizer))
  state = create_train_state(params, optimizer)
  lams, grads = [], []
  for _ in range(3):
    state, metrics = step(state, None, _batch())
    lams.append(float(metrics["mtp_lambda"]))
    grads.append(float(metrics["grad_norm"]))
  np.testing.assert_allclose(lams, [0.3, 0.3, 0.1], rtol=1e-7)
  assert grads[0] == pytest.approx(grads[1], rel=1e-6)
  assert abs(grads[2] - grads[1]) > 1e-6  # the MTP term's share of the gradient changed
  # The loss is linear in λ with slope (1/D)·Σ_k CE_k.
  loss_fn = jax.jit(make_loss_fn(STUDENT, None, objective))
  (l0, aux), (l1, _) = (loss_fn(params, None, _batch(), jnp.float32(x)) for x in (0.0, 1.0))
  assert relative_error(l1 - l0, aux["mtp1_ce_sum"]) < 1e-5
