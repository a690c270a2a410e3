"""The evaluation harness's stages and overhead, on generated needle videos (CPU).

  python benchmarks/bench_eval.py [--videos=100] [--workers=2]

Runs `python -m eval`'s harness (eval/harness.py) over the needle benchmark with the pixel
reader as the downstream model and a random tiny selector (its scores mean nothing; its cost
is real), and prints, measured in the same run: each stage's own time (summed over
questions, from results.jsonl), the run's wall time, how close the wall time comes to the
slowest stage (decoding runs in background workers, answering in a pool, selection in the
main thread), and the harness's own overhead per question beyond the three stages.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from configs.eval import needle as needle_config  # noqa: E402
from eval import harness  # noqa: E402
from frameselect_jax import synthetic  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--videos", type=int, default=100)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="bench_eval_")
  start = time.perf_counter()
  synthetic.write_needle_benchmark(
    os.path.join(root, "needle"), {"test": args.videos}, synthetic.NeedleSettings(), progress=False
  )
  print(f"wrote {args.videos} needle videos in {time.perf_counter() - start:.1f} s")
  c = needle_config.get_config("random")
  c.root, c.output = os.path.join(root, "needle"), os.path.join(root, "out")
  c.num_candidates, c.ks = 32, (4, 8)
  c.strategies = "uniform,random,nms_greedy"
  c.decode.workers = args.workers
  c.progress = False
  c.report.resamples = 2000
  # A warm-up run on 2 videos' worth of questions compiles the selector; then the timed run.
  harness.run(c)
  os.remove(os.path.join(c.output, "results.jsonl"))
  os.remove(os.path.join(c.output, "selections.jsonl"))
  start = time.perf_counter()
  out = harness.run(c)
  wall = time.perf_counter() - start
  with open(os.path.join(out, "results.jsonl")) as f:
    results = [json.loads(line) for line in f]
  questions = len({r["qid"] for r in results})
  decode = sum({r["qid"]: r["decode_s"] for r in results}.values())
  select = sum(r.get("select_s", 0.0) for r in results)
  answer = sum(r.get("answer_s", 0.0) for r in results)
  stages = {
    "decode (summed over workers)": decode,
    f"decode per worker ({args.workers})": decode / args.workers,
    "select (main thread)": select,
    "answer": answer,
  }
  slowest = max(decode / args.workers, select, answer)
  with open(os.path.join(out, "report.json")) as f:
    clock = json.load(f)["main_thread_s"]
  print(f"{questions} questions x {len(results) // questions} (strategy, k) answers each")
  print(f"{'stage':<32}{'total s':>10}{'ms / question':>16}")
  for name, seconds in stages.items():
    print(f"{name:<32}{seconds:>10.2f}{1000 * seconds / questions:>16.2f}")
  print(f"{'sum of the stages':<32}{decode + select + answer:>10.2f}")
  print(f"{'wall time (report included)':<32}{wall:>10.2f}{1000 * wall / questions:>16.2f}")
  print(f"wall / slowest stage: {wall / slowest:.2f}")
  print(
    f"main thread: {clock['loop']:.2f} s in the loop = {clock['selecting']:.2f} selecting + "
    f"{clock['waiting']:.2f} waiting on decoding/answering + {clock['overhead']:.2f} the "
    f"harness's own work; then {clock['report']:.2f} s writing the report"
  )
  print(
    f"harness overhead: {1000 * clock['overhead'] / questions:.2f} ms per question, "
    f"{100 * clock['overhead'] / wall:.1f}% of the wall time"
  )


if __name__ == "__main__":
  main()
