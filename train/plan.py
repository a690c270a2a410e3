"""python -m train.plan --config=configs/stage2.py --topologies=v5e:4x4,v5p:2x2x1 [--out=DIR]
    [--jobs=N] [--meshes=-1:1:1,...] [--remats=none,block,...] [--headroom=0.1] [--prune]

Plans a pod run from a CPU host (needs libtpu, no TPU). For each topology it searches
  - the meshes: every data x fsdp x tensor factorisation of the chips whose tensor size
    divides the model's attention heads and MLP width (`mesh_shapes`);
  - the remat policies (model.remat, models/layers.REMAT_POLICIES);
  - the global batch, in multiples of the batch axes (data x fsdp): the largest whose step
    fits the chip's HBM less the headroom.
Each candidate (mesh, policy) gets its largest batch economically: memory per chip grows
close to linearly with the per-replica batch, so two small compiles (1 and 2 examples per
replica) predict it, one compile at the prediction confirms it and one at the next size up
must not fit; when the prediction is off, the search narrows the bracket between what is
known to fit and not to fit (`search_candidate`). Every compile is the train step the trainer
runs (`train.aot.compile_report`), and its figures are cached on disk under the hash of the
lowered program, the topology and the versions (`train.aot.program_key`), so a rerun or an
extended sweep compiles only what is new. --jobs runs that many compiles at once, each in
its own process; when one dies (host memory), the plan goes on one compile at a time.

Two more economies. Slices are planned smallest first, and a candidate whose per-chip program
was searched on a smaller slice of the same chip (`twin_key`: same fsdp, tensor and remat)
starts from that slice's largest batch: two compiles confirm it (without a twin, from the
nearest fsdp below, `seed_for`). Each remat policy has a
compute ceiling, the examples/s that the roofline's compute bound alone allows on the slice
(`train.aot.compute_ceiling`, analytic); policies are searched highest ceiling first, and
with --prune a policy whose ceiling is below the fastest point already found is skipped.

Writes plan.md, plan.json and examples_per_s.png (examples/s against the global batch per
topology) to --out, and prints the Markdown. The fastest configuration per topology (the
compiled fitting point with the most examples/s: on a chip whose step is HBM bound, a smaller
batch than the largest can be faster) is marked, and compared with the config's own mesh and
remat policy at its own batch (the default). train.lr_scaling scales the learning rate with
each batch.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from absl import app, flags
from ml_collections import config_flags

from frameselect_jax import errors

config_flags.DEFINE_config_file(
  "config", None, "Experiment config (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_list("topologies", None, "TPU topologies, e.g. v5e:4x4,v5e:16x16,v5p:2x2x1,v6e:4x4.")
flags.DEFINE_list(
  "remats", None, "remat policies to search (default: all of models/layers.REMAT_POLICIES)."
)
flags.DEFINE_list(
  "meshes",
  None,
  "only these meshes, as data:fsdp:tensor, one axis may be -1 (default: every one allowed).",
)
flags.DEFINE_float("headroom", 0.1, "fraction of HBM kept free: a batch fits below (1-h) x HBM.")
flags.DEFINE_float(
  "hbm_gib", None, "plan for chips with this much HBM instead of the published figure."
)
flags.DEFINE_integer(
  "max_per_replica", 4096, "the search never goes past this many examples per replica."
)
flags.DEFINE_string("out", "plan_out", "folder for plan.md, plan.json and examples_per_s.png.")
flags.DEFINE_integer(
  "jobs",
  1,
  "compiles at a time, each in its own process (one CPU core and 5 to 18 GB each); when one "
  "dies of host memory the plan goes on one at a time.",
)
flags.DEFINE_string(
  "cache_dir", None, "compiled figures, one JSON per program (default: <out>/compile_cache)."
)
flags.DEFINE_bool(
  "prune",
  False,
  "skip the remat policies whose compute ceiling is below the fastest point found: they "
  "cannot be the fastest (their largest batches are then not searched).",
)


@dataclasses.dataclass(frozen=True)
class Mesh:
  data: int
  fsdp: int
  tensor: int

  @property
  def replicas(self) -> int:  # the batch axes
    return self.data * self.fsdp

  def __str__(self):
    return f"{self.data}x{self.fsdp}x{self.tensor}"

  def resolved(self, chips: int) -> Mesh | None:
    """The axis given as -1 takes the chips the others leave; None when they do not divide."""
    known = math.prod(s for s in (self.data, self.fsdp, self.tensor) if s != -1)
    if chips % known:
      return None
    rest = chips // known
    return Mesh(*[rest if s == -1 else s for s in (self.data, self.fsdp, self.tensor)])


def mesh_shapes(chips: int, selector_cfg, cached: bool) -> list[Mesh]:
  """Every (data, fsdp, tensor) with data x fsdp x tensor = chips whose tensor size divides
  the LLM's query and key-value heads and MLP width (and the vision tower's heads and MLP,
  when it runs): a tensor split of the KV heads would make the attention gather them."""
  llm, vision = selector_cfg.llm, selector_cfg.vision
  sizes = [llm.num_attention_heads, llm.num_key_value_heads, llm.intermediate_size]
  if not cached:
    sizes += [vision.num_attention_heads, vision.intermediate_size]
  out = []
  for tensor in range(1, chips + 1):
    if chips % tensor or any(s % tensor for s in sizes):
      continue
    rest = chips // tensor
    out += [Mesh(rest // fsdp, fsdp, tensor) for fsdp in range(1, rest + 1) if rest % fsdp == 0]
  return out


def parse_mesh(text: str) -> Mesh:
  """'data:fsdp:tensor', each a positive size or one of them -1 (the rest of the chips, as in
  the config's mesh), e.g. 4:1:2 or -1:1:2."""
  try:
    sizes = [int(x) for x in text.split(":")]
  except ValueError:
    sizes = []
  if len(sizes) != 3 or any(s < 1 and s != -1 for s in sizes) or sizes.count(-1) > 1:
    raise errors.InputError(
      f"--meshes: {text!r} is not data:fsdp:tensor with positive sizes (or one -1), "
      "e.g. 4:1:2 or -1:1:2"
    )
  return Mesh(*sizes)


# --- One compile, cached ---


def point_config(config, mesh: Mesh, remat: str, global_batch: int):
  c = copy.deepcopy(config)
  c.unlock()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh.data, mesh.fsdp, mesh.tensor
  c.model.remat = remat
  c.data.global_batch_size = global_batch
  return c


def exit_with_parent(parent_pid: int) -> None:
  """A compile worker's initializer: end the worker once the planner that started it is gone
  (killed, or interrupted while the worker was compiling), instead of leaving it compiling or
  waiting for work forever."""

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, daemon=True).start()


