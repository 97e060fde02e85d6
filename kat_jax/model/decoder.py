"""The Qwen2.5 decoder: embedding, `nn.scan` over pre-norm blocks, final norm, LM head.

Parameter tree (layer weights stacked on a leading `layers` axis)::

  embed/embedding                 [V, d]        (vocab, embed)
  layers/input_norm/scale         [L, d]
  layers/attn/{q,k,v}_kernel      [L, d, H, D]  (layers, embed, heads|kv_heads, head_dim)
  layers/attn/{q,k,v}_bias        [L, H, D]
  layers/attn/o_kernel            [L, H, D, d]
  layers/post_attn_norm/scale     [L, d]
  layers/mlp/{gate,up}_proj       [L, d, F]     down_proj [L, F, d]
  final_norm/scale                [d]
  lm_head/kernel                  [d, V]        (absent when embeddings are tied)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kat_jax.model.config import ModelConfig
from kat_jax.model.layers import MLP, Attention, RMSNorm, rope_cos_sin

_ACT = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class DecoderBlock(nn.Module):
  """h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h)). Scanned: (carry, broadcast...) -> (carry, None)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array,
               kv_end: jax.Array | None) -> tuple[jax.Array, None]:
    cfg = self.config
    h = nn.with_logical_constraint(h, _ACT)
    attn_in = RMSNorm(cfg, cfg.rms_norm_eps, name="input_norm")(h)
    h = h + Attention(cfg, name="attn")(attn_in, cos, sin, kv_end)
    mlp_in = RMSNorm(cfg, cfg.rms_norm_eps, name="post_attn_norm")(h)
    h = h + MLP(cfg, name="mlp")(mlp_in)
    return nn.with_logical_constraint(h, _ACT), None


def _scanned_blocks(config: ModelConfig) -> type[nn.Module]:
  block = DecoderBlock
  if config.remat_policy != "none":
    block = nn.remat(block, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=False)
  return nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
      length=config.num_layers,
      unroll=config.scan_unroll,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


class Decoder(nn.Module):
  """Qwen2.5 decoder. `apply(params, tokens, positions, kv_end)` -> logits [B,T,V].

  tokens [B,T] int32; positions [B,T] (default 0..T-1, RoPE uses them, so tree depth goes
  here); kv_end [B,T] int32 (default None: plain causal). With `return_hidden=True` it
  returns the final-normed hidden states [B,T,d] instead of logits; losses over large
  vocabularies use that with `lm_head_kernel` to avoid full logits.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.initializer_range), ("vocab", "embed")))
    self.layers = _scanned_blocks(cfg)(cfg)
    self.final_norm = RMSNorm(cfg, cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.normal(stddev=cfg.initializer_range), ("embed", "vocab")))

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    kv_end: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B,T,d] in the compute dtype."""
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    h = self.embed(tokens).astype(cfg.compute_dtype)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_dtype)
    h, _ = self.layers(h, cos, sin, kv_end)
    return self.final_norm(h)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., d] -> logits [..., V] in the compute dtype."""
    if self.config.tie_word_embeddings:
      return self.embed.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               kv_end: jax.Array | None = None, *, return_hidden: bool = False) -> jax.Array:
    hidden = self.hidden_states(tokens, positions, kv_end)
    return hidden if return_hidden else self.logits(hidden)


def lm_head_kernel(params: dict, config: ModelConfig) -> jax.Array:
  """The [d, V] output projection from a (unboxed) param tree, tied or untied."""
  if config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


@functools.partial(jax.jit, static_argnums=0, static_argnames="seq_len")
def init_params(config: ModelConfig, rng: jax.Array, *, seq_len: int = 8) -> dict:
  """Initialises an unboxed parameter tree (plain arrays) for `config`. Jitted: flax's init
  runs a forward pass, which op by op takes seconds even for a tiny model."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  variables = Decoder(config).init(rng, tokens)
  return nn.meta.unbox(variables["params"])


def param_shapes(config: ModelConfig) -> dict:
  """Abstract parameter tree (jax.ShapeDtypeStruct leaves) without allocating anything."""
  return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def logical_axes(config: ModelConfig) -> dict:
  """Tree of logical axis-name tuples (PartitionSpec of logical names), same structure as params."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda rng: Decoder(config).init(rng, tokens), jax.random.key(0))
  return nn.get_partition_spec(boxed)["params"]
