"""Decoupled mode: weight snapshots, worker threads + queue + trainer, server client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kat_jax.agentic.decoupled import (OpenAICompletionsClient, WeightStore, run_decoupled,
                                       server_rollout)
from kat_jax.agentic.environments import DigitsEnv
from kat_jax.agentic.rollout import RolloutConfig, tree_rollout
from kat_jax.agentic.stage import agentic_fields, objective_from, rl_batch
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import get_preset, init_params
from kat_jax.rl.objectives import group_advantages
from kat_jax.rl.policy_step import POLICY_INPUTS, make_policy_step
from kat_jax.sampling import Sampler, SamplingParams, prepare_params
from kat_jax.train.state import TrainState


def test_weight_store_round_trip_and_keep(tmp_path):
  store = WeightStore(str(tmp_path), keep=2)
  like = {"a": np.zeros(3, np.float32), "b": {"c": np.zeros((2, 2), np.float32)}}
  assert store.latest(like) is None
  for step in range(4):
    store.publish(step, jax.tree.map(lambda x: x + step, like))
  assert store.steps() == [2, 3]
  step, params = store.latest(like)
  assert step == 3 and np.all(params["b"]["c"] == 3)


def test_workers_and_trainer_exchange_through_queue_and_snapshots(tmp_path):
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1)
  ag = agentic_fields()
  ag.seq_len, ag.rows_per_update = 512, 2
  objective = objective_from(ag)
  optimizer = optax.adam(1e-3)
  params = init_params(config, jax.random.key(0))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
  step_fn = jax.jit(make_policy_step(config, optimizer, objective, loss_chunk=512))
  sampler = Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=128)
  cfg = RolloutConfig(branching=(2, 2), max_turns=2, max_new_tokens=3, max_length=384,
                      sampling=SamplingParams(1.0, vocab_limit=128))

  def rollout_fn(p, tasks, rng):
    return tree_rollout(sampler, prepare_params(p, config), DigitsEnv, tasks, tokenizer, rng,
                        cfg)

  def train_fn(st, batch):
    rewards = np.array([e.reward for g in batch.groups for e in g])
    ids = np.array([i for i, g in enumerate(batch.groups) for _ in g])
    packed, _ = rl_batch(batch.groups, group_advantages(rewards, ids), ag, objective,
                         tokenizer.pad_id)
    for s in range(0, len(packed["tokens"]), ag.rows_per_update):
      st, metrics = step_fn(st, {k: packed[k][s:s + 2] for k in POLICY_INPUTS})
    return st, {"loss": float(metrics["loss"])}

  final, log = run_decoupled(state, train_fn, rollout_fn, lambda w, i: [10 * w + i],
                             str(tmp_path), num_updates=3, num_workers=2, max_staleness=1,
                             timeout_s=240)
  assert [r["update"] for r in log] == [1, 2, 3]
  assert all(0 <= r["staleness"] <= 1 for r in log)
  assert WeightStore(str(tmp_path)).steps()[-1] == 3
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), final.params, params)
  assert max(jax.tree.leaves(moved)) > 0


class _FakeServer(BaseHTTPRequestHandler):
  """Answers /v1/completions like vLLM: each sample writes 'ok' then <|im_end|> (id 258)."""

  requests = []

  def do_POST(self):  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    _FakeServer.requests.append(body)
    ids = [ord("o"), ord("k"), 258]
    choices = [{"index": i, "finish_reason": "stop", "text": "ok",
                "logprobs": {"tokens": [f"token_id:{t}" for t in ids],
                             "token_logprobs": [-0.5, -0.25, -0.125]}}
               for i in range(body["n"])]
    data = json.dumps({"choices": choices}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


def test_server_rollout_through_an_openai_compatible_endpoint():
  server = HTTPServer(("127.0.0.1", 0), _FakeServer)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    tokenizer = get_tokenizer("bytes")
    client = OpenAICompletionsClient(f"http://127.0.0.1:{server.server_port}", "m")
    cfg = RolloutConfig(branching=(3,), max_turns=2, max_new_tokens=8)
    groups = server_rollout(client, lambda: DigitsEnv(rounds=2), [0], tokenizer, cfg)
  finally:
    server.shutdown()
  assert len(groups[0]) == 3
  e = groups[0][0]
  assert e.messages[1]["content"] == "ok" and e.reward == 0.0 and e.turns == 2
  mask = np.array(e.loss_mask, bool)
  assert np.array(e.tokens)[mask].tolist() == [ord("o"), ord("k"), 258] * 2
  assert np.array(e.logprobs)[mask].tolist() == [-0.5, -0.25, -0.125] * 2
  assert _FakeServer.requests[0]["prompt"] == e.tokens[:len(_FakeServer.requests[0]["prompt"])]
  assert _FakeServer.requests[0]["return_tokens_as_token_ids"] is True
  with pytest.raises(ValueError, match="token_id"):
    from kat_jax.agentic.decoupled import _token_id
    _token_id("ok")