class CompileWorkerDied(RuntimeError):
  """A compile process ended without an answer while it was the only one: the kernel's
  out-of-memory killer, mostly."""


# A compile process is replaced after this many points (`Compiler`): see `compile_in_worker`.
POINTS_PER_WORKER = 8


def compile_in_worker(config, topology: str, cache_dir: str | None) -> dict:
  """`aot.compile_report` in a compile process, which then gives back what it can: jax's caches
  keep every program lowered and compiled so far, and the allocator keeps freed memory. A
  worker that had compiled a few real-size points held 12.5 GB when the kernel killed it (two
  such do not fit a 24 GB host); with this alone, workers still crept to 10.6 GB over eleven
  compiles, so each is also replaced after POINTS_PER_WORKER points."""
  import ctypes
  import gc

  import jax

  from train import aot

  report = aot.compile_report(config, topology, cache_dir)
  jax.clear_caches()
  gc.collect()
  try:  # glibc: return the freed heap to the system
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  return report


class Compiler:
  """Compiles points through `train.aot.compile_report`, whose cache (one file per lowered
  program, under cache_dir) answers every program compiled before; counts the programs it
  compiled and those the cache answered. With jobs > 1 the compiles run in that many
  processes (the TPU compiler holds one core for minutes; the searches of several
  candidates then overlap)."""

  def __init__(self, config, cache_dir: str, hbm_bytes: float | None, jobs: int = 1):
    self.config, self.cache_dir, self.hbm_bytes = config, cache_dir, hbm_bytes
    self.jobs = jobs
    self.compiles, self.cached, self.compile_s = 0, 0, 0.0
    self.progress = None  # a tqdm bar: its postfix counts the compiles
    # (topology, mesh, remat, global batch) -> seconds its compile took (when it was compiled)
    self.programs = {}
    self._lock = threading.Lock()
    self._pool = self._start_pool(jobs) if jobs > 1 else None

  @staticmethod
  def _start_pool(jobs: int):
    return concurrent.futures.ProcessPoolExecutor(
      jobs,
      mp_context=multiprocessing.get_context("spawn"),
      initializer=exit_with_parent,
      initargs=(os.getpid(),),
      max_tasks_per_child=POINTS_PER_WORKER,
    )

  def _compile_in_pool(self, config, topology: str, point: str) -> dict:
    """One compile in a worker. When a worker dies (the kernel's out-of-memory killer, mostly:
    two large compiles at once can outgrow the host), the compiles under way are lost; they
    are compiled again, one at a time from then on. A death with one worker ends the plan."""
    from tqdm import tqdm

    while True:
      pool = self._pool
      try:
        return pool.submit(compile_in_worker, config, topology, self.cache_dir).result()
      except BrokenProcessPool:
        with self._lock:
          if self._pool is pool:  # the first thread to see this pool broken decides
            if self.jobs == 1:
              raise CompileWorkerDied(
                f"a compile process died while compiling {point}, one compile at a time, "
                "most likely out of host memory (a real-size compile needs up to about 18 GB); "
                "what was compiled before is in the cache: rerun on a host with more memory"
              ) from None
            pool.shutdown(wait=False, cancel_futures=True)
            self.jobs, self._pool = 1, self._start_pool(1)
            tqdm.write(  # above the progress bar, when there is one
              f"warning: a compile process died while compiling {point}, most likely out of "
              "host memory; compiling again what was under way, one compile at a time from now",
              file=sys.stderr,
            )

  def __call__(self, topology: str, mesh: Mesh, remat: str, global_batch: int) -> dict:
    from train import aot

    config = point_config(self.config, mesh, remat, global_batch)
    if self._pool is None:
      report = aot.compile_report(config, topology, self.cache_dir)
    else:
      point = f"{topology} {mesh} {remat} batch {global_batch}"
      report = self._compile_in_pool(config, topology, point)
    with self._lock:
      self.programs[(topology, str(mesh), remat, global_batch)] = sum(
        task["compile_s"] for task in report["tasks"].values()
      )
      for task in report["tasks"].values():
        if task["cached"]:
          self.cached += 1
        else:
          self.compiles += 1
          self.compile_s += task["compile_s"]
      if self.progress is not None:
        self.progress.set_postfix_str(
          f"{self.compiles} compiled in {self.compile_s:.0f} s, {self.cached} from the cache; "
          f"last: {topology} {mesh} {remat} batch {global_batch}"
        )
    return {
      "topology": topology,
      "mesh": str(mesh),
      "remat": remat,
      "global_batch": global_batch,
      "chips": report["chips"],
      "chip": report["chip"],
      **combine_tasks(report["tasks"], config.train.task_ratio),
    }

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if self._pool is None:
      return
    if exc_type is not None:
      # Interrupted (Ctrl-C, an error): end the compiles under way instead of waiting minutes
      # for them; their futures then fail, which frees the threads waiting on them.
      for process in list((self._pool._processes or {}).values()):
        process.terminate()
    self._pool.shutdown(wait=exc_type is None, cancel_futures=True)

  def usable_hbm(self, result: dict) -> float:
    return self.hbm_bytes if self.hbm_bytes is not None else result["hbm_bytes"]


