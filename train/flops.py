"""Analytic costs of one train step: FLOPs (the useful work, and what the implementation
computes) and the bytes of its collectives. Counted from the config alone, no compilation;
the AOT report (`train/aot.py`) and the benchmarks use them.
"""

from __future__ import annotations

from frameselect_jax.models.attention import attention_pairs
from frameselect_jax.models.layers import remat_policy_name


def _dense_flops(in_features, out_features):
  return 2 * in_features * out_features


def llm_block_flops(llm, lora_rank=0, keys_values_only=False):
  """(frozen matmul, trainable LoRA matmul) forward FLOPs per token of one block, and the
  attention FLOPs per (query, key) pair. keys_values_only: the K and V projections alone
  (what a block computes for the tokens whose output nothing reads)."""
  d, hd = llm.hidden_size, llm.head_dim
  q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
  shapes = [(d, kv), (d, kv)]
  if not keys_values_only:
    shapes += [
      (d, q),
      (q, d),
      (d, llm.intermediate_size),
      (d, llm.intermediate_size),
      (llm.intermediate_size, d),
    ]
  frozen = sum(_dense_flops(i, o) for i, o in shapes)
  lora = (
    sum(_dense_flops(i, lora_rank) + _dense_flops(lora_rank, o) for i, o in shapes)
    if lora_rank
    else 0
  )
  per_pair = 2 * 2 * q  # scores and weighted values
  return frozen, lora, per_pair


def vision_tower_flops(vision, frames):
  """Forward FLOPs of the vision tower on `frames` frames: patch embedding, projections, MLP
  and attention of every block."""
  tokens = vision.grid_size**2
  per_token = vision.num_hidden_layers * (
    4 * _dense_flops(vision.hidden_size, vision.hidden_size)
    + 2 * _dense_flops(vision.hidden_size, vision.intermediate_size)
    + 2 * 2 * tokens * vision.hidden_size
  ) + _dense_flops(vision.patch_size**2 * 3, vision.hidden_size)
  return frames * tokens * per_token


