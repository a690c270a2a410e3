"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU host, and
its report. `python -m train.compile` (train/compile.py) is the command around it.

Needs libtpu installed (`pip install -e .[tpu]`), no TPU. Builds the same jitted step as
the trainer (same shardings, donation, remat) over abstract arrays, compiles it for the
topology, and reports per device: argument, output, aliased and temporary memory; FLOPs per
step (analytic, and the compiler's count); and step-time estimates.

What the numbers are (the compiler's own optimal_seconds is printed but not used: on TPU it
came back negative):
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
import functools
import glob
import hashlib
import json
import os
import re
import time

import jax

from frameselect_jax import errors
from frameselect_jax.models import attention as attention_lib
from train.flops import ici_bytes_per_chip, step_flops
from train.hlo_traffic import hbm_bytes_accessed

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float  # FLOP/s per chip (published)
  hbm_bytes: float  # HBM capacity usable by a program
  hbm_bytes_per_s: float  # HBM bandwidth
  ici_bytes_per_s: float  # inter-chip interconnect bandwidth per chip


# Published per-chip figures (cloud.google.com/tpu/docs/<version>).
CHIPS = {
  "TPU v5 lite": Chip("v5e", 197e12, 15.75 * GIB, 819e9, 1600e9 / 8),
  "TPU v5": Chip("v5p", 459e12, 95 * GIB, 2765e9, 4800e9 / 8),
  "TPU v4": Chip("v4", 275e12, 32 * GIB, 1228e9, 2400e9 / 8),
  "TPU v6 lite": Chip("v6e", 918e12, 32 * GIB, 1640e9, 3584e9 / 8),
}


TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x1, v4:2x2x1, v6e:2x2"


def check_topology_name(name: str) -> None:
  """<chip>:<AxB[xC]> with a chip whose figures CHIPS publishes; else InputError naming the
  known chips (before libtpu is loaded: its own errors are long and blame the install)."""
  known = sorted(chip.name for chip in CHIPS.values())
  chip, _, shape = (name or "").partition(":")
  if chip not in known:
    raise errors.InputError(
      f"--topology={name}: unknown chip {chip!r}; known: {', '.join(known)} "
      f"(e.g. {TOPOLOGY_EXAMPLES})"
    )
  if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*){1,2}", shape):
    raise errors.InputError(
      f"--topology={name}: the chip grid must look like 2x2 or 2x2x1, got {shape!r} "
      f"(e.g. {TOPOLOGY_EXAMPLES})"
    )


def topology_devices(name: str):
  check_topology_name(name)
  # We only compile, never run on a TPU: let several processes load libtpu at once
  # (otherwise a second process fails on libtpu's lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
  except ImportError as e:
    raise errors.InputError(f"cannot compile for TPUs here: {e}") from None
  try:
    return topologies.get_topology_desc(name, "tpu").devices
  except Exception as e:  # libtpu missing, or a grid this chip cannot have
    hint = "is libtpu installed? pip install -e .[tpu]"
    if "Unable to initialize backend" not in str(e) and "libtpu" not in str(e).lower():
      hint = f"known grids look like {TOPOLOGY_EXAMPLES}"
    raise errors.InputError(
      f"--topology={name}: libtpu cannot describe it ({errors.one_line(e)}; {hint})"
    ) from None


def chip_of(devices, topology: str) -> Chip:
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise errors.InputError(
      f"--topology={topology}: no published figures for device kind {kind!r}; "
      f"known: {sorted(CHIPS)}"
    )
  return CHIPS[kind]


