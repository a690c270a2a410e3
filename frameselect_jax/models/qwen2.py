"""Qwen2 / Qwen2.5 decoder (Qwen2ForCausalLM) in Flax NNX, with Hugging Face parameter names.

Module tree: model.embed_tokens, model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head (absent when tied).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from frameselect_jax.models.attention import (
  CausalAttention,
  causal_attention,
  dot_product_attention,
)
from frameselect_jax.models.layers import (
  Dense,
  Embed,
  RMSNorm,
  apply_rope,
  remat_block,
  remat_policy_name,
  rope_cos_sin,
  take_rows,
)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  vocab_size: int = 151936
  hidden_size: int = 1536
  intermediate_size: int = 8960
  num_hidden_layers: int = 28
  num_attention_heads: int = 12
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768

  @property
  def head_dim(self):
    return self.hidden_size // self.num_attention_heads

  def validate(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} not divisible by "
        f"num_attention_heads {self.num_attention_heads}"
      )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads {self.num_attention_heads} not divisible by "
        f"num_key_value_heads {self.num_key_value_heads}"
      )
    return self


class Qwen2Attention(nnx.Module):
  def __init__(self, cfg: Qwen2Config, *, dtype, rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      hd,
    )
    self.q_proj = Dense(
      d, cfg.num_attention_heads * hd, axes=("embed", "q_heads"), dtype=dtype, rngs=rngs
    )
    self.k_proj = Dense(
      d, cfg.num_key_value_heads * hd, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs
    )
    self.v_proj = Dense(
      d, cfg.num_key_value_heads * hd, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs
    )
    self.o_proj = Dense(
      cfg.num_attention_heads * hd,
      d,
      axes=("q_heads", "embed"),
      use_bias=False,
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, x, cos, sin, key_valid, rows=None, attention: CausalAttention | None = None):
    """Causal self-attention over x (b, s, d); key_valid (b, s) hides padded keys. With rows
    (b,) int, only the output at position rows[i] of each example is computed (b, 1, d):
    keys and values still cover every token. `attention` replaces the XLA kernel."""
    b, s, _ = x.shape
    k = checkpoint_name(self.k_proj(x), "k").reshape(b, s, self.num_kv_heads, self.head_dim)
    v = checkpoint_name(self.v_proj(x), "v").reshape(b, s, self.num_kv_heads, self.head_dim)
    k = apply_rope(k, cos, sin)
    if rows is None:
      q = checkpoint_name(self.q_proj(x), "q").reshape(b, s, self.num_heads, self.head_dim)
      out = (attention or causal_attention)(apply_rope(q, cos, sin), k, v, key_valid)
    else:
      x, cos, sin = take_rows(x, rows), take_rows(cos, rows), take_rows(sin, rows)
      q = apply_rope(self.q_proj(x).reshape(b, 1, self.num_heads, self.head_dim), cos, sin)
      # Each query row sees the valid keys at or before its own position.
      visible = key_valid & (jnp.arange(s)[None, :] <= rows[:, None])
      out = dot_product_attention(q, k, v, visible[:, None, None, :])
    out = checkpoint_name(out.reshape(b, x.shape[1], self.num_heads * self.head_dim), "context")
    return checkpoint_name(self.o_proj(out), "attn_out")


class Qwen2MLP(nnx.Module):
  def __init__(self, cfg: Qwen2Config, *, dtype, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Dense(d, f, axes=("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
    self.up_proj = Dense(d, f, axes=("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
    self.down_proj = Dense(f, d, axes=("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    gate = checkpoint_name(self.gate_proj(x), "gate")
    up = checkpoint_name(self.up_proj(x), "up")
    return checkpoint_name(self.down_proj(jax.nn.silu(gate) * up), "mlp_out")


class Qwen2DecoderLayer(nnx.Module):
  def __init__(self, cfg: Qwen2Config, *, dtype, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.self_attn = Qwen2Attention(cfg, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.mlp = Qwen2MLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, key_valid, rows=None, attention=None):
    """x (b, s, d) -> (b, s, d); with rows (b,) int, only each example's row rows[i] (b, 1, d)."""
    residual = x if rows is None else take_rows(x, rows)
    x = residual + self.self_attn(self.input_layernorm(x), cos, sin, key_valid, rows, attention)
    return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nnx.Module):
  def __init__(self, cfg: Qwen2Config, *, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.remat = remat_policy_name(remat)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
      [Qwen2DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
    )
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

  def __call__(
    self,
    inputs_embeds,
    *,
    attention_mask=None,
    position_ids=None,
    num_layers=None,
    output_rows=None,
    output_hidden_states=False,
    attention: CausalAttention | None = None,
  ):
    """Runs the first `num_layers` blocks (all by default) over input embeddings.

    Returns (last hidden state, tuple of hidden states). The final norm is applied only
    when every block ran, as in transformers; hidden_states follows transformers'
    convention (embeddings, then each block's output, the last one normed).

    output_rows (b,) int: only the hidden state at position output_rows[i] of each example
    is wanted, so the last block computes that row alone (its keys and values still cover
    every token); the last hidden state is then (b, 1, d).

    attention_mask (b, s): 1 on real tokens, 0 on padding (hidden from every query).
    attention: the causal attention kernel (None: XLA's, `attention.causal_attention`).
    """
    b, s, _ = inputs_embeds.shape
    num_layers = len(self.layers) if num_layers is None else num_layers
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
    key_valid = (
      jnp.ones((b, s), bool)
      if attention_mask is None
      else jnp.broadcast_to(attention_mask.astype(bool), (b, s))
    )
    x = inputs_embeds
    hidden_states = [x]
    block = remat_block(
      lambda layer, x, cos, sin, valid, rows: layer(x, cos, sin, valid, rows, attention),
      self.remat,
    )
    for i, layer in enumerate(self.layers[:num_layers]):
      rows = output_rows if i == num_layers - 1 else None
      x = block(layer, x, cos, sin, key_valid, rows)
      hidden_states.append(x)
    if output_rows is not None and num_layers == 0:
      x = take_rows(x, output_rows)
    if num_layers == len(self.layers):
      x = self.norm(x)
      hidden_states[-1] = x
    return x, (tuple(hidden_states) if output_hidden_states else ())


class Qwen2ForCausalLM(nnx.Module):
  def __init__(self, cfg: Qwen2Config, *, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    self.config = cfg
    self.model = Qwen2Model(cfg, dtype=dtype, remat=remat, rngs=rngs)
    # Tied checkpoints have no lm_head: logits use the embedding matrix transposed.
    self.lm_head = (
      None
      if cfg.tie_word_embeddings
      else Dense(
        cfg.hidden_size,
        cfg.vocab_size,
        axes=("embed", "vocab"),
        use_bias=False,
        dtype=dtype,
        rngs=rngs,
      )
    )

  def embed(self, input_ids):
    return self.model.embed_tokens(input_ids)

  def logits(self, hidden):
    if self.lm_head is None:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(
    self,
    input_ids=None,
    *,
    inputs_embeds=None,
    attention_mask=None,
    position_ids=None,
    output_hidden_states=False,
    attention=None,
  ):
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    hidden, all_hidden = self.model(
      inputs_embeds,
      attention_mask=attention_mask,
      position_ids=position_ids,
      output_hidden_states=output_hidden_states,
      attention=attention,
    )
    return self.logits(hidden), all_hidden