def step_flops(config, selector_cfg, task, cached, attention="xla"):
  """(model FLOPs, hardware FLOPs) of one optimizer step over the global batch."""
  llm, vision = selector_cfg.llm, selector_cfg.vision
  batch = config.data.global_batch_size
  visual_tokens = selector_cfg.num_visual_tokens
  lora_rank = config.lora.rank if config.stage == 2 else 0
  query_row_only = selector_cfg.score_head == "query_mlp"
  if task == "importance":
    # Every block before the last that runs; with the paper's head that last one computes the
    # query's row alone (counted below), with the frame head every row.
    seq, lm_head_tokens = visual_tokens + config.data.max_question_length + 1, 0
    blocks = max(llm.num_hidden_layers - (2 if query_row_only else 1), 0)
  else:
    seq, blocks, lm_head_tokens = (
      visual_tokens + config.data.max_instruction_length,
      llm.num_hidden_layers,
      config.data.max_instruction_length,
    )
  frozen, lora, per_pair = llm_block_flops(llm, lora_rank)
  needed_pairs, computed_pairs = attention_pairs(seq, attention)
  # The flash backward recomputes the scores in both of its kernels: 7 pair-matmuls, 3.5x
  # the forward's 2, where XLA's backward does 4 (2x).
  bwd_pair_factor = 3.5 if attention == "flash" else 2
  # Blocks: forward; backward to activations (frozen matmuls 1x, attention 2x); weight
  # gradients of LoRA (trainable: 2x forward in all). Model FLOPs count the causal triangle
  # of attention; hardware FLOPs what the blocked implementation computes.
  matmul_fwd = seq * blocks * (frozen + lora)
  matmul_bwd = seq * blocks * (frozen + 2 * lora)
  block_fwd = matmul_fwd + blocks * per_pair * needed_pairs
  block_bwd = matmul_bwd + 2 * blocks * per_pair * needed_pairs
  block_fwd_hw = matmul_fwd + blocks * per_pair * computed_pairs
  block_bwd_hw = matmul_bwd + bwd_pair_factor * blocks * per_pair * computed_pairs
  if task == "importance" and query_row_only and llm.num_hidden_layers >= 2:
    # The last block that runs computes the score query's row alone (XLA attention, one
    # row of seq keys), plus K and V for every token.
    kv_frozen, kv_lora, _ = llm_block_flops(llm, lora_rank, keys_values_only=True)
    row_fwd = (frozen - kv_frozen + lora - kv_lora) + per_pair * seq
    row_bwd = (frozen - kv_frozen + 2 * (lora - kv_lora)) + 2 * per_pair * seq
    kv_fwd, kv_bwd = seq * (kv_frozen + kv_lora), seq * (kv_frozen + 2 * kv_lora)
    block_fwd += kv_fwd + row_fwd
    block_bwd += kv_bwd + row_bwd
    block_fwd_hw += kv_fwd + row_fwd
    block_bwd_hw += kv_bwd + row_bwd
  # Projector (trainable) on visual tokens; LM head (frozen, tied) on the text positions;
  # score head once per example.
  proj_fwd = visual_tokens * (
    _dense_flops(vision.hidden_size, llm.hidden_size)
    + _dense_flops(llm.hidden_size, llm.hidden_size)
  )
  head_fwd = lm_head_tokens * _dense_flops(llm.hidden_size, llm.vocab_size)
  n, d = selector_cfg.num_candidates, llm.hidden_size
  if query_row_only:
    score_fwd = _dense_flops(d, d) + _dense_flops(d, n)
  else:  # both projections, then one dot product per frame
    score_fwd = (n + 1) * _dense_flops(d, d) + 2 * n * d
  other = 3 * proj_fwd + 2 * head_fwd + 3 * score_fwd
  model = block_fwd + block_bwd + other
  remat = remat_policy_name(config.model.remat)
  if remat == "block":
    recompute = block_fwd_hw
  elif remat == "save_attn_mlp":  # all but the o and down projections run again
    d, q = llm.hidden_size, llm.num_attention_heads * llm.head_dim
    kept = _dense_flops(q, d) + _dense_flops(llm.intermediate_size, d)
    if lora_rank:
      kept += _dense_flops(q, lora_rank) + _dense_flops(lora_rank, d)
      kept += _dense_flops(llm.intermediate_size, lora_rank) + _dense_flops(lora_rank, d)
    recompute = block_fwd_hw - seq * blocks * kept
  elif remat == "save_projections":  # only the attention kernel runs again
    recompute = blocks * per_pair * computed_pairs
  else:
    recompute = 0
  hardware = block_fwd_hw + block_bwd_hw + other + recompute
  if not cached:  # frozen ViT forward on every candidate frame (no backward)
    vit = vision_tower_flops(vision, selector_cfg.num_candidates)
    model, hardware = model + vit, hardware + vit
  return model * batch, hardware * batch


def ici_bytes_per_chip(config, selector_cfg, task, mesh, params_bytes, trainable_bytes):
  """Analytic per-chip bytes of the collectives: the all-reduce of the trainables' gradients
  over the batch axes; FSDP all-gathers of every weight for the forward, the remat recompute
  and the backward; tensor-parallel all-reduces of the attention and MLP outputs."""
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  replicas = mesh.shape["data"] * fsdp
  # The policies that recompute projections gather their weights a third time.
  passes = 3 if remat_policy_name(config.model.remat) in ("block", "save_attn_mlp") else 2
  gradients = 2 * (replicas - 1) / replicas * trainable_bytes  # ring all-reduce
  gather = params_bytes * (fsdp - 1) / max(fsdp, 1) / tensor * passes + gradients
  if tensor == 1:
    return gather
  llm = selector_cfg.llm
  seq = selector_cfg.num_visual_tokens + (
    config.data.max_question_length + 1
    if task == "importance"
    else config.data.max_instruction_length
  )
  local_batch = config.data.global_batch_size / (mesh.shape["data"] * fsdp)
  activation = local_batch * seq * llm.hidden_size * 2  # bf16
  # ring all-reduce moves 2 (t-1)/t of the buffer; 2 per block per pass
  reduce = 2 * (tensor - 1) / tensor * activation * 2 * llm.num_hidden_layers * passes
  return gather + reduce