def compute_ceiling(config, topology: str) -> float:
  """Examples/s that no mesh and no batch can pass on `topology` with the config's model and
  remat policy: the roofline's compute bound alone, chips x peak FLOP/s over the hardware FLOPs
  of one example (in stage 1, its two tasks' step times averaged with the task ratio's
  weights, as the plan averages them). Analytic: nothing is compiled. A point's roofline
  step time is at least its compute bound, so its examples/s are at most this."""
  from train import step as step_lib
  from train import trainer

  devices = topology_devices(topology)
  chip = chip_of(devices, topology)
  selector_cfg, ratio = trainer.check_config(config, runtime=False)
  kernel = attention_lib.attention_kernel(config.model.attention, "tpu")
  cached = bool(config.data.cache_visual_tokens)
  weights = {task: count for task, count in zip(step_lib.TASKS, ratio) if count}
  hardware_flops = sum(
    count * step_flops(config, selector_cfg, task, cached, kernel)[1]
    for task, count in weights.items()
  ) / sum(weights.values())
  step_s = hardware_flops / len(devices) / chip.peak_bf16_flops
  return config.data.global_batch_size / step_s


def compile_report(config, topology: str, cache_dir: str | None = None) -> dict:
  """The report of the config's train step(s) compiled for `topology`. With `cache_dir`, the
  compiler's figures of each step are read from there when that program was compiled before
  (`compiler_figures`), and written there when it was not; and when this config was lowered
  before by the same code (`lowering_key`, under cache_dir/lowered), its figures are found
  without lowering the step again."""
  from train import modeling, trainer
  from train import step as step_lib

  devices = topology_devices(topology)
  chip = chip_of(devices, topology)
  selector_cfg, ratio = trainer.check_config(config, runtime=False)
  mesh = trainer.make_mesh(config, devices)
  trainer.check_batch(config, mesh, process_count=1)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  cached = bool(config.data.cache_visual_tokens)
  spec = trainer.example_spec(config, selector_cfg)

  graphdef, params, frozen, param_shardings, frozen_shardings = modeling.prepare_abstract(
    config, mesh, rules
  )
  vision_abstract = None
  if cached:
    vision_abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen["vision_tower"]
    )
    frozen = {k: v for k, v in frozen.items() if k != "vision_tower"}
    frozen_shardings = {k: v for k, v in frozen_shardings.items() if k != "vision_tower"}
  tx, _ = step_lib.make_optimizer(config.train, max(config.train.num_steps, 1000))
  opt_shardings = step_lib.opt_state_shardings(tx, params, param_shardings, mesh)
  opt_state = modeling.abstract_of(jax.eval_shape(tx.init, params), opt_shardings)
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, frozen)))

  report = {
    "topology": topology,
    "chip": chip.name,
    "chips": len(devices),
    "mesh": dict(mesh.shape),
    "global_batch": config.data.global_batch_size,
    "llm": config.model.llm,
    "vision": config.model.vision,
    "frames": selector_cfg.num_candidates,
    "tokens_per_frame": selector_cfg.tokens_per_frame,
    "cached_visual_tokens": cached,
    "remat": config.model.remat,
    "trainable_params": modeling.count_params(params),
    "frozen_params": modeling.count_params(frozen),
    "tasks": {},
  }
  attention = attention_lib.causal_attention_for(config.model.attention, mesh, "tpu")
  report["attention"] = attention_lib.attention_kernel(config.model.attention, "tpu")
  # task -> program_key of this config's lowering with this code (`lowering_key`)
  memo_path, programs = None, {}
  if cache_dir:
    memo_path = os.path.join(cache_dir, "lowered", lowering_key(config, topology) + ".json")
    if os.path.exists(memo_path):
      with open(memo_path) as f:
        programs = json.load(f)
  programs_read = dict(programs)
  for task in [t for t, count in zip(step_lib.TASKS, ratio) if count]:
    fields = step_lib.step_fields(task, cached)
    batch_shardings = step_lib.batch_shardings(mesh, spec, fields)
    shapes = spec.shapes(cached)
    batch = {
      f: jax.ShapeDtypeStruct(
        (config.data.global_batch_size,) + shapes[f][0], shapes[f][1], sharding=batch_shardings[f]
      )
      for f in fields
    }
    jitted = step_lib.jit_train_step(
      step_lib.make_train_step(
        graphdef,
        tx,
        task=task,
        accum_steps=config.train.grad_accum_steps,
        vision_abstract=vision_abstract,
        mesh=mesh,
        attention=attention,
        importance_loss=step_lib.ImportanceLoss.from_config(config.train),
      ),
      param_shardings=param_shardings,
      frozen_shardings=frozen_shardings,
      opt_shardings=opt_shardings,
      batch_shardings=batch_shardings,
      mesh=mesh,
    )
    figures = cached_figures(cache_dir, programs.get(task))
    if figures is None:
      figures = compiler_figures(
        jitted.lower(params, frozen, opt_state, batch), topology, cache_dir
      )
      programs[task] = figures["program_key"]
    if "compile_error" in figures:
      report["tasks"][task] = {"fits": False, "hbm_bytes": chip.hbm_bytes, **figures}
      continue
    model_flops, hardware_flops = step_flops(
      config, selector_cfg, task, cached, report["attention"]
    )
    chips = len(devices)
    per_device_bytes = (
      figures["argument_bytes"]
      + figures["output_bytes"]
      - figures["alias_bytes"]
      + figures["temp_bytes"]
    )
    compute_s = hardware_flops / chips / chip.peak_bf16_flops
    compiler_bytes = figures["compiler_bytes_accessed_per_device"]
    hbm_traffic = figures["hbm_traffic_per_device"]
    memory_s = (compiler_bytes if hbm_traffic is None else hbm_traffic) / chip.hbm_bytes_per_s
    ici_s = (
      ici_bytes_per_chip(
        config, selector_cfg, task, mesh, params_bytes, 4 * modeling.count_params(params)
      )
      / chip.ici_bytes_per_s
    )
    step_s = max(compute_s, memory_s, ici_s)
    report["tasks"][task] = {
      **figures,
      "total_bytes": per_device_bytes,
      "hbm_bytes": chip.hbm_bytes,
      "fits": per_device_bytes <= chip.hbm_bytes,
      "model_flops": model_flops,
      "hardware_flops": hardware_flops,
      "compute_bound_s": compute_s,
      "memory_bound_s": memory_s,
      "ici_bound_s": ici_s,
      "estimated_step_s": step_s,
      "implied_mfu": model_flops / (step_s * chips * chip.peak_bf16_flops),
    }
  if memo_path and programs != programs_read:
    os.makedirs(os.path.dirname(memo_path), exist_ok=True)
    errors.write_atomically(memo_path, json.dumps(programs, indent=1, sort_keys=True))
  return report


