"""Multi-Token Prediction heads (DeepSeek-V3, arXiv 2412.19437 §2.2; docs/spec.md §3.1).

D sequential modules share the main model's embedding and LM head. Module k at position i::

    h_i^k = Block_k( W_k [ RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h_i^{k-1}) ] )   (emb first, as
                                                            Megatron/MaxText/vLLM code does)
    logits = Head( RMSNorm_f(h_i^k) )    predicts t_{i+k+1}

with h^0 the main model's final-normed hidden states. Parameters (under the train state's
top-level "mtp" key, next to the decoder's)::

  depth_{k}/enorm/scale, hnorm/scale   [d]
  depth_{k}/eh_proj                    [2d, d]   (concat_embed, embed)
  depth_{k}/block/...                  one DecoderBlock (same tree as one decoder layer)
  depth_{k}/final_norm/scale           [d]

Packed and tree rows (the `kv_end` layout): position j+1 continues j's path iff
j+1 < kv_end[j]. Depth k at i is valid iff that holds k times from i (`chain_valid`); its
block attends with `mtp_kv_end`, which also hides keys j whose token j+k is not on the query's
own path (in a prefix tree an ancestor's "k-th next token" may lie in a sibling branch).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kat_jax.model.config import ModelConfig
from kat_jax.model.decoder import DecoderBlock
from kat_jax.model.layers import RMSNorm, rope_cos_sin


def continues_path(kv_end: jax.Array) -> jax.Array:
  """[B,T] bool: token j+1 is the next token on j's path (j+1 < kv_end[j]); False at T-1."""
  t = kv_end.shape[-1]
  nxt = jnp.arange(t, dtype=kv_end.dtype) + 1
  return (nxt < kv_end) & (nxt < t)


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
  """x[..., i + k] at i, `fill` past the end. x [B,T]."""
  if k == 0:
    return x
  t = x.shape[-1]
  if k >= t:
    return jnp.full_like(x, fill)
  pad = jnp.full(x.shape[:-1] + (k,), fill, x.dtype)
  return jnp.concatenate([x[..., k:], pad], axis=-1)


def chain_valid(kv_end: jax.Array, steps: int) -> jax.Array:
  """[B,T] bool: i, i+1, ..., i+steps all lie on one root-to-leaf path (steps >= 0)."""
  cont = continues_path(kv_end)
  valid = jnp.ones(kv_end.shape, bool)
  for m in range(steps):
    valid = valid & shift_left(cont, m, False)
  return valid


def mtp_kv_end(kv_end: jax.Array, k: int) -> jax.Array:
  """kv_end for the depth-k block: query i sees key j iff j <= i < kv_end[j] (main rule) and
  i + k < kv_end[j + k] (j's input token t_{j+k} is on the path of i's input t_{i+k}).

  Keys whose k-step chain is invalid are seen by themselves only (their outputs are unused).
  For packed documents this only trims the last k queries of each document, which have no
  depth-k target anyway, so it equals "same kv_end as the main model" where it matters.
  """
  if k == 0:
    return kv_end
  t = kv_end.shape[-1]
  ahead = shift_left(kv_end, k, 0) - k
  j1 = jnp.arange(t, dtype=kv_end.dtype) + 1
  return jnp.where(chain_valid(kv_end, k), jnp.minimum(kv_end, ahead), j1)


def mtp_targets(tokens: jax.Array, weights: jax.Array, kv_end: jax.Array, k: int
                ) -> tuple[jax.Array, jax.Array]:
  """(targets, weights) of depth k per position i: t_{i+k+1}, weighted by weights[i+k+1]
  where i..i+k+1 is one path, else 0. tokens/weights/kv_end [B,T]."""
  targets = shift_left(tokens, k + 1, 0)
  w = shift_left(weights.astype(jnp.float32), k + 1, 0.0)
  return targets, jnp.where(chain_valid(kv_end, k + 1), w, 0.0)


