"""SigLIP in Flax NNX: the vision tower, its attention-pooling head, the text tower and the
image-text pair (transformers' SiglipModel).

The selector uses `SiglipVisionModel`: the vision tower without its pooling head (patch
tokens, pooled to g x g by the selector). `SiglipVisionModelWithHead` adds the head, and
`SiglipModel` pairs it with `SiglipTextModel` for image-text similarity.

Module trees follow transformers' names. Vision (`vision_model.*`): embeddings.{patch_embedding,
position_embedding}, encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.{fc1, fc2}}, post_layernorm, and with the head head.{probe, attention.{in_proj, out_proj},
layernorm, mlp.{fc1, fc2}} (in_proj is torch MultiheadAttention's packed in_proj_weight /
in_proj_bias, q | k | v). Text (`text_model.*`): embeddings.{token_embedding,
position_embedding}, the same encoder layers, final_layer_norm, head. Images are NHWC, already
normalised to [-1, 1]. Both towers' encoder parameters carry the vision_* logical axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from frameselect_jax.models.attention import dot_product_attention
from frameselect_jax.models.layers import (
  ACTIVATIONS,
  Dense,
  Embed,
  LayerNorm,
  normal_init,
  param,
  remat_block,
  remat_policy_name,
)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 384
  patch_size: int = 14
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  def validate(self):
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} not divisible by "
        f"num_attention_heads {self.num_attention_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    return self


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
  """transformers' SiglipTextConfig; the defaults are so400m-patch14-384's text tower."""

  vocab_size: int = 32000
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  max_position_embeddings: int = 64
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  projection_size: int | None = None  # the head's output width; None: hidden_size (as HF)

  def __post_init__(self):
    if self.projection_size is None:
      object.__setattr__(self, "projection_size", self.hidden_size)

  def validate(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"text hidden_size {self.hidden_size} not divisible by "
        f"num_attention_heads {self.num_attention_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    return self


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """transformers' SiglipConfig: a vision and a text tower whose embeddings are compared."""

  vision: SiglipVisionConfig = SiglipVisionConfig()
  text: SiglipTextConfig = SiglipTextConfig()

  def validate(self):
    self.vision.validate()
    self.text.validate()
    if self.text.projection_size != self.vision.hidden_size:
      raise ValueError(
        f"text projection_size {self.text.projection_size} differs from the vision "
        f"hidden_size {self.vision.hidden_size}: image and text embeddings cannot be compared"
      )
    return self