def versions() -> dict:
  """The versions that decide what a compile produces, besides the program itself."""
  import importlib.metadata

  out = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}
  try:
    out["libtpu"] = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    out["libtpu"] = None
  return out


# A Pallas kernel (the flash attention) is embedded as base64 MLIR bytecode that names the
# source file it came from, under this environment's site-packages; the path's length is
# in the bytecode too, so it cannot be masked out.
_KERNEL_BODY = re.compile(r"(\\22body\\22: \\22)([A-Za-z0-9+/=]+)(\\22)")


def portable_program_text(text: str) -> str:
  """The lowered program's text without the embedded kernels' bytecode, so two checkouts
  with their own virtual environments get one key for one program. What stays tells the
  kernels apart: their names, operand shapes and cost estimates; the bytecode itself is
  jax's (its version is in the key) for the shapes it is called with."""
  return _KERNEL_BODY.sub(lambda m: m.group(1) + "<kernel>" + m.group(3), text)


def program_key(lowered, topology: str) -> str:
  """SHA-256 of what determines a compile: the lowered program (every shape, sharding, remat
  and donation is in its text), the topology it is compiled for, the versions of jax, jaxlib
  and libtpu, and the compiler flags set in the environment. A change to the model code that
  leaves the program as it was keeps the key; any change that alters it makes a new one."""
  digest = hashlib.sha256(portable_program_text(lowered.as_text()).encode())
  flags = {name: os.environ.get(name, "") for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
  digest.update(json.dumps({"topology": topology, **versions(), **flags}, sort_keys=True).encode())
  return digest.hexdigest()[:32]


# Besides jax, jaxlib and libtpu (`versions`), the packages that trace a config into a step.
_TRACING_PACKAGES = ("flax", "optax", "numpy", "ml_dtypes")


# train/ modules that only choose configs and report: what they decide reaches the program
# through the config, which lowering_key holds, so editing them keeps the memos.
_NOT_TRACED = ("compile.py", "plan.py")


@functools.cache
def source_fingerprint() -> str:
  """SHA-256 of the Python source that turns a config into a train step: the library
  (frameselect_jax) and train/, less `_NOT_TRACED`."""
  import frameselect_jax

  digest = hashlib.sha256()
  for package in (os.path.dirname(frameselect_jax.__file__), os.path.dirname(__file__)):
    root = os.path.dirname(package)
    for path in sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)):
      if package == os.path.dirname(__file__) and os.path.basename(path) in _NOT_TRACED:
        continue
      digest.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def lowering_key(config, topology: str) -> str:
  """SHA-256 of what decides the programs a config lowers to: the config, the topology, this
  code (`source_fingerprint`), the versions of the packages that trace and lower it, and the
  compiler flags. `compile_report` remembers the program_key of each step it lowered under
  this key, so a rerun with the same config and code neither traces nor lowers the step
  again (a real-size step takes about 10 s to lower) to find its figures in the cache."""
  import importlib.metadata

  packages = {name: importlib.metadata.version(name) for name in _TRACING_PACKAGES}
  flags = {name: os.environ.get(name, "") for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
  what = {
    "config": json.loads(config.to_json_best_effort(sort_keys=True)),
    "topology": topology,
    "source": source_fingerprint(),
    **versions(),
    **packages,
    **flags,
  }
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def cached_figures(cache_dir: str | None, key: str | None) -> dict | None:
  """The figures of program `key` in `cache_dir`, or None when they are not there."""
  path = key and cache_dir and os.path.join(cache_dir, key + ".json")
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return {**json.load(f), "cached": True, "program_key": key}


def compiler_figures(lowered, topology: str, cache_dir: str | None = None) -> dict:
  """What only the compiler knows about one step: its memory per device, its FLOP and byte
  counts and its HBM traffic; or {"compile_error": ...} when the TPU compiler refuses it for
  lack of memory. "compile_s" is how long the compile took, "cached" whether it was read
  from `cache_dir` (one JSON per "program_key") instead."""
  key = program_key(lowered, topology)
  found = cached_figures(cache_dir, key)
  if found is not None:
    return found
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses programs that cannot fit; its message has the numbers.
    figures = {"compile_error": str(e).strip().splitlines()[0]}
  else:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures = {
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "compiler_flops_per_device": float(cost.get("flops", 0.0)),
      "compiler_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
      "hbm_traffic_per_device": hbm_bytes_accessed(compiled.as_text()),
      "compiler_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
    }
  figures["compile_s"] = time.perf_counter() - start
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    errors.write_atomically(os.path.join(cache_dir, key + ".json"), json.dumps(figures, indent=1))
  return {**figures, "cached": False, "program_key": key}


def format_report(report: dict) -> str:
  lines = [
    f"{report['topology']} ({report['chips']} x {report['chip']}), mesh {report['mesh']}, "
    f"global batch {report['global_batch']}, {report['llm']} + {report['vision']}, "
    f"{report['frames']} frames x {report['tokens_per_frame']} tokens, cached visual "
    f"tokens {report['cached_visual_tokens']}, remat {report['remat']}, "
    f"{report['attention']} attention, "
    f"{report['trainable_params']:,} trainable / {report['frozen_params']:,} frozen params"
  ]
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
      if r["hbm_traffic_per_device"] is None
      else f"{decimal(r['hbm_traffic_per_device'])} of HBM traffic; the compiler's "
      f"{compiler} accessed counts on-chip VMEM too"
    )
    lines += [
      f"  {task} step ({'from the cache, ' if r['cached'] else ''}compiled in "
      f"{r['compile_s']:.0f} s), per device:",
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
