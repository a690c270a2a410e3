"""SigLIP vision tower (SiglipVisionModel without its pooling head) in Flax NNX.

Module tree follows transformers' `vision_model.*`: embeddings.{patch_embedding,
position_embedding}, encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.{fc1, fc2}}, post_layernorm. Images are NHWC, already normalised to [-1, 1].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from frameselect_jax.models.attention import dot_product_attention
from frameselect_jax.models.layers import ACTIVATIONS, Dense, Embed, LayerNorm, normal_init, param


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
  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
    self.q_proj = Dense(d, d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.k_proj = Dense(d, d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.v_proj = Dense(d, d, axes=("vision_embed", "vision_heads"), dtype=dtype, rngs=rngs)
    self.out_proj = Dense(d, d, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, s, d = x.shape
    split = lambda t: t.reshape(b, s, self.num_heads, self.head_dim)
    mask = jnp.ones((1, 1, s, s), dtype=bool)  # bidirectional
    out = dot_product_attention(
      split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask
    )
    return self.out_proj(out.reshape(b, s, d))


class SiglipMLP(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
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
    return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    eps, d = cfg.layer_norm_eps, cfg.hidden_size
    self.layer_norm1 = LayerNorm(d, eps=eps, dtype=dtype)
    self.self_attn = SiglipAttention(cfg, dtype=dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(d, eps=eps, dtype=dtype)
    self.mlp = SiglipMLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs):
    self.layers = nnx.List(
      [SiglipEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
    )


class SiglipVisionModel(nnx.Module):
  """images (b, H, W, C) in [-1, 1] -> last hidden state (b, grid*grid, D) after post_layernorm."""

  def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.remat = remat
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
    for layer in self.encoder.layers:
      x = nnx.remat(lambda layer, x: layer(x))(layer, x) if self.remat else layer(x)
    return self.post_layernorm(x)


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