def combine_tasks(tasks: dict, task_ratio: str) -> dict:
  """One figure per compile from the steps of the tasks a stage runs (stage 1 alternates
  instruction and importance batches): memory is the largest step's, times are averaged
  with the task ratio's weights."""
  from train import trainer

  if len(tasks) == 1:
    return next(iter(tasks.values()))
  failed = [r for r in tasks.values() if "compile_error" in r]
  if failed:
    return failed[0]
  weights = dict(zip(("instruction", "importance"), trainer.parse_task_ratio(task_ratio)))
  total = sum(weights[t] for t in tasks)
  mean = lambda key: sum(weights[t] * r[key] for t, r in tasks.items()) / total
  largest = max(tasks.values(), key=lambda r: r["total_bytes"])
  out = {**largest}
  for key in ("compute_bound_s", "memory_bound_s", "ici_bound_s", "estimated_step_s"):
    out[key] = mean(key)
  out["model_flops"] = mean("model_flops")
  out["implied_mfu"] = mean("implied_mfu")
  return out


def fits(result: dict, limit: float) -> bool:
  return "compile_error" not in result and result["total_bytes"] <= limit


def linear_fit(points: dict[int, float]) -> tuple[float, float]:
  """(intercept, slope) of memory against per-replica batch through two measured points."""
  (b1, m1), (b2, m2) = sorted(points.items())
  slope = (m2 - m1) / (b2 - b1)
  return m1 - slope * b1, slope


def predict_largest(points: dict[int, float], limit: float, cap: int) -> int:
  """The largest per-replica batch under `limit` on the line through two measured points
  (`cap` when the line does not rise)."""
  intercept, slope = linear_fit(points)
  if slope <= 0:
    return cap
  return max(1, min(cap, math.floor((limit - intercept) / slope)))


