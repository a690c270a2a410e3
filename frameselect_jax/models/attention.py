"""Attention kernels: XLA's grouped-query attention, its causal form, and the Pallas TPU
flash kernel behind the same interface.

A causal attention is any `fn(q, k, v, key_valid) -> out` with q (b, s, h, d), k and v
(b, s, kv_heads, d) and key_valid bool (b, s): every query sees the valid keys at or before
its position. The model takes one as an explicit argument (`attention=`, None for
`causal_attention`); `causal_attention_for` picks it from a config.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

CausalAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# XLA's causal attention processes queries in blocks of this many.
CAUSAL_BLOCK = 256
# The flash kernel's block size: sequences are padded to a multiple of it.
FLASH_BLOCK = 128
BATCH_AXES = ("data", "fsdp")


def dot_product_attention(q, k, v, mask):
  """q: (b, s, h, d); k, v: (b, t, kv_heads, d); mask: bool broadcastable to (b, 1, s, t).

  Grouped-query attention without materialising repeated K/V: the query heads of each KV
  head are folded into the query axis, so each KV head is one plain batched matmul (the
  layout XLA's CPU and TPU dots like best). Softmax in float32.
  """
  b, s, h, d = q.shape
  kv_heads = k.shape[2]
  group = h // kv_heads
  q = (
    q.reshape(b, s, kv_heads, group, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, group * s, d)
  )
  logits = jnp.einsum("bkqd,btkd->bkqt", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(d)
  mask = jnp.broadcast_to(mask, (mask.shape[0], 1, s, k.shape[1]))
  mask = jnp.tile(mask[:, 0], (1, group, 1))[:, None]  # (b|1, 1, group * s, t)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqt,btkd->bkqd", weights, v)
  return out.reshape(b, kv_heads, group, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def causal_mask(seq_len, key_valid=None):
  """Boolean (b|1, 1, s, s): causal, and keys where key_valid (b, s) is False hidden."""
  mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
  if key_valid is not None:
    mask = mask & key_valid.astype(bool)[:, None, None, :]
  return mask


def causal_attention(q, k, v, key_valid, *, block_size: int = CAUSAL_BLOCK):
  """Causal attention in XLA. Queries are processed in blocks that only see keys up to the
  block's end: the skipped keys are masked anyway, so the result is the same while the work
  and the logits' memory roughly halve for long sequences."""
  s = q.shape[1]
  mask = causal_mask(s, key_valid)
  if s <= block_size:
    return dot_product_attention(q, k, v, mask)
  mask = jnp.broadcast_to(mask, (mask.shape[0], 1, s, s))
  outs = []
  for start in range(0, s, block_size):
    end = min(start + block_size, s)
    outs.append(
      dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, :, start:end, :end])
    )
  return jnp.concatenate(outs, axis=1)


