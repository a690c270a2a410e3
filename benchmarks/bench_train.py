"""Training throughput on this CPU for the tiny config: cached visual tokens against running
the (frozen) ViT every step. End to end (data pipeline, host->device, jitted step).

  python benchmarks/bench_train.py [--steps=40] [--stage_config=configs/stage1.py:tiny]

Prints examples/s of both paths (median over the steps after compilation) and their ratio.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup_steps", type=int, default=4)
  args = parser.parse_args()
  from absl import flags

  flags.FLAGS(["bench_train"])
  import numpy as np

  from configs import stage1
  from frameselect_jax import jsonl
  from train import trainer

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, cached in (("cached visual tokens", True), ("ViT every step", False)):
      config = stage1.get_config("tiny")
      config.train.num_steps = args.steps
      config.data.cache_visual_tokens = cached
      config.data.cache_dir = os.path.join(tmp, "cache")
      config.checkpoint.every_steps = 10**6  # only the final save
      config.validation.every_steps = 0
      config.log.progress = False
      workdir = os.path.join(tmp, name.replace(" ", "_"))
      start = time.perf_counter()
      trainer.run(config, workdir)
      wall = time.perf_counter() - start
      lines = [
        m for m in jsonl.read(os.path.join(workdir, "metrics.jsonl")) if "examples_per_s" in m
      ]
      steady = [m["examples_per_s"] for m in lines if m["step"] > args.warmup_steps]
      results[name] = (float(np.median(steady)), wall)
  batch = stage1.get_config("tiny").data.global_batch_size
  print(
    f"tiny stage-1 config, global batch {batch}, {args.steps} steps, "
    f"1 CPU device ({os.cpu_count()} cores):"
  )
  print("| path | examples/s (median, after compilation) | whole run incl. compile (s) |")
  print("|---|---|---|")
  for name, (rate, wall) in results.items():
    print(f"| {name} | {rate:.1f} | {wall:.0f} |")
  cached, vit = results["cached visual tokens"][0], results["ViT every step"][0]
  print(
    f"cached / ViT = {cached / vit:.2f}x (the tiny ViT is 2 layers of width 32 on 49 "
    f"patches: cheap next to the LLM)"
  )
  # The real model, where the frozen so400m tower dominates: analytic FLOPs per step.
  from configs import stage2
  from frameselect_jax import experiment
  from train import flops

  real = stage2.get_config()
  selector_cfg = experiment.selector_config(real.model)
  with_cache, _ = flops.step_flops(real, selector_cfg, "importance", cached=True)
  with_vit, _ = flops.step_flops(real, selector_cfg, "importance", cached=False)
  print(
    f"real stage-2 step (Qwen2.5-1.5B + SigLIP so400m, 128 frames x 9 tokens, batch "
    f"{real.data.global_batch_size}), model FLOPs per step: cached {with_cache:.3e}, ViT "
    f"{with_vit:.3e} -> caching does {with_vit / with_cache:.1f}x less work"
  )


if __name__ == "__main__":
  main()