def search_candidate(compile_point, topology, mesh, remat, limit_of, cap, seed=None) -> dict:
  """The largest per-replica batch that fits, for one (mesh, remat), up to `cap`.

  Compiles at 1 and 2 examples per replica predict it on a line; a compile at the prediction
  and one at the size above confirm it, so a right prediction costs four compiles. With a
  `seed` (the largest batch of the same per-chip program on another slice, `twin_key`), the
  seed is the prediction and the two compiles that confirm it are all a right one costs.
  When the prediction is wrong (small models: the TPU compiler's temporaries do not grow
  linearly), the search goes on inside the bracket of the largest batch known to fit below
  the smallest known not to: each next size is interpolated on the line between the
  bracket's ends, or is the bracket's middle when the last interpolation did not halve it.
  While nothing is known not to fit, it looks further up: on the line through the two
  largest sizes measured (at least one size up), or at twice the largest fit when that line
  does not rise. It ends when the two ends are neighbours: the lower one fits and the one
  above does not.

  Returns {"predicted": int | None (from the first two compiles, or the seed), "largest":
  int | None (None: not even one example per replica fits), "points": {per-replica batch:
  result}}."""
  points, memory, fitting = {}, {}, set()

  def measure(b):
    result = compile_point(topology, mesh, remat, b * mesh.replicas)
    points[b] = result
    if "compile_error" not in result:
      memory[b] = result["total_bytes"]
    if fits(result, limit_of(result)):
      fitting.add(b)

  def bracket():
    high = min([b for b in points if b not in fitting], default=cap + 1)
    low = max([b for b in fitting if b < high], default=0)
    return low, high

  nothing_fits = lambda predicted: {"predicted": predicted, "largest": None, "points": points}
  if seed is not None:
    predicted = min(seed, cap)
    measure(predicted)
    if predicted in fitting and predicted < cap:
      measure(predicted + 1)  # must not fit
    elif predicted not in fitting and predicted > 1:
      measure(1)
    if 1 in points and 1 not in fitting:
      return nothing_fits(predicted)
  else:
    measure(1)
    if 1 not in fitting:
      return nothing_fits(None)
    if cap == 1:
      return {"predicted": 1, "largest": 1, "points": points}
    measure(2)
    predicted = 1
    if len(memory) == 2:
      predicted = predict_largest(dict(memory), limit_of(points[1]), cap)
    low, high = bracket()
    if low < predicted < high:
      measure(predicted)
      if predicted in fitting and predicted < cap:
        measure(predicted + 1)  # must not fit
  limit = limit_of(next(iter(points.values())))
  last_width = None
  while True:
    low, high = bracket()
    if high - low <= 1:
      break
    width = high - low
    if high > cap:  # nothing known not to fit yet: look further up
      below = {b: memory[b] for b in sorted(b for b in memory if b <= low)[-2:]}
      if len(below) == 2 and linear_fit(below)[1] > 0:
        guess = max(low + 1, predict_largest(below, limit, cap))
      else:
        guess = min(2 * low, cap)
    elif (last_width and 2 * width > last_width) or low not in memory or high not in memory:
      guess = (low + high) // 2
    else:
      guess = predict_largest({low: memory[low], high: memory[high]}, limit, cap)
      guess = min(max(guess, low + 1), high - 1)
    last_width = width
    measure(guess)
  return {"predicted": predicted, "largest": low, "points": points}


def twin_key(chip: str, mesh: Mesh, remat: str) -> tuple:
  """Candidates with one key compile the same per-chip program at each per-replica batch:
  the same chip, weight sharding (fsdp, tensor) and remat policy, with only the data axis
  (the replica groups of the gradient all-reduce) different. On v5e:4x4 and v5e:16x16 the
  data-parallel searches found the same boundaries, with memory per chip within 1.3% at every
  batch compiled on both (benchmarks/results_plan.md), so one slice's largest batch seeds the
  other's search."""
  return chip, mesh.fsdp, mesh.tensor, remat


def seed_for(seeds: dict, chip: str, mesh: Mesh, remat: str) -> dict | None:
  """The search on a smaller slice that best predicts this candidate's boundary: its twin's
  (`twin_key`); else, on a slice too small for a twin (v5e:4x4 has no fsdp 32), the one of
  the same chip, tensor size and remat with the most fsdp below this one's. Past fsdp 16 the
  weights' share of the chip's memory is under 0.4 GiB, so more fsdp changes little."""
  if twin_key(chip, mesh, remat) in seeds:
    return seeds[twin_key(chip, mesh, remat)]
  below = [
    (fsdp, seed)
    for (c, fsdp, tensor, r), seed in seeds.items()
    if (c, tensor, r) == (chip, mesh.tensor, remat) and fsdp < mesh.fsdp
  ]
  return max(below, key=lambda item: item[0])[1] if below else None


# --- The plan ---


def estimate(result: dict, train_config) -> dict:
  from train import step as step_lib

  step_s = result["estimated_step_s"]
  return {
    "global_batch": result["global_batch"],
    "memory_per_chip_bytes": result["total_bytes"],
    "compute_bound_s": result["compute_bound_s"],
    "memory_bound_s": result["memory_bound_s"],
    "ici_bound_s": result["ici_bound_s"],
    "estimated_step_s": step_s,
    "examples_per_s": result["global_batch"] / step_s,
    "implied_mfu": result["implied_mfu"],
    "lr": step_lib.scaled_lr(train_config, result["global_batch"]),
  }