def attention_pairs(seq_len: int, kernel: str = "xla") -> tuple[int, int]:
  """(query, key) pairs per sequence: (causally needed, computed by the kernel).

  XLA's causal attention computes query blocks against keys up to the block's end; the
  flash kernel skips whole blocks above the diagonal of the sequence padded to its block."""
  needed = seq_len * (seq_len + 1) // 2
  if kernel == "flash":
    blocks = -(-seq_len // FLASH_BLOCK)
    return needed, blocks * (blocks + 1) // 2 * FLASH_BLOCK**2
  if seq_len <= CAUSAL_BLOCK:
    return needed, seq_len * seq_len
  computed = sum(
    (min(start + CAUSAL_BLOCK, seq_len) - start) * min(start + CAUSAL_BLOCK, seq_len)
    for start in range(0, seq_len, CAUSAL_BLOCK)
  )
  return needed, computed


# --- The Pallas TPU flash kernel ---
#
# XLA's attention writes the float32 scores of every (query, key) pair to HBM and reads them
# back several times; at 1249 tokens that traffic, not the FLOPs, bounds the train step. The
# flash kernel keeps the scores on chip.
#
# Semantics: the kernel takes segment ids instead of a mask. Valid positions form one segment
# and padded ones another, so valid queries see exactly the valid keys before them (as in
# `causal_attention`). Padded queries see padded keys (rather than valid ones), which changes
# only the hidden states of padded positions; nothing valid attends to those, so every output
# the model reads is the same.
#
# The kernel runs per device inside a shard_map: the batch over (data, fsdp), query heads
# over tensor (KV heads stay whole, as the sharding rules replicate them). Each device slices
# the KV heads of its query heads and repeats them to one per query head. `reference=True`
# swaps the kernel for the same computation in plain JAX, so the wrapper is tested on CPU.


def _reference_kernel(q, k, v, segment_ids, sm_scale):
  """What the flash kernel computes, in plain JAX: (b, h, s, d) layout, causal + segments."""
  s = q.shape[2]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  mask = same & jnp.tril(jnp.ones((s, s), bool))[None]
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def flash_attention(mesh, *, reference: bool = False) -> CausalAttention:
  """A causal attention running the Pallas TPU flash kernel on every device of `mesh`."""
  tensor = mesh.shape.get("tensor", 1)

  def per_device(q, k, v, key_valid):
    b, s, heads, d = q.shape
    group = heads * tensor // k.shape[2]
    # The global index of each local query head picks its KV head.
    first = jax.lax.axis_index("tensor") * heads if tensor > 1 else 0
    if heads % group == 0 or group % heads == 0:
      # The local heads cover whole groups, or sit inside one: slice those KV heads and
      # repeat them. (A gather here compiles to hundreds of small loops on TPU v5p.)
      count = max(heads // group, 1)
      k, v = (
        jnp.repeat(
          jax.lax.dynamic_slice_in_dim(x, first // group, count, axis=2), heads // count, axis=2
        )
        for x in (k, v)
      )
    else:
      # Local heads straddle groups: only a gather pairs them with their KV heads.
      kv_index = (first + jnp.arange(heads)) // group
      k, v = jnp.take(k, kv_index, axis=2), jnp.take(v, kv_index, axis=2)
    pad = (-s) % FLASH_BLOCK
    layout = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    # Segments: valid 1, padded 0, the block padding 2 (its own, so it never mixes in).
    segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=2)
    scale = 1.0 / math.sqrt(d)
    if reference:
      out = _reference_kernel(layout(q), layout(k), layout(v), segments, scale)
    else:
      from jax.experimental.pallas.ops.tpu import flash_attention as kernel

      out = kernel.flash_attention(
        layout(q),
        layout(k),
        layout(v),
        segment_ids=kernel.SegmentIds(q=segments, kv=segments),
        causal=True,
        sm_scale=scale,
      )
    return out.transpose(0, 2, 1, 3)[:, :s]

  def attention(q, k, v, key_valid):
    key_valid = jnp.broadcast_to(key_valid.astype(bool), (q.shape[0], k.shape[1]))
    heads = P(BATCH_AXES, None, "tensor", None)
    whole = P(BATCH_AXES, None, None, None)
    return jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(heads, whole, whole, P(BATCH_AXES, None)),
      out_specs=heads,
      check_vma=False,
    )(q, k, v, key_valid)

  return attention


def attention_kernel(choice: str, platform: str) -> str:
  """ "flash" or "xla": the causal attention kernel a config's `model.attention` = xla | flash |
  auto picks on `platform` (auto: the flash kernel when compiling for TPU, XLA's elsewhere)."""
  if choice not in ("auto", "xla", "flash"):
    raise ValueError(f"model.attention must be auto, xla or flash, got {choice!r}")
  if choice == "flash" or (choice == "auto" and platform == "tpu"):
    if platform != "tpu":
      raise ValueError(f"model.attention='flash' is a TPU kernel; this step targets {platform}")
    return "flash"
  return "xla"


def causal_attention_for(choice: str, mesh, platform: str) -> CausalAttention | None:
  """The causal attention of a config's `model.attention` (`attention_kernel`) over `mesh`.
  None means `causal_attention`."""
  if attention_kernel(choice, platform) == "flash":
    return flash_attention(mesh)
  return None