class PatchEmbedding(nnx.Module):
  """A stride-p, kernel-p convolution written as a matmul over flattened patches.

  kernel is (p, p, C, D): Hugging Face's Conv2d weight (D, C, p, p) permuted.
  """

  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    self.patch_size, self.dtype = p, dtype
    self.kernel = param(normal_init(rngs, (p, p, c, d)), (None, None, None, "vision_embed"))
    self.bias = param(jnp.zeros((d,)), ("vision_embed",))

  def __call__(self, images):
    p = self.patch_size
    # Like a stride-p VALID conv: trailing pixels that do not fill a patch are dropped
    # (so400m: 384 = 27 * 14 + 6).
    images = images[:, : images.shape[1] // p * p, : images.shape[2] // p * p]
    b, h, w, c = images.shape
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
    kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    return patches @ kernel + self.bias[...].astype(self.dtype)


class SiglipVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    self.patch_embedding = PatchEmbedding(cfg, dtype=dtype, rngs=rngs)
    num_patches = cfg.grid_size**2
    self.position_embedding = Embed(
      num_patches, cfg.hidden_size, axes=(None, "vision_embed"), dtype=dtype, rngs=rngs
    )

  def __call__(self, images):
    x = self.patch_embedding(images)
    return x + self.position_embedding.embedding[...].astype(x.dtype)


class SiglipAttention(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig | SiglipTextConfig, *, dtype, rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
    self.q_proj = Dense(d, d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.k_proj = Dense(d, d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.v_proj = Dense(d, d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.out_proj = Dense(d, d, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    """mask: bool broadcastable to (b, 1, s, s); None attends everywhere (bidirectional)."""
    b, s, d = x.shape
    split = lambda t: t.reshape(b, s, self.num_heads, self.head_dim)
    if mask is None:
      mask = jnp.ones((1, 1, s, s), dtype=bool)
    q, k, v = (
      checkpoint_name(p(x), n)
      for p, n in ((self.q_proj, "q"), (self.k_proj, "k"), (self.v_proj, "v"))
    )
    out = dot_product_attention(split(q), split(k), split(v), mask)
    return checkpoint_name(
      self.out_proj(checkpoint_name(out.reshape(b, s, d), "context")), "attn_out"
    )


class SiglipMLP(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig | SiglipTextConfig, *, dtype, rngs):
    self.act = ACTIVATIONS[cfg.hidden_act]
    self.fc1 = Dense(
      cfg.hidden_size,
      cfg.intermediate_size,
      axes=("vision_embed", "vision_mlp"),
      dtype=dtype,
      rngs=rngs,
    )
    self.fc2 = Dense(
      cfg.intermediate_size,
      cfg.hidden_size,
      axes=("vision_mlp", "vision_embed"),
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, x):
    return checkpoint_name(self.fc2(self.act(checkpoint_name(self.fc1(x), "up"))), "mlp_out")


class SiglipEncoderLayer(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig | SiglipTextConfig, *, dtype, rngs):
    eps, d = cfg.layer_norm_eps, cfg.hidden_size
    self.layer_norm1 = LayerNorm(d, eps=eps, dtype=dtype)
    self.self_attn = SiglipAttention(cfg, dtype=dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(d, eps=eps, dtype=dtype)
    self.mlp = SiglipMLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig | SiglipTextConfig, *, dtype, rngs):
    self.layers = nnx.List(
      [SiglipEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
    )


class SiglipVisionModel(nnx.Module):
  """images (b, H, W, C) in [-1, 1] -> last hidden state (b, grid*grid, D) after post_layernorm."""

  def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.remat = remat_policy_name(remat)
    self.embeddings = SiglipVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.encoder = SiglipEncoder(cfg, dtype=dtype, rngs=rngs)
    self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

  def __call__(self, images):
    size = self.config.image_size
    if images.shape[1:] != (size, size, self.config.num_channels):
      raise ValueError(
        f"expected images (batch, {size}, {size}, {self.config.num_channels}), got {images.shape}"
      )
    x = self.embeddings(images)
    block = remat_block(lambda layer, x: layer(x), self.remat)
    for layer in self.encoder.layers:
      x = block(layer, x)
    return self.post_layernorm(x)


class SiglipPoolingAttention(nnx.Module):
  """torch.nn.MultiheadAttention as the pooling head uses it (batch first, no dropout).

  in_proj packs the q, k and v projections (kernel (D, 3D) = HF's in_proj_weight transposed).
  """

  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
    self.in_proj = Dense(d, 3 * d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.out_proj = Dense(d, d, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs)

  def __call__(self, query, x):
    """query (b, s, D) attends over x (b, t, D)."""
    (b, s, d), t = query.shape, x.shape[1]
    q = self.in_proj(query)[..., :d].reshape(b, s, self.num_heads, self.head_dim)
    k, v = jnp.split(self.in_proj(x)[..., d:], 2, axis=-1)
    split = lambda u: u.reshape(b, t, self.num_heads, self.head_dim)
    out = dot_product_attention(q, split(k), split(v), jnp.ones((1, 1, s, t), dtype=bool))
    return self.out_proj(out.reshape(b, s, d))


class SiglipMultiheadAttentionPoolingHead(nnx.Module):
  """A learned probe attends over the patch tokens; then a residual MLP: (b, t, D) -> (b, D)."""

  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    self.dtype = dtype
    self.probe = param(normal_init(rngs, (1, 1, cfg.hidden_size)), (None, None, "vision_embed"))
    self.attention = SiglipPoolingAttention(cfg, dtype=dtype, rngs=rngs)
    self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
    self.mlp = SiglipMLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], 1, x.shape[2]))
    x = self.attention(probe, x)
    x = x + self.mlp(self.layernorm(x))
    return x[:, 0]


class SiglipVisionModelWithHead(SiglipVisionModel):
  """The vision tower with its attention-pooling head (HF's vision_use_head=True).

  Calling it gives the last hidden state, as SiglipVisionModel does; `pooled` gives HF's
  pooler_output (what SiglipModel.get_image_features returns)."""

  def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    super().__init__(cfg, dtype=dtype, remat=remat, rngs=rngs)
    self.head = SiglipMultiheadAttentionPoolingHead(cfg, dtype=dtype, rngs=rngs)

  def pooled(self, images):
    """images (b, H, W, C) in [-1, 1] -> (b, D), not normalised."""
    return self.head(self(images))


class SiglipTextEmbeddings(nnx.Module):
  def __init__(self, cfg: SiglipTextConfig, *, dtype, rngs):
    self.max_positions = cfg.max_position_embeddings
    self.token_embedding = Embed(
      cfg.vocab_size, cfg.hidden_size, axes=("vocab", "vision_embed"), dtype=dtype, rngs=rngs
    )
    self.position_embedding = Embed(
      cfg.max_position_embeddings,
      cfg.hidden_size,
      axes=(None, "vision_embed"),
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, ids):
    s = ids.shape[1]
    if s > self.max_positions:
      raise ValueError(
        f"text of {s} tokens is longer than max_position_embeddings {self.max_positions}"
      )
    x = self.token_embedding(ids)
    return x + self.position_embedding.embedding[:s].astype(x.dtype)


class SiglipTextModel(nnx.Module):
  """transformers' SiglipTextModel: token ids (b, s) -> last hidden state (b, s, D) after
  final_layer_norm; `pooled` is HF's pooler_output: the LAST position's state through `head`
  (SigLIP's tokenizer pads to max_length, so that position may be padding, as in HF).

  attention_mask (b, s), 1 for real tokens, hides padded keys as HF's bidirectional mask does;
  SigLIP was trained without one (None)."""

  def __init__(self, cfg: SiglipTextConfig, *, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.remat = remat_policy_name(remat)
    self.embeddings = SiglipTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.encoder = SiglipEncoder(cfg, dtype=dtype, rngs=rngs)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
    self.head = Dense(
      cfg.hidden_size, cfg.projection_size, axes=("vision_embed", None), dtype=dtype, rngs=rngs
    )

  def __call__(self, ids, attention_mask=None):
    if ids.ndim != 2:
      raise ValueError(f"expected token ids (batch, length), got shape {ids.shape}")
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    x = self.embeddings(ids)
    block = remat_block(lambda layer, x, mask: layer(x, mask), self.remat)
    for layer in self.encoder.layers:
      x = block(layer, x, mask)
    return self.final_layer_norm(x)

  def pooled(self, ids, attention_mask=None):
    """(b, projection_size), not normalised."""
    return self.head(self(ids, attention_mask)[:, -1])


def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class SiglipModel(nnx.Module):
  """transformers' SiglipModel: vision_model (with its head), text_model, logit_scale, logit_bias.

  image_embeds and text_embeds are the towers' pooled outputs, not normalised (HF's
  get_image_features / get_text_features); the logits compare their L2-normalised forms:
  logits[i, j] = <img_i, txt_j> * exp(logit_scale) + logit_bias, and sigmoid(logits) is
  SigLIP's probability that text j matches image i."""

  def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.vision_model = SiglipVisionModelWithHead(cfg.vision, dtype=dtype, remat=remat, rngs=rngs)
    self.text_model = SiglipTextModel(cfg.text, dtype=dtype, remat=remat, rngs=rngs)
    # The SigLIP paper's initialisation: temperature 10, bias -10.
    self.logit_scale = param(jnp.full((1,), math.log(10.0)), (None,))
    self.logit_bias = param(jnp.full((1,), -10.0), (None,))

  def image_embeds(self, pixels):
    """pixels (b, H, W, C) in [-1, 1] -> (b, D)."""
    return self.vision_model.pooled(pixels)

  def text_embeds(self, ids, attention_mask=None):
    """token ids (b, s) -> (b, D)."""
    return self.text_model.pooled(ids, attention_mask)

  def logits(self, image_embeds, text_embeds):
    """(n_images, D), (n_texts, D) embeddings -> (n_images, n_texts) logits, float32."""
    sims = jnp.matmul(
      _l2_normalize(image_embeds), _l2_normalize(text_embeds).T, precision=jax.lax.Precision.HIGHEST
    )
    return sims * jnp.exp(self.logit_scale[...][0]) + self.logit_bias[...][0]

  def logits_per_image(self, pixels, ids, attention_mask=None):
    """(n_images, n_texts): HF SiglipModel(...).logits_per_image."""
    return self.logits(self.image_embeds(pixels), self.text_embeds(ids, attention_mask))


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging matrix with exactly torch adaptive_avg_pool windows:
  window i covers [floor(i*in/out), ceil((i+1)*in/out))."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(tokens, grid: int, out_grid: int):
  """Pools (b, grid*grid, D) patch tokens to (b, out_grid*out_grid, D), row-major like torch."""
  if out_grid > grid:
    raise ValueError(
      f"pooling grid {out_grid}x{out_grid} is larger than the patch grid {grid}x{grid}"
    )
  b, n, d = tokens.shape
  if n != grid * grid:
    raise ValueError(f"expected {grid * grid} tokens for a {grid}x{grid} grid, got {n}")
  pool = jnp.asarray(adaptive_pool_matrix(grid, out_grid))
  x = tokens.reshape(b, grid, grid, d).astype(jnp.float32)
  pooled = jnp.einsum("ih,bhwd,jw->bijd", pool, x, pool, precision="highest")
  return pooled.reshape(b, out_grid * out_grid, d).astype(tokens.dtype)
