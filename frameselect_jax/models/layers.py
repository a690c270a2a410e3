"""Building blocks shared by the vision tower, the LLM and the selector (attention kernels
are in `attention.py`).

Every parameter is created through `param`, which records its logical axis names
(`out_sharding` metadata); `frameselect_jax.sharding` maps those names onto a mesh.
Parameters are stored in float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Activation checkpointing of each transformer block (`remat`), by what the backward keeps
# (the blocks name their activations with jax.ad_checkpoint.checkpoint_name):
#   none            everything (no recomputation)
#   block           only the block's input: the whole block is recomputed
#   save_attn_mlp   the block's input and its attention and MLP outputs
#   save_projections  the outputs of every projection (q, k, v, attention context, o,
#                   gate, up, down): only norms, rope, activations and the attention
#                   kernel are recomputed
REMAT_POLICIES = ("none", "block", "save_attn_mlp", "save_projections")
PROJECTION_NAMES = ("q", "k", "v", "context", "attn_out", "gate", "up", "mlp_out")


def remat_policy_name(remat) -> str:
  """model.remat -> one of REMAT_POLICIES (True and False, from older configs, are block and
  none)."""
  if isinstance(remat, bool):
    return "block" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} not in {REMAT_POLICIES}")
  return remat


def remat_block(fn: Callable, remat: str) -> Callable:
  """fn(layer, *args) checkpointed as `remat` says (REMAT_POLICIES)."""
  if remat == "none":
    return fn
  if remat == "block":
    return nnx.remat(fn)
  names = ("attn_out", "mlp_out") if remat == "save_attn_mlp" else PROJECTION_NAMES
  return nnx.remat(fn, policy=jax.checkpoint_policies.save_only_these_names(*names))


def param(value, axes, kind=nnx.Param):
  """A variable carrying logical axis names, sharded later (not eagerly) by the rules table."""
  assert len(axes) == value.ndim, (axes, value.shape)
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


def normal_init(rngs: nnx.Rngs, shape, stddev=0.02):
  return stddev * jax.random.normal(rngs.params(), shape, jnp.float32)


class Dense(nnx.Module):
  """y = x @ kernel + bias, with an optional LoRA adapter (added by `add_lora`).

  kernel is (in, out): the transpose of a Hugging Face nn.Linear weight.
  """

  def __init__(
    self, in_features, out_features, *, axes, use_bias=True, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.in_features, self.out_features = in_features, out_features
    self.axes = tuple(axes)
    self.dtype = dtype
    self.kernel = param(normal_init(rngs, (in_features, out_features)), axes)
    self.bias = param(jnp.zeros((out_features,)), axes[1:]) if use_bias else None
    self.lora_a = nnx.data(None)  # data, not static: add_lora may fill them later
    self.lora_b = nnx.data(None)
    self.lora_scale = 0.0

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      # Adapters stay in fp32: their updates are small relative to the base kernel.
      delta = (x.astype(jnp.float32) @ self.lora_a[...]) @ self.lora_b[...]
      y = y + (self.lora_scale * delta).astype(y.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table (num_embeddings, features); `attend` gives tied output logits."""

  def __init__(
    self, num_embeddings, features, *, axes=("vocab", "embed"), dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.dtype = dtype
    self.embedding = param(normal_init(rngs, (num_embeddings, features)), axes)

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x):
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """Qwen2 RMSNorm, computed in float32 (as transformers does) then cast back."""

  def __init__(self, features, *, eps=1e-6, axes=("norm",), dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.weight = param(jnp.ones((features,)), axes)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...] * x32).astype(self.dtype)


class LayerNorm(nnx.Module):
  """SigLIP LayerNorm with weight and bias, statistics in float32."""

  def __init__(self, features, *, eps=1e-6, axes=("norm",), dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.weight = param(jnp.ones((features,)), axes)
    self.bias = param(jnp.zeros((features,)), axes)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {
  "gelu_pytorch_tanh": gelu_tanh,
  "gelu_new": gelu_tanh,
  "gelu": gelu_exact,
  "silu": jax.nn.silu,
}


# --- Rotary position embeddings (rotate-half layout, as in transformers' Qwen2) ---


def rope_cos_sin(positions, head_dim, theta):
  """cos/sin tables of shape positions.shape + (head_dim,), angles computed in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def take_rows(x, rows, axis=1):
  """x[i, rows[i]] for each example i, keeping the axis (size 1): rows (b,) int."""
  index = rows.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, index, axis=axis)


# --- LoRA ---


def iter_dense(module: nnx.Module):
  """(dotted path, Dense) for every Dense in the module tree, in tree order."""
  for path, sub in nnx.iter_modules(module):
    if isinstance(sub, Dense):
      yield ".".join(str(p) for p in path), sub


def add_lora(
  module: nnx.Module, pattern: str, *, rank: int, alpha: float, rngs: nnx.Rngs
) -> list[str]:
  """Adds LoRA adapters to every Dense whose dotted path matches `pattern` (re.search).

  A is (in, rank) with Kaiming-uniform-like init, B is (rank, out) zeros, so an
  untrained adapter changes nothing. The update is scaled by alpha / rank.
  Returns the adapted paths; raises if the pattern matches no Dense.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  regex = re.compile(pattern)
  adapted = []
  for path, dense in iter_dense(module):
    if not regex.search(path):
      continue
    if dense.lora_a is not None:
      raise ValueError(f"{path} already has a LoRA adapter")
    bound = 1.0 / math.sqrt(dense.in_features)
    a = jax.random.uniform(rngs.params(), (dense.in_features, rank), jnp.float32, -bound, bound)
    dense.lora_a = param(a, (dense.axes[0], "lora_rank"), kind=nnx.LoRAParam)
    dense.lora_b = param(
      jnp.zeros((rank, dense.out_features)), ("lora_rank", dense.axes[1]), kind=nnx.LoRAParam
    )
    dense.lora_scale = alpha / rank
    adapted.append(path)
  if not adapted:
    paths = [p for p, _ in iter_dense(module)]
    raise ValueError(
      f"LoRA pattern {pattern!r} matched no Dense module; some available paths: {paths[:8]}"
    )
  return adapted


def lora_delta(dense: Dense):
  """What an adapter adds to its Dense's kernel: (alpha / rank) * A @ B, in float32."""
  return dense.lora_scale * (dense.lora_a[...] @ dense.lora_b[...])


def merge_lora(module: nnx.Module) -> int:
  """Folds every adapter into its base kernel (for inference) and removes it. Returns the count."""
  merged = 0
  for _, dense in iter_dense(module):
    if dense.lora_a is None:
      continue
    dense.kernel[...] = dense.kernel[...] + lora_delta(dense).astype(dense.kernel.dtype)
    dense.lora_a, dense.lora_b, dense.lora_scale = None, None, 0.0
    merged += 1
  return merged
