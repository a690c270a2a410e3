"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU host.

  python -m train.compile --config=configs/stage2.py --topology=v5e:4x4

Needs libtpu installed (`pip install -e .[tpu]`), no TPU. Builds the same jitted step as
the trainer (same shardings, donation, remat) over abstract arrays, compiles it for the
topology, and prints per device: argument, output, aliased and temporary memory; FLOPs per
step (analytic, and the compiler's count); and step-time estimates. Exits 1 when the step
does not fit the chip's HBM, naming the numbers.

What the numbers are (DESIGN.md explains why the compiler's own estimate is not used):
  model FLOPs      the useful work per step, counted analytically from the config: forward
                   of every block that runs (attention: the causal triangle), plus backward
                   to activations everywhere the gradient flows, plus weight gradients of the
                   trainable matmuls only
  hardware FLOPs   what the implementation computes: attention's blocked upper corners, and
                   the forward recomputation that remat adds
  compute bound    hardware FLOPs per chip / the chip's published peak bf16 FLOP/s
  memory bound     HBM bytes read and written per chip / the chip's published HBM bandwidth.
                   Counted from the compiled program's buffer placement (hbm_bytes_accessed):
                   the compiler's own "bytes accessed" also counts operands held in on-chip
                   VMEM, which at small per-chip batches is most of them
  ICI bound        analytic bytes per chip of the gradient all-reduce, the FSDP all-gathers and
                   the tensor-parallel all-reduces / the chip's published ICI bandwidth
  estimated step   max of the three bounds (a roofline: perfect overlap, no other stalls)
  implied MFU      model FLOPs / (estimated step x chips x peak)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

# We only compile, never run on a TPU: let several processes load libtpu at once (otherwise
# a second process fails on libtpu's lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1.")
flags.DEFINE_string("json_out", None, "Also write the report as JSON to this file.")

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float     # FLOP/s per chip (published)
  hbm_bytes: float           # HBM capacity usable by a program
  hbm_bytes_per_s: float     # HBM bandwidth
  ici_bytes_per_s: float     # inter-chip interconnect bandwidth per chip


# Published per-chip figures (cloud.google.com/tpu/docs/<version>).
CHIPS = {
    "TPU v5 lite": Chip("v5e", 197e12, 15.75 * GIB, 819e9, 1600e9 / 8),
    "TPU v5": Chip("v5p", 459e12, 95 * GIB, 2765e9, 4800e9 / 8),
    "TPU v4": Chip("v4", 275e12, 32 * GIB, 1228e9, 2400e9 / 8),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GIB, 1640e9, 3584e9 / 8),
}


def topology_devices(name: str):
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(name, "tpu").devices
  except Exception as e:  # libtpu missing, or an unknown topology name
    raise SystemExit(f"cannot describe TPU topology {name!r}: {e}\n(is libtpu installed? "
                     f"pip install -e .[tpu])") from None


# --- Analytic FLOPs ---

def _dense_flops(in_features, out_features):
  return 2 * in_features * out_features


def attention_pairs(seq_len, attention="xla"):
  """(query, key) pairs per sequence: (causally needed, computed by the implementation).

  XLA (models/layers.py) computes causal attention in query blocks that see keys up to the
  block's end; the flash kernel skips whole 128 x 128 blocks above the diagonal of the
  sequence padded to a multiple of 128."""
  import inspect
  from frameselect_jax import tpu_attention
  from frameselect_jax.models import layers
  needed = seq_len * (seq_len + 1) // 2
  if attention == "flash":
    blocks = -(-seq_len // tpu_attention.BLOCK)
    return needed, blocks * (blocks + 1) // 2 * tpu_attention.BLOCK ** 2
  block = inspect.signature(layers.dot_product_attention).parameters["block_size"].default
  if seq_len <= block:
    return needed, seq_len * seq_len
  computed = sum((min(start + block, seq_len) - start) * min(start + block, seq_len)
                 for start in range(0, seq_len, block))
  return needed, computed


def llm_block_flops(llm, lora_rank=0, keys_values_only=False):
  """(frozen matmul, trainable LoRA matmul) forward FLOPs per token of one block, and the
  attention FLOPs per (query, key) pair. keys_values_only: the K and V projections alone
  (what a block computes for the tokens whose output nothing reads)."""
  d, hd = llm.hidden_size, llm.head_dim
  q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
  shapes = [(d, kv), (d, kv)]
  if not keys_values_only:
    shapes += [(d, q), (q, d), (d, llm.intermediate_size), (d, llm.intermediate_size),
               (llm.intermediate_size, d)]
  frozen = sum(_dense_flops(i, o) for i, o in shapes)
  lora = sum(_dense_flops(i, lora_rank) + _dense_flops(lora_rank, o) for i, o in shapes) \
      if lora_rank else 0
  per_pair = 2 * 2 * q  # scores and weighted values
  return frozen, lora, per_pair


def vision_tower_flops(vision, frames):
  """Forward FLOPs of the vision tower on `frames` frames: patch embedding, projections, MLP
  and attention of every block."""
  tokens = vision.grid_size ** 2
  per_token = vision.num_hidden_layers * (
      4 * _dense_flops(vision.hidden_size, vision.hidden_size)
      + 2 * _dense_flops(vision.hidden_size, vision.intermediate_size)
      + 2 * 2 * tokens * vision.hidden_size) \
      + _dense_flops(vision.patch_size ** 2 * 3, vision.hidden_size)
  return frames * tokens * per_token


def step_flops(config, selector_cfg, task, cached, attention="xla"):
  """(model FLOPs, hardware FLOPs) of one optimizer step over the global batch."""
  llm, vision = selector_cfg.llm, selector_cfg.vision
  batch = config.data.global_batch_size
  visual_tokens = selector_cfg.num_visual_tokens
  lora_rank = config.lora.rank if config.stage == 2 else 0
  if task == "importance":  # blocks before the penultimate's; that one is counted below
    seq, blocks, lm_head_tokens = visual_tokens + config.data.max_question_length + 1, \
        max(llm.num_hidden_layers - 2, 0), 0
  else:
    seq, blocks, lm_head_tokens = visual_tokens + config.data.max_instruction_length, \
        llm.num_hidden_layers, config.data.max_instruction_length
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
  if task == "importance" and llm.num_hidden_layers >= 2:
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
  proj_fwd = visual_tokens * (_dense_flops(vision.hidden_size, llm.hidden_size)
                              + _dense_flops(llm.hidden_size, llm.hidden_size))
  head_fwd = lm_head_tokens * _dense_flops(llm.hidden_size, llm.vocab_size)
  score_fwd = (_dense_flops(llm.hidden_size, llm.hidden_size)
               + _dense_flops(llm.hidden_size, selector_cfg.num_candidates))
  other = 3 * proj_fwd + 2 * head_fwd + 3 * score_fwd
  model = block_fwd + block_bwd + other
  hardware = block_fwd_hw + block_bwd_hw + other + (block_fwd_hw if config.model.remat else 0)
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
  passes = 3 if config.model.remat else 2
  gradients = 2 * (replicas - 1) / replicas * trainable_bytes  # ring all-reduce
  gather = params_bytes * (fsdp - 1) / max(fsdp, 1) / tensor * passes + gradients
  if tensor == 1:
    return gather
  llm = selector_cfg.llm
  seq = selector_cfg.num_visual_tokens + (config.data.max_question_length + 1 if task == "importance"
                                          else config.data.max_instruction_length)
  local_batch = config.data.global_batch_size / (mesh.shape["data"] * fsdp)
  activation = local_batch * seq * llm.hidden_size * 2  # bf16
  # ring all-reduce moves 2 (t-1)/t of the buffer; 2 per block per pass
  reduce = 2 * (tensor - 1) / tensor * activation * 2 * llm.num_hidden_layers * passes
  return gather + reduce


# --- HBM traffic of a compiled program ---

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Ops that move no data of their own (metadata, tuples, aliases); async *-start ops are
# counted at their *-done.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
               "partition-id", "replica-id", "opt-barrier"}


def _buffers(type_text: str):
  """[(bytes, memory space)] of every array in an HLO type; space 0 is HBM, S(1) VMEM."""
  buffers = []
  for dtype, dims, layout in _SHAPE.findall(type_text):
    size = _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    space = re.search(r"S\((\d+)\)", layout or "")
    buffers.append((size, int(space.group(1)) if space else 0))
  return buffers


def _hbm_size(type_text: str) -> float:
  return sum(size for size, space in _buffers(type_text) if space == 0)


def hbm_bytes_accessed(hlo_text: str) -> float | None:
  """Bytes one run of a compiled TPU program reads from and writes to HBM.

  The compiler's "bytes accessed" adds up every operand and output of every op, wherever the
  buffer lives. After memory-space assignment most activations of a small per-chip batch live
  in on-chip VMEM (layout `S(1)`), and weights stream in by async copies and slices, so that
  sum overstates HBM traffic many times. This counts, from the scheduled HLO text, only
  buffers in HBM (no memory-space annotation): operands and outputs of each op, the HBM side
  of async copies, the slice (not the whole source) of async slices, and the update (not the
  whole buffer) of in-place dynamic-update-slice fusions. Loops count their trip count,
  conditionals their largest branch. Other partial reads of an HBM operand inside a fusion
  count the whole operand, so this errs high. None when a loop's trip count is unknown.
  """
  computations, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      header = re.match(r"^(ENTRY )?%?([\w.\-]+)", line)
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current and line.startswith("  "):
      match = _INSTRUCTION.match(line.strip())
      if match:
        name, typ, op, rest = match.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        computations[current].append((name, typ, op, operands, line))
  instructions = {i[0]: i for body in computations.values() for i in body}
  roots = {c: next((i for i in body if i[4].lstrip().startswith("ROOT")), body[-1])
           for c, body in computations.items() if body}

  def through_copies(name):
    while instructions[name][2] in ("copy", "bitcast"):
      name = instructions[name][3][0]
    return instructions[name]

  def constant(name):
    value = re.search(r" constant\((-?\d+)\)", through_copies(name)[4])
    return int(value.group(1)) if value else None

  def tuple_index(name):
    index = re.search(r"index=(\d+)", through_copies(name)[4])
    return int(index.group(1)) if index else None

  def trip_count(while_line, init_tuple):
    """The loop's trip count: annotated by the compiler, or read off the common shape
    `for (i = a; i < b; i += c)` of its condition, initial tuple and body; None otherwise."""
    known = _TRIP_COUNT.search(while_line)
    if known:
      return int(known.group(1))
    try:
      return counted_loop_trips(while_line, init_tuple)
    except (KeyError, IndexError, AttributeError, ValueError):  # another shape of loop
      return None

  def counted_loop_trips(while_line, init_tuple):
    compare = roots[re.search(r"condition=%?([\w.\-]+)", while_line).group(1)]
    if compare[2] != "compare" or "direction=LT" not in compare[4]:
      return None
    index, bound = tuple_index(compare[3][0]), constant(compare[3][1])
    init = instructions[init_tuple]
    if index is None or bound is None or init[2] != "tuple":
      return None
    first = constant(init[3][index])
    body_root = roots[re.search(r"body=%?([\w.\-]+)", while_line).group(1)]
    step = through_copies(body_root[3][index]) if body_root[2] == "tuple" else None
    if first is None or step is None or step[2] != "add":
      return None
    counter, increment = step[3][0], constant(step[3][1])
    if tuple_index(counter) != index or not increment:
      return None
    return max(0, -(-(bound - first) // increment))

  def hbm(name):
    return _hbm_size(instructions[name][1]) if name in instructions else 0

  def op_traffic(typ, operands):
    """Every operand and output in HBM, read or written once."""
    return _hbm_size(typ) + sum(hbm(o) for o in operands)

  def fusion_traffic(typ, operands, line):
    """As op_traffic, but an in-place dynamic-update-slice writes only its update."""
    fused = roots.get(re.search(r"calls=%?([\w.\-]+)", line).group(1))
    if fused and fused[2] == "dynamic-update-slice" and len(_buffers(typ)) == 1:
      in_place = re.search(r"parameter\((\d+)\)", through_copies(fused[3][0])[4])
      if in_place:
        skip = int(in_place.group(1))
        update = _buffers(instructions[fused[3][1]][1])[0][0]
        return (update if _hbm_size(typ) else 0) + sum(
            hbm(o) for k, o in enumerate(operands) if k != skip)
    return op_traffic(typ, operands)

  def traffic(computation):
    total = 0.0
    for name, typ, op, operands, line in computations[computation]:
      if op in _NO_TRAFFIC or op.endswith("-start"):
        continue
      if op == "while":
        trips = trip_count(line, operands[0])
        step = traffic(re.search(r"body=%?([\w.\-]+)", line).group(1))
        if trips is None or step is None:
          return None
        total += trips * step
      elif op == "conditional":
        branches = re.findall(r"%([\w.\-]+)", re.search(
            r"(?:branch_computations=\{([^}]*)\}|true_computation=.*)", line).group(0))
        costs = [traffic(b) for b in branches if b in computations]
        if any(c is None for c in costs):
          return None
        total += max(costs, default=0.0)
      elif op == "call":
        step = traffic(re.search(r"to_apply=%?([\w.\-]+)", line).group(1))
        if step is None:
          return None
        total += step
      elif op in ("slice-done", "copy-done"):
        # The start op's type is (source, destination, context): source and destination
        # on HBM each move the destination's size (a slice reads only what it copies).
        start = _buffers(instructions[operands[0]][1])
        moved = start[1][0]
        total += moved * ((start[0][1] == 0) + (start[1][1] == 0))
      elif op == "fusion":
        total += fusion_traffic(typ, operands, line)
      else:
        total += op_traffic(typ, operands)
    return total

  return traffic(entry)


# --- Compile ---

def compile_report(config, topology: str) -> dict:
  from train import modeling, trainer
  from train import step as step_lib

  devices = topology_devices(topology)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise SystemExit(f"no published figures for device kind {kind!r}; known: {sorted(CHIPS)}")
  chip = CHIPS[kind]
  selector_cfg, ratio = trainer.check_config(config, runtime=False)
  mesh = trainer.make_mesh(config, devices)
  trainer.check_batch(config, mesh, process_count=1)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  cached = bool(config.data.cache_visual_tokens)
  spec = trainer.example_spec(config, selector_cfg)

  graphdef, params, frozen, param_shardings, frozen_shardings = modeling.prepare_abstract(
      config, mesh, rules)
  vision_abstract = None
  if cached:
    vision_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   frozen["vision_tower"])
    frozen = {k: v for k, v in frozen.items() if k != "vision_tower"}
    frozen_shardings = {k: v for k, v in frozen_shardings.items() if k != "vision_tower"}
  tx, _ = step_lib.make_optimizer(config.train, max(config.train.num_steps, 1000))
  opt_shardings = step_lib.opt_state_shardings(tx, params, param_shardings, mesh)
  opt_state = modeling.abstract_of(jax.eval_shape(tx.init, params), opt_shardings)
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, frozen)))

  report = {"topology": topology, "chip": chip.name, "chips": len(devices),
            "mesh": dict(mesh.shape), "global_batch": config.data.global_batch_size,
            "llm": config.model.llm, "vision": config.model.vision,
            "frames": selector_cfg.num_candidates, "tokens_per_frame": selector_cfg.tokens_per_frame,
            "cached_visual_tokens": cached, "remat": config.model.remat,
            "trainable_params": modeling.count_params(params),
            "frozen_params": modeling.count_params(frozen), "tasks": {}}
  attention = step_lib.attention_for(config, mesh, "tpu")
  report["attention"] = "flash" if attention is not None else "xla"
  for task in [t for t, count in zip(step_lib.TASKS, ratio) if count]:
    fields = step_lib.step_fields(task, cached)
    batch_shardings = step_lib.batch_shardings(mesh, spec, fields)
    shapes = spec.shapes(cached)
    batch = {f: jax.ShapeDtypeStruct((config.data.global_batch_size,) + shapes[f][0],
                                     shapes[f][1], sharding=batch_shardings[f]) for f in fields}
    jitted = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, task=task,
                                 accum_steps=config.train.grad_accum_steps,
                                 vision_abstract=vision_abstract, mesh=mesh, attention=attention),
        param_shardings=param_shardings, frozen_shardings=frozen_shardings,
        opt_shardings=opt_shardings, batch_shardings=batch_shardings, mesh=mesh)
    start = time.perf_counter()
    try:
      compiled = jitted.lower(params, frozen, opt_state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The TPU compiler refuses programs that cannot fit; its message has the numbers.
      report["tasks"][task] = {"fits": False, "hbm_bytes": chip.hbm_bytes,
                               "compile_error": str(e).strip().splitlines()[0]}
      continue
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model_flops, hardware_flops = step_flops(config, selector_cfg, task, cached,
                                             report["attention"])
    chips = len(devices)
    per_device_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    compute_s = hardware_flops / chips / chip.peak_bf16_flops
    compiler_bytes = float(cost.get("bytes accessed", 0.0))
    hbm_traffic = hbm_bytes_accessed(compiled.as_text())
    memory_s = (compiler_bytes if hbm_traffic is None else hbm_traffic) / chip.hbm_bytes_per_s
    ici_s = ici_bytes_per_chip(config, selector_cfg, task, mesh, params_bytes,
                               4 * modeling.count_params(params)) / chip.ici_bytes_per_s
    step_s = max(compute_s, memory_s, ici_s)
    report["tasks"][task] = {
        "compile_s": compile_s,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "total_bytes": per_device_bytes,
        "hbm_bytes": chip.hbm_bytes,
        "fits": per_device_bytes <= chip.hbm_bytes,
        "model_flops": model_flops,
        "hardware_flops": hardware_flops,
        "compiler_flops_per_device": float(cost.get("flops", 0.0)),
        "compiler_bytes_accessed_per_device": compiler_bytes,
        "hbm_traffic_per_device": hbm_traffic,
        "compiler_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
        "compute_bound_s": compute_s, "memory_bound_s": memory_s, "ici_bound_s": ici_s,
        "estimated_step_s": step_s,
        "implied_mfu": model_flops / (step_s * chips * chip.peak_bf16_flops),
    }
  return report


def format_report(report: dict) -> str:
  lines = [f"{report['topology']} ({report['chips']} x {report['chip']}), mesh {report['mesh']}, "
           f"global batch {report['global_batch']}, {report['llm']} + {report['vision']}, "
           f"{report['frames']} frames x {report['tokens_per_frame']} tokens, cached visual "
           f"tokens {report['cached_visual_tokens']}, remat {report['remat']}, "
           f"{report['attention']} attention, "
           f"{report['trainable_params']:,} trainable / {report['frozen_params']:,} frozen params"]
  for task, r in report["tasks"].items():
    gib = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 4 else f"{b / 2**20:.1f} MiB"
    if "compile_error" in r:
      lines.append(f"  {task} step: DOES NOT FIT; the compiler says: {r['compile_error']}")
      continue
    opt = r["compiler_optimal_seconds"]
    decimal = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"
    compiler = decimal(r["compiler_bytes_accessed_per_device"])
    memory_source = (
        f"compiler's {compiler} accessed: the program has a loop of unknown length"
        if r["hbm_traffic_per_device"] is None else
        f"{decimal(r['hbm_traffic_per_device'])} of HBM traffic; the compiler's "
        f"{compiler} accessed counts on-chip VMEM too")
    lines += [
        f"  {task} step (compiled in {r['compile_s']:.0f} s), per device:",
        f"    memory: arguments {gib(r['argument_bytes'])}, outputs {gib(r['output_bytes'])}, "
        f"aliased (donated) {gib(r['alias_bytes'])}, temporaries {gib(r['temp_bytes'])}; "
        f"total {gib(r['total_bytes'])} of {gib(r['hbm_bytes'])} HBM -> "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"    FLOPs per step: model {r['model_flops']:.3e}, hardware (with remat) "
        f"{r['hardware_flops']:.3e}; compiler's count {r['compiler_flops_per_device']:.3e} "
        f"per device ({r['compiler_flops_per_device'] * report['chips']:.3e} in all)",
        f"    step time: compute bound {r['compute_bound_s'] * 1e3:.1f} ms, memory bound "
        f"{r['memory_bound_s'] * 1e3:.1f} ms ({memory_source}), "
        f"ICI bound {r['ici_bound_s'] * 1e3:.1f} ms -> estimated "
        f"{r['estimated_step_s'] * 1e3:.1f} ms; compiler's optimal_seconds "
        f"{opt:.3g}{' (negative: meaningless)' if opt < 0 else ''}",
        f"    implied model-FLOPs utilisation {100 * r['implied_mfu']:.1f}%",
    ]
  return "\n".join(lines)


def main(argv):
  del argv
  if not flags.FLAGS.topology:
    raise app.UsageError("--topology is required, e.g. --topology=v5e:4x4")
  from train.trainer import ConfigError
  try:
    report = compile_report(flags.FLAGS.config, flags.FLAGS.topology)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(report))
  if flags.FLAGS.json_out:
    with open(flags.FLAGS.json_out, "w") as f:
      json.dump(report, f, indent=2)
  too_big = [(t, r) for t, r in report["tasks"].items() if not r["fits"]]
  if too_big:
    for task, r in too_big:
      if "compile_error" in r:
        print(f"error: the {task} step does not fit the {r['hbm_bytes'] / GIB:.2f} GiB HBM of a "
              f"{report['chip']} chip: {r['compile_error']}", file=sys.stderr)
        continue
      print(f"error: the {task} step needs {r['total_bytes'] / GIB:.2f} GiB per device "
            f"(arguments {r['argument_bytes'] / GIB:.2f} + outputs {r['output_bytes'] / GIB:.2f} "
            f"- aliased {r['alias_bytes'] / GIB:.2f} + temporaries {r['temp_bytes'] / GIB:.2f}), "
            f"more than the {r['hbm_bytes'] / GIB:.2f} GiB HBM of a {report['chip']} chip",
            file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
