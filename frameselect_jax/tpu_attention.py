"""Causal attention through jax's Pallas TPU flash-attention kernel, for training on TPU.

XLA's attention (models/layers.py) writes the float32 scores of every (query, key) pair to
HBM and reads them back several times; at 1249 tokens that traffic, not the FLOPs, bounds the
train step. The flash kernel keeps the scores on chip. Use it while tracing:

  with layers.attention_implementation(flash_attention(mesh)):
    loss = ...

Semantics. The model's mask is causal and hides padded keys; the kernel takes segment ids
instead: valid positions form one segment and padded ones another, so valid queries see
exactly the valid keys before them (as in the XLA path). Padded queries see padded keys
(rather than valid ones), which changes only the hidden states of padded positions; nothing
valid attends to those, so every output the model reads is the same.

The kernel runs per device inside a shard_map: the batch over (data, fsdp), query heads
over tensor (KV heads stay whole, as the sharding rules replicate them); each device gathers
the KV head of each of its query heads. `reference=True` swaps the kernel for the same
computation in plain JAX, so the wrapper can be tested on CPU.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the kernel's block size: sequences are padded to a multiple of it
BATCH_AXES = ("data", "fsdp")


def _reference_kernel(q, k, v, segment_ids, sm_scale):
  """What the flash kernel computes, in plain JAX: (b, h, s, d) layout, causal + segments."""
  s = q.shape[2]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  mask = same & jnp.tril(jnp.ones((s, s), bool))[None]
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def flash_attention(mesh, *, reference: bool = False):
  """attention(q, k, v, mask) for `layers.attention_implementation`.

  q: (b, s, h, d); k, v: (b, s, kv_heads, d); mask: the model's causal (b|1, 1, s, s) mask.
  """
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
      k, v = (jnp.repeat(jax.lax.dynamic_slice_in_dim(x, first // group, count, axis=2),
                         heads // count, axis=2) for x in (k, v))
    else:
      kv_index = (first + jnp.arange(heads)) // group
      k, v = jnp.take(k, kv_index, axis=2), jnp.take(v, kv_index, axis=2)
    pad = (-s) % BLOCK
    layout = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    # Segments: valid 1, padded 0, the block padding 2 (its own, so it never mixes in).
    segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=2)
    scale = 1.0 / math.sqrt(d)
    if reference:
      out = _reference_kernel(layout(q), layout(k), layout(v), segments, scale)
    else:
      from jax.experimental.pallas.ops.tpu import flash_attention as kernel
      out = kernel.flash_attention(layout(q), layout(k), layout(v),
                                   segment_ids=kernel.SegmentIds(q=segments, kv=segments),
                                   causal=True, sm_scale=scale)
    return out.transpose(0, 2, 1, 3)[:, :s]

  def attention(q, k, v, mask):
    # Keys visible to the last query: with a causal mask, exactly the valid keys.
    key_valid = jnp.broadcast_to(mask[:, 0, -1, :], (q.shape[0], k.shape[1]))
    heads = P(BATCH_AXES, None, "tensor", None)
    whole = P(BATCH_AXES, None, None, None)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(heads, whole, whole, P(BATCH_AXES, None)),
                         out_specs=heads, check_vma=False)(q, k, v, key_valid)

  return attention