def plan_topology(
  config,
  topology,
  chip,
  meshes,
  ceilings,
  compile_point,
  limit_of,
  cap,
  bar,
  jobs,
  seeds,
  prune=False,
):
  """Every (mesh, remat) candidate's search, `jobs` of them at a time: the meshes, and the
  remat policies of `ceilings` (policy -> `aot.compute_ceiling`) highest ceiling first.

  seeds: twin_key -> {"largest", "topology", "mesh"} of searches on smaller slices; a
  candidate starts from the largest batch of its `seed_for` (`search_candidate`), and this
  slice's results are added for the slices after it. prune: a policy whose ceiling is below
  the fastest point found so far is not searched (none of its candidates can be the
  fastest); its candidates are reported as pruned."""

  def plan_candidate(mesh, remat):
    seed = seed_for(seeds, chip, mesh, remat)
    found = search_candidate(
      compile_point, topology, mesh, remat, limit_of, cap, seed=seed and seed["largest"]
    )
    entry = {
      "mesh": str(mesh),
      "remat": remat,
      "predicted_per_replica": found["predicted"],
      "predicted_from": f"{seed['topology']} {seed['mesh']}" if seed else "line",
      "largest_per_replica": found["largest"],
      "points": {
        str(b): {
          "global_batch": r["global_batch"],
          "fits": fits(r, limit_of(r)),
          "compile_s": r["compile_s"],
          "cached": r["cached"],
          **(
            {"compile_error": r["compile_error"]}
            if "compile_error" in r
            else {"memory_per_chip_bytes": r["total_bytes"], **estimate(r, config.train)}
          ),
        }
        for b, r in sorted(found["points"].items())
      },
    }
    if found["largest"]:
      entry["at_largest"] = estimate(found["points"][found["largest"]], config.train)
      entry["fastest"] = fastest_of(
        [estimate(r, config.train) for r in found["points"].values() if fits(r, limit_of(r))]
      )
    bar.update(1)
    return entry

  remats = list(ceilings)
  order = sorted(remats, key=lambda remat: -ceilings[remat])
  # Without pruning every candidate is searched: one queue keeps all jobs busy.
  groups = (
    [[(m, r) for r in order for m in meshes]]
    if not prune
    else [[(m, r) for m in meshes] for r in order]
  )
  entries = {}
  for pairs in groups:
    remat = pairs[0][1]
    best = fastest_configuration(list(entries.values()))
    if prune and best and ceilings[remat] < (1 - FASTEST_TOLERANCE) * best["examples_per_s"]:
      for mesh, _ in pairs:
        entries[(str(mesh), remat)] = {"mesh": str(mesh), "remat": remat, "pruned": True}
      bar.update(len(pairs))
      continue
    pool = concurrent.futures.ThreadPoolExecutor(jobs)
    try:
      found = pool.map(lambda pair: plan_candidate(*pair), pairs)
      entries.update({(e["mesh"], e["remat"]): e for e in found})
    finally:  # interrupted: the searches not started are dropped, not waited for
      pool.shutdown(wait=False, cancel_futures=True)
  for mesh in meshes:
    for remat in remats:
      largest = entries[(str(mesh), remat)].get("largest_per_replica")
      if largest:
        seeds.setdefault(
          twin_key(chip, mesh, remat),
          {"largest": largest, "topology": topology, "mesh": str(mesh)},
        )
  return {
    "candidates": [entries[(str(m), r)] for m in meshes for r in remats],
    "compute_ceiling": ceilings,
  }


# Roofline estimates within this fraction of each other count as equally fast.
FASTEST_TOLERANCE = 0.01


def fastest_of(estimates: list[dict]) -> dict:
  """The estimate with the most examples/s; among those within FASTEST_TOLERANCE of it, the
  one with the largest global batch (a compute-bound step does the same examples/s at every
  batch, and the larger batch takes fewer steps)."""
  top = max(e["examples_per_s"] for e in estimates)
  close = [e for e in estimates if e["examples_per_s"] >= (1 - FASTEST_TOLERANCE) * top]
  return max(close, key=lambda e: e["global_batch"])


def fastest_configuration(candidates: list[dict]) -> dict | None:
  """{"candidate": "mesh/remat", **estimate} of the fastest compiled fitting point over every
  candidate (`fastest_of`); None when nothing fits."""
  named = [
    {"candidate": f"{c['mesh']}/{c['remat']}", **c["fastest"]} for c in candidates if "fastest" in c
  ]
  return fastest_of(named) if named else None


def largest_configuration(candidates: list[dict]) -> dict | None:
  """{"candidate": "mesh/remat", **estimate} of the largest fitting global batch over every
  candidate (the more examples/s among equal batches); None when nothing fits."""
  named = [
    {"candidate": f"{c['mesh']}/{c['remat']}", **c["at_largest"]}
    for c in candidates
    if "at_largest" in c
  ]
  return max(named, key=lambda e: (e["global_batch"], e["examples_per_s"])) if named else None


