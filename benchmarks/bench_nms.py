"""Greedy NMS: jitted + vmapped JAX vs the paper's plain-Python loop, on one batch.

Prints compile time, time per batch for both, and the speed ratio (target >= 100x), and a
floor: the time of k dependent row-max reductions over the batch, the least any greedy NMS
does on this backend. Timings are printed, never asserted.

    python benchmarks/bench_nms.py [--batch 1024 --n 128 --k 8]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from frameselect_jax import selection


def wall_times(fn, repeats):
  """(median, best) wall time of fn() over `repeats` runs; the best is less
  sensitive to other processes on a small shared machine."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--n", type=int, default=128)
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=50, help="timed runs of the JAX version")
  parser.add_argument("--reference-repeats", type=int, default=5)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  scores = rng.normal(size=(args.batch, args.n)).astype(np.float32)
  valid = np.ones((args.batch, args.n), bool)
  scores_dev, valid_dev = jax.device_put(scores), jax.device_put(valid)

  start = time.perf_counter()
  compiled = selection.select_batch.lower("nms_greedy", scores_dev, valid_dev, args.k).compile()
  compile_s = time.perf_counter() - start

  picks = compiled(scores_dev, valid_dev).block_until_ready()  # warm-up
  jax_s, jax_best = wall_times(
    lambda: compiled(scores_dev, valid_dev).block_until_ready(), args.repeats
  )

  def reference():
    return np.stack([selection.nms_greedy_reference(s, v, args.k) for s, v in zip(scores, valid)])

  reference_picks = reference()
  reference_s, reference_best = wall_times(reference, args.reference_repeats)

  print(
    f"greedy NMS, batch={args.batch}, n={args.n}, k={args.k}; jax {jax.__version__} on "
    f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
  )
  print(
    f"  same picks as the reference:   {bool(np.array_equal(np.asarray(picks), reference_picks))}"
  )
  print(f"  JAX compile (lower+compile):   {compile_s * 1e3:9.1f} ms (once per shape and k)")
  print(
    f"  JAX jit+vmap, per batch:       {jax_s * 1e3:9.3f} ms median, {jax_best * 1e3:.3f} best "
    f"of {args.repeats}"
  )
  print(
    f"  Python reference, per batch:   {reference_s * 1e3:9.1f} ms median, "
    f"{reference_best * 1e3:.1f} best "
    f"of {args.reference_repeats}"
  )
  print(
    f"  speed-up (reference / JAX):    {reference_s / jax_s:9.1f}x median, "
    f"{reference_best / jax_best:.1f}x best   (target >= 100x)"
  )

  # What any greedy NMS costs at least on this backend: k dependent row-max reductions over
  # the batch, each broadcast back (no suppression, no index search, no sorting).
  @jax.jit
  def k_reductions(x):
    for _ in range(args.k):
      x = x - 1e-3 * x.max(axis=1, keepdims=True)
    return x

  floor = k_reductions.lower(scores_dev).compile()
  floor(scores_dev).block_until_ready()
  floor_s, floor_best = wall_times(lambda: floor(scores_dev).block_until_ready(), args.repeats)
  print(
    f"  floor: {args.k} dependent max-reductions: {floor_s * 1e3:9.3f} ms median, "
    f"{floor_best * 1e3:.3f} best -> at most {reference_s / floor_s:.0f}x median, "
    f"{reference_best / floor_best:.0f}x best for any greedy NMS built from them"
  )


if __name__ == "__main__":
  main()