class MTPLayer(nn.Module):
  """One MTP module: (hidden h^{k-1}, embedding of t_{i+k}) -> (h^k, RMSNorm(h^k))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, token_emb: jax.Array, cos: jax.Array,
               sin: jax.Array, kv_end: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    d, dt = cfg.hidden_size, cfg.compute_dtype
    e = RMSNorm(cfg, cfg.rms_norm_eps, name="enorm")(token_emb.astype(dt))
    h = RMSNorm(cfg, cfg.rms_norm_eps, name="hnorm")(hidden.astype(dt))
    kernel = self.param(
        "eh_proj", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.initializer_range), ("concat_embed", "embed")),
        (2 * d, d), cfg.weight_dtype)
    x = jnp.einsum("btc,cd->btd", jnp.concatenate([e, h], axis=-1), kernel.astype(dt))
    x, _ = DecoderBlock(cfg, name="block")(x, cos, sin, kv_end)
    return x, RMSNorm(cfg, cfg.rms_norm_eps, name="final_norm")(x)


class MTPHeads(nn.Module):
  """D sequential MTP modules. Returns the D final-normed hidden states [D x [B,T,d]].

  `apply({"params": mtp_params}, hidden, tokens, embedding, positions, kv_end)`:
    hidden [B,T,d] main model's final-normed states; tokens [B,T] int32 (depth k embeds
    tokens[i+k]); embedding [V,d] the shared table; positions/kv_end as the main model.
  """

  config: ModelConfig
  depth: int

  @nn.compact
  def __call__(self, hidden: jax.Array, tokens: jax.Array, embedding: jax.Array,
               positions: jax.Array | None = None,
               kv_end: jax.Array | None = None) -> list[jax.Array]:
    cfg = self.config
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if kv_end is None:
      kv_end = jnp.full((b, t), t, jnp.int32)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_dtype)
    outputs = []
    h = hidden
    for k in range(1, self.depth + 1):
      valid = chain_valid(kv_end, k)
      # Invalid inputs are zeroed: they never reach a valid query (mtp_kv_end), but keep the
      # padded values clean.
      emb = jnp.take(embedding, shift_left(tokens, k, 0), axis=0)
      emb = jnp.where(valid[..., None], emb, 0).astype(cfg.compute_dtype)
      h, normed = MTPLayer(cfg, name=f"depth_{k}")(h, emb, cos, sin, mtp_kv_end(kv_end, k))
      outputs.append(normed)
    return outputs


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames="seq_len")
def init_mtp_params(config: ModelConfig, depth: int, rng: jax.Array, *,
                    seq_len: int = 8) -> dict:
  """Unboxed MTP parameter tree for `depth` modules (jitted, as `init_params` is)."""
  variables = _mtp_init(config, depth)(rng, seq_len)
  return nn.meta.unbox(variables["params"])


def _mtp_init(config: ModelConfig, depth: int):
  def init(rng, seq_len: int = 8):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    hidden = jnp.zeros((1, seq_len, config.hidden_size), config.compute_dtype)
    emb = jnp.zeros((config.vocab_size, config.hidden_size), config.compute_dtype)
    return MTPHeads(config, depth).init(rng, hidden, tokens, emb)
  return init


def boxed_mtp_init(config: ModelConfig, depth: int, rng: jax.Array) -> dict:
  """MTP params keeping their logical-axis boxes (for sharded state creation)."""
  return _mtp_init(config, depth)(rng)["params"]


def split_mtp(params: dict) -> tuple[dict, dict | None]:
  """{decoder params..., "mtp": ...} -> (decoder params, mtp params or None)."""
  params = dict(params)
  mtp = params.pop("mtp", None)
  return params, mtp


def mtp_depth_of(params: dict) -> int:
  """Number of MTP modules stored in a params tree (0 without an "mtp" key)."""
  return len(params.get("mtp", {}) or {})


# Hugging Face directories: MTP heads ride along in their own file (`kat_jax.checkpoint.hf`),
# so the model.safetensors files stay a plain Qwen2 checkpoint that transformers loads.
MTP_FILE = "mtp.safetensors"


def mtp_to_flat(mtp_params: dict) -> dict[str, jax.Array]:
  """{"depth_k": {...}} -> {"mtp.<k>.<path joined by '.'>": leaf}, kat_jax layout (no
  transposes), e.g. "mtp.1.eh_proj", "mtp.1.block.attn.q_kernel"."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(mtp_params)[0]:
    keys = [p.key for p in path]
    if not keys[0].startswith("depth_"):
      raise ValueError(f"MTP params: top-level key {keys[0]!r} is not depth_<k>")
    flat[".".join(["mtp", keys[0][len("depth_"):]] + keys[1:])] = leaf
  return flat


def mtp_from_flat(flat: dict[str, jax.Array], config: ModelConfig, *, where: str = "") -> dict:
  """Inverse of `mtp_to_flat`, checked against the MTP tree `config` gives for that depth."""
  tree: dict = {}
  for name, leaf in flat.items():
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "mtp" or not parts[1].isdigit():
      raise ValueError(f"{where}: tensor {name!r} is not named mtp.<k>.<param path>")
    node = tree.setdefault(f"depth_{parts[1]}", {})
    for key in parts[2:-1]:
      node = node.setdefault(key, {})
    node[parts[-1]] = leaf
  depth = len(tree)
  if set(tree) != {f"depth_{k}" for k in range(1, depth + 1)}:
    raise ValueError(f"{where}: MTP depths must be 1..D, got {sorted(tree)}")
  expected = jax.eval_shape(lambda r: init_mtp_params(config, depth, r), jax.random.key(0))
  got = jax.tree.map(lambda x: x.shape, tree)
  want = jax.tree.map(lambda x: tuple(x.shape), expected)
  if got != want:
    raise ValueError(f"{where}: MTP tensors do not match {depth} MTP module(s) of this "
                     f"config: got {got}, expected {want}")
  return tree