def default_point(config, topology, devices, compile_point, limit_of) -> dict:
  """The config's own mesh (its -1 axis resolved for this topology) and remat policy, at the
  config's global batch rounded up to a multiple of data x fsdp (a pod larger than the batch
  needs one example per replica)."""
  mesh = Mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor).resolved(devices)
  if mesh is None:
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    return {"error": f"the config's mesh {sizes} does not divide {devices} chips"}
  batch = -(-config.data.global_batch_size // mesh.replicas) * mesh.replicas
  result = compile_point(topology, mesh, config.model.remat, batch)
  out = {"mesh": str(mesh), "remat": config.model.remat, "fits": fits(result, limit_of(result))}
  if "compile_error" in result:
    return {**out, "global_batch": batch, "compile_error": result["compile_error"]}
  return {**out, **estimate(result, config.train)}


def run_plan(
  config,
  topologies,
  *,
  remats=None,
  meshes=None,
  headroom=0.1,
  hbm_gib=None,
  max_per_replica=4096,
  cache_dir,
  jobs=1,
  prune=False,
  progress=True,
) -> dict:
  from tqdm import tqdm

  from frameselect_jax.models.layers import REMAT_POLICIES, remat_policy_name
  from train import aot, trainer
  from train import step as step_lib

  if not 0 <= headroom < 1:
    raise errors.InputError(f"--headroom={headroom} must be in [0, 1)")
  if jobs < 1:
    raise errors.InputError(f"--jobs={jobs} must be at least 1")
  if hbm_gib is not None and not hbm_gib > 0:
    raise errors.InputError(f"--hbm_gib={hbm_gib} must be positive")
  if max_per_replica < 1:
    raise errors.InputError(f"--max_per_replica={max_per_replica} must be at least 1")
  remats = list(remats or REMAT_POLICIES)
  for r in remats:
    if r not in REMAT_POLICIES:
      raise errors.InputError(f"--remats: {r!r} is none of {REMAT_POLICIES}")
  config.model.remat = remat_policy_name(config.model.remat)
  selector_cfg, _ = trainer.check_config(config, runtime=False)
  try:
    step_lib.scaled_lr(config.train, config.data.global_batch_size)
  except ValueError as e:
    raise errors.InputError(str(e)) from None
  cached = bool(config.data.cache_visual_tokens)
  hbm_bytes = None if hbm_gib is None else hbm_gib * aot.GIB
  plans, work = {}, []
  topologies = list(dict.fromkeys(topologies))
  for topology in topologies:
    devices = aot.topology_devices(topology)
    chips = len(devices)
    allowed = mesh_shapes(chips, selector_cfg, cached)
    chosen = allowed if not meshes else [m.resolved(chips) for m in meshes]
    chosen = [m for m in dict.fromkeys(chosen) if m in allowed]
    if meshes and not chosen:
      raise errors.InputError(
        f"--meshes: none of {[str(m) for m in meshes]} is allowed on {topology} ({chips} "
        f"chips); allowed: {', '.join(str(m) for m in allowed)}"
      )
    batch = config.data.global_batch_size
    ceilings = {
      r: aot.compute_ceiling(point_config(config, chosen[0], r, batch), topology) for r in remats
    }
    work.append((topology, chips, aot.chip_of(devices, topology).name, chosen, ceilings))
  total = sum(len(chosen) * len(remats) for _, _, _, chosen, _ in work)
  compiler = Compiler(config, cache_dir, hbm_bytes, jobs)
  limit_of = lambda result: (1 - headroom) * compiler.usable_hbm(result)
  bar = tqdm(total=total, desc="planning (mesh, remat) candidates", disable=not progress)
  compiler.progress = bar
  seeds = {}  # twin_key -> the largest batch found on a smaller slice, and that slice
  with compiler, bar:
    # Smaller slices first, so that their boundaries seed their twins' on larger ones.
    for topology, chips, chip, chosen, ceilings in sorted(work, key=lambda w: w[1]):
      before = (compiler.compiles, compiler.cached, compiler.compile_s)
      plan = plan_topology(
        config,
        topology,
        chip,
        chosen,
        ceilings,
        compiler,
        limit_of,
        max_per_replica,
        bar,
        jobs,
        seeds,
        prune,
      )
      plan["default"] = default_point(config, topology, chips, compiler, limit_of)
      plan["chips"] = chips
      plan["compiles"] = compiler.compiles - before[0]
      plan["cached_results"] = compiler.cached - before[1]
      plan["compile_s"] = compiler.compile_s - before[2]
      seconds = [s for key, s in compiler.programs.items() if key[0] == topology]
      plan["points"], plan["points_compile_s"] = len(seconds), sum(seconds)
      plan["fastest"] = fastest_configuration(plan["candidates"])
      plan["largest"] = largest_configuration(plan["candidates"])
      plans[topology] = plan
  plans = {topology: plans[topology] for topology in topologies}
  return {
    "config": {
      "llm": config.model.llm,
      "vision": config.model.vision,
      "stage": config.stage,
      "frames": selector_cfg.num_candidates,
      "tokens_per_frame": selector_cfg.tokens_per_frame,
      "cached_visual_tokens": cached,
      "global_batch": config.data.global_batch_size,
      "remat": config.model.remat,
      "lr": float(config.train.lr),
      "lr_scaling": config.train.get("lr_scaling", "none"),
      "lr_reference_batch": config.train.get("lr_reference_batch", 0),
    },
    "headroom": headroom,
    "hbm_gib": hbm_gib,
    "remats": remats,
    "prune": prune,
    "versions": aot.versions(),
    "topologies": plans,
  }


# --- Reports ---


def _gib(b):
  return f"{b / 1024**3:.2f}"


def _ms(seconds):
  return f"{1e3 * seconds:.3g}"


def markdown(plan: dict) -> str:
  c = plan["config"]
  lines = [
    f"# Pod-run plan: {c['llm']} + {c['vision']}, stage {c['stage']}, {c['frames']} frames x "
    f"{c['tokens_per_frame']} tokens",
    "",
    f"A batch fits when the step needs at most {100 * (1 - plan['headroom']):.0f}% of a chip's "
    "HBM"
    + (f" ({plan['hbm_gib']} GiB chips, not the published figure)" if plan["hbm_gib"] else "")
    + f". Learning rate: {c['lr']:g} at the config's batch {c['global_batch']}, scaling "
    f"{c['lr_scaling']}"
    + (f" from batch {c['lr_reference_batch']}" if c["lr_scaling"] != "none" else "")
    + ". Step time is a roofline: the largest of the compute, HBM and ICI bounds. The fastest "
    f"is the point with the most examples/s, or among those within {100 * FASTEST_TOLERANCE:g}% "
    "of it the one with the largest global batch (fewer steps per epoch).",
  ]
  for topology, p in plan["topologies"].items():
    lines += [
      "",
      f"## {topology} ({p['chips']} chips): {p['compiles']} compiles in {p['compile_s']:.0f} s, "
      f"{p['cached_results']} results from the cache",
      "",
      f"The search compiled {p['points']} points; compiling them all took "
      f"{p['points_compile_s']:.0f} s (whenever each was first compiled). Compute ceiling per "
      "remat policy (the examples/s no mesh and no batch can pass): "
      + ", ".join(f"{r} {v:.1f}" for r, v in p["compute_ceiling"].items())
      + ".",
      "",
      "| mesh (data x fsdp x tensor) | remat | largest batch per replica: predicted / confirmed "
      "| global batch | lr | memory per chip (GiB) | compute / HBM / ICI bound (ms) "
      "| step (ms) | examples/s | implied MFU | fastest compiled batch: examples/s | |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fastest = p["fastest"]
    for cand in p["candidates"]:
      name = f"{cand['mesh']}/{cand['remat']}"
      mark = "**fastest**" if fastest and name == fastest["candidate"] else ""
      if cand.get("pruned"):
        continue
      if "at_largest" not in cand:
        lines.append(f"| {cand['mesh']} | {cand['remat']} | - / none fits | | | | | | | | | |")
        continue
      b, f = cand["at_largest"], cand["fastest"]
      source = cand.get("predicted_from", "line")
      predicted = f"{cand['predicted_per_replica']}" + (
        f" (from {source})" if source != "line" else ""
      )
      lines.append(
        f"| {cand['mesh']} | {cand['remat']} | {predicted} / "
        f"{cand['largest_per_replica']} | {b['global_batch']} | {b['lr']:.3g} "
        f"| {_gib(b['memory_per_chip_bytes'])} | {_ms(b['compute_bound_s'])} / "
        f"{_ms(b['memory_bound_s'])} / {_ms(b['ici_bound_s'])} "
        f"| {_ms(b['estimated_step_s'])} | {b['examples_per_s']:.1f} "
        f"| {100 * b['implied_mfu']:.1f}% | {f['global_batch']}: {f['examples_per_s']:.1f} "
        f"| {mark} |"
      )
    pruned = list(dict.fromkeys(c["remat"] for c in p["candidates"] if c.get("pruned")))
    if pruned:
      lines += [
        "",
        "Not searched (--prune), on any mesh: "
        + ", ".join(f"{r} (ceiling {p['compute_ceiling'][r]:.1f})" for r in pruned)
        + "; their compute ceilings are below the fastest point found"
        + (f" ({fastest['examples_per_s']:.1f} examples/s)" if fastest else "")
        + ", so none of their candidates can be the fastest.",
      ]
    if p.get("largest"):
      g = p["largest"]
      lines += [
        "",
        f"The largest batch that fits{' of those searched' if pruned else ''}: "
        f"{g['global_batch']} ({g['candidate']}), {g['examples_per_s']:.1f} examples/s.",
      ]
    d = p["default"]
    if "examples_per_s" in d:
      lines += [
        "",
        f"The config's default ({d['mesh']}, remat {d['remat']}, batch {d['global_batch']}): "
        f"{_gib(d['memory_per_chip_bytes'])} GiB per chip "
        f"({'fits' if d['fits'] else 'does not fit'}), "
        f"step {_ms(d['estimated_step_s'])} ms, {d['examples_per_s']:.1f} examples/s, "
        f"implied MFU {100 * d['implied_mfu']:.1f}%"
        + (
          f"; the fastest configuration ({fastest['candidate']}, batch "
          f"{fastest['global_batch']}) does {fastest['examples_per_s']:.1f}, "
          f"{fastest['examples_per_s'] / d['examples_per_s']:.2f}x its examples/s."
          if fastest
          else "."
        ),
      ]
    else:
      lines += ["", f"The config's default: {d.get('error') or d.get('compile_error')}."]
  return "\n".join(lines) + "\n"


# Line style per remat policy in the plot (colour is the mesh).
REMAT_STYLES = {"none": "-", "save_projections": "--", "save_attn_mlp": ":", "block": "-."}


def plot(plan: dict, path: str) -> str:
  """examples/s against the global batch, one panel per topology: each candidate's fitting
  compiles (colour: mesh, line style: remat policy), each policy's compute ceiling as a thin
  horizontal line of its style, the fastest point starred, the config's default crossed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from frameselect_jax import plot as plot_lib

  topologies = list(plan["topologies"])
  figure, axes = plt.subplots(1, len(topologies), figsize=(5 * len(topologies), 6), squeeze=False)
  for ax, topology in zip(axes[0], topologies):
    p = plan["topologies"][topology]
    meshes = list(dict.fromkeys(c["mesh"] for c in p["candidates"]))
    colors = plt.get_cmap("tab10" if len(meshes) <= 10 else "tab20")
    for cand in p["candidates"]:
      points = sorted(
        (v for v in cand.get("points", {}).values() if v.get("fits")),
        key=lambda v: v["global_batch"],
      )
      if points:
        ax.plot(
          [v["global_batch"] for v in points],
          [v["examples_per_s"] for v in points],
          marker="o",
          markersize=3,
          linestyle=REMAT_STYLES.get(cand["remat"], "-"),
          color=colors(meshes.index(cand["mesh"])),
          label=f"{cand['mesh']} {cand['remat']}",
        )
    for remat, ceiling in p.get("compute_ceiling", {}).items():
      ax.axhline(ceiling, color="grey", linewidth=0.7, linestyle=REMAT_STYLES.get(remat, "-"))
      ax.annotate(
        f"ceiling: {remat}",
        (0.01, ceiling),
        xycoords=("axes fraction", "data"),
        fontsize=6,
        color="grey",
        va="bottom",
      )
    marks = []
    if p["fastest"]:
      f = p["fastest"]
      marks.append((f, "*", 220, "black", f"fastest: {f['candidate']} at {f['global_batch']}"))
    if "examples_per_s" in p["default"]:
      d = p["default"]
      marks.append((d, "X", 90, "grey", f"config default: {d['mesh']}/{d['remat']}"))
    for point, marker, size, color, label in marks:
      ax.scatter(
        [point["global_batch"]],
        [point["examples_per_s"]],
        marker=marker,
        s=size,
        color=color,
        zorder=3,
        label=label,
      )
    ax.set_xscale("log", base=2)
    ax.set_title(f"{topology} ({p['chips']} chips)")
    ax.set_xlabel("global batch (fitting compiles)")
    ax.set_ylabel("estimated examples/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
  figure.tight_layout()
  plot_lib.save_figure(figure, path)
  plt.close(figure)
  return path


def write_reports(plan: dict, out_dir: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    "md": os.path.join(out_dir, "plan.md"),
    "json": os.path.join(out_dir, "plan.json"),
    "png": os.path.join(out_dir, "examples_per_s.png"),
  }
  errors.write_atomically(paths["md"], markdown(plan))
  errors.write_atomically(paths["json"], json.dumps(plan, indent=1))
  plot(plan, paths["png"])
  return paths


def main(argv):
  del argv
  from train.trainer import ConfigError

  f = flags.FLAGS
  if not f.topologies:
    errors.exit_with("--topologies is required, e.g. --topologies=v5e:4x4,v5p:2x2x1")
  try:
    meshes = [parse_mesh(m) for m in f.meshes] if f.meshes else None
    errors.check_can_create(f.out, "--out")
    plan = run_plan(
      f.config,
      f.topologies,
      remats=f.remats,
      meshes=meshes,
      headroom=f.headroom,
      hbm_gib=f.hbm_gib,
      max_per_replica=f.max_per_replica,
      prune=f.prune,
      cache_dir=f.cache_dir or os.path.join(f.out, "compile_cache"),
      jobs=f.jobs,
    )
  except ConfigError as e:
    errors.exit_with(str(e), prefix="config error")
  except errors.InputError as e:
    errors.exit_with(str(e))
  except CompileWorkerDied as e:
    print(f"error: {e}", file=sys.stderr)
    errors.mute_stderr()
    sys.exit(1)
  except KeyboardInterrupt:
    # Exit now rather than join the process pool at interpreter exit, which can wait on a
    # compile under way: every worker exits with its parent (exit_with_parent), and what was
    # compiled is in the cache.
    print("interrupted; what was compiled is in the cache", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)
  paths = write_reports(plan, f.out)
  print(markdown(plan))
  print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=errors.parse_flags)
