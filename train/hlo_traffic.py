"""HBM traffic of a compiled TPU program, counted from its scheduled HLO text.

The compiler's own "bytes accessed" adds up every operand of every op wherever its buffer
lives; at small per-chip batches memory-space assignment keeps most activations in on-chip
VMEM (layout S(1)), so that number is mostly not HBM traffic. `hbm_bytes_accessed` counts
only what crosses HBM (see its docstring for the rules).
"""

from __future__ import annotations

import math
import re

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Ops that move no data of their own (metadata, tuples, aliases); async *-start ops are
# counted at their *-done.
_NO_TRAFFIC = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}


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
  roots = {
    c: next((i for i in body if i[4].lstrip().startswith("ROOT")), body[-1])
    for c, body in computations.items()
    if body
  }

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
          hbm(o) for k, o in enumerate(operands) if k != skip
        )
    return op_traffic(typ, operands)

  def traffic(computation):
    total = 0.0
    for _name, typ, op, operands, line in computations[computation]:
      if op in _NO_TRAFFIC or op.endswith("-start"):
        continue
      if op == "while":
        trips = trip_count(line, operands[0])
        step = traffic(re.search(r"body=%?([\w.\-]+)", line).group(1))
        if trips is None or step is None:
          return None
        total += trips * step
      elif op == "conditional":
        branches = re.findall(
          r"%([\w.\-]+)",
          re.search(r"(?:branch_computations=\{([^}]*)\}|true_computation=.*)", line).group(0),
        )
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
