"""Does the selector learn? Trains configs/needle.py (stage 1, then stage 2 with LoRA) from
scratch on this CPU and measures it on held-out needle videos it has never seen.

  python benchmarks/bench_learning.py [--heads=frame_query,query_mlp] [--workdir=DIR]

For each score head it prints the training wall time of both stages, then, on the held-out
(test) split, recall@k and hit@k (selection.py) for k = 1, 2, 4, 8 of: uniform sampling, random
frames, top-k and greedy NMS of the trained selector's scores, and NMS over the labels
themselves (the ceiling). Last, recall@k and hit@k of the asked needle when each question is
swapped for another needle's question of the same video (the frames stay): a selector that
reads the question then finds the other needle first. Targets (issue "the selector learns"):
held-out hit@4 with NMS >= 0.9 while uniform stays below 0.5; both stages under 8 minutes.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

KS = (1, 2, 4, 8)


def train_both_stages(head, root, needle_dir, config_arg="", stages=(1, 2)):
  from configs import needle
  from train import trainer

  times = {}
  for stage in stages:
    config = needle.get_config(",".join(filter(None, [f"stage={stage},head={head}", config_arg])))
    config.data.needle.dir = needle_dir
    config.log.progress = False
    if stage == 2:
      config.train.init_from = os.path.join(root, "stage1", "checkpoints")
    start = time.perf_counter()
    summary = trainer.run(config, os.path.join(root, f"stage{stage}"))
    times[stage] = time.perf_counter() - start
    print(
      f"  stage {stage}: {summary['step']} steps in {times[stage]:.0f} s, validation hit@4 "
      f"{summary['validation/hit_at_4']:.3f}",
      flush=True,
    )
  return times


def evaluate(selector, needle_dir, items, seed=0):
  import jax
  import numpy as np

  from frameselect_jax import selection, synthetic

  def scores_for(questions):
    pairs = [(os.path.join(needle_dir, it["video"]), q, o) for it, (q, o) in zip(items, questions)]
    results = selector.select_many(pairs, k=max(KS), batch_size=16)
    return np.stack([r.scores for r in results]), results

  own = [(it["question"], it["options"]) for it in items]
  scores, results = scores_for(own)
  valid = np.stack([r.valid for r in results])
  relevant = (
    np.stack(
      [
        synthetic.candidate_relevance(it, r.candidate_frame_indices)
        for it, r in zip(items, results)
      ]
    )
    > 0
  )
  # The same videos, each question swapped for the next needle's question of its video.
  by_video = {}
  for i, it in enumerate(items):
    by_video.setdefault(it["video_id"], []).append(i)
  partner = {}
  for group in by_video.values():
    for j, i in enumerate(group):
      partner[i] = group[(j + 1) % len(group)]
  swapped_scores, _ = scores_for([own[partner[i]] for i in range(len(items))])

  table = {}
  for k in KS:
    picks = {
      "uniform": selection.select_batch("uniform", scores, valid, k),
      "random": selection.random_k(valid, k, jax.random.key(seed + k)),
      "top-k (selector)": selection.select_batch("top_k", scores, valid, k),
      "NMS (selector)": selection.select_batch("nms_greedy", scores, valid, k),
      "NMS (labels: the ceiling)": selection.select_batch(
        "nms_greedy", relevant.astype(np.float32), valid, k
      ),
    }
    picks["NMS, questions swapped"] = selection.select_batch("nms_greedy", swapped_scores, valid, k)
    for name, chosen in picks.items():
      table.setdefault(name, {})[k] = (
        float(np.nanmean(selection.recall_at_k(chosen, relevant))),
        float(np.nanmean(selection.hit_at_k(chosen, relevant))),
      )
  return table


def print_table(head, times, table, count):
  print(
    f"\n### score head `{head}`: "
    + " + ".join(f"stage {s} {t:.0f} s" for s, t in times.items())
    + f" = {sum(times.values()):.0f} s of training; {count} held-out questions\n"
  )
  print("| strategy | " + " | ".join(f"recall@{k} | hit@{k}" for k in KS) + " |")
  print("|---|" + "---|---|" * len(KS))
  for name, row in table.items():
    cells = [f"{row[k][0]:.3f} | {row[k][1]:.3f}" if k in row else "  |  " for k in KS]
    print(f"| {name} | " + " | ".join(cells) + " |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--heads", default="frame_query,query_mlp")
  parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  parser.add_argument(
    "--config_arg", default="", help="more configs/needle.py arguments: other_question_weight=1"
  )
  parser.add_argument(
    "--stages", default="1,2", help="1 measures stage 1 alone (a quicker look, not the target)"
  )
  args = parser.parse_args()
  from absl import flags

  flags.FLAGS(["bench_learning"])
  from frameselect_jax import jsonl
  from frameselect_jax.api import FrameSelector

  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.abspath(args.workdir or tmp)
    needle_dir = os.path.join(root, "needle_data")
    print(f"{os.cpu_count()} CPU cores; runs in {root}", flush=True)
    for head in args.heads.split(","):
      print(f"training configs/needle.py with head={head}", flush=True)
      stages = tuple(int(s) for s in args.stages.split(","))
      times = train_both_stages(head, os.path.join(root, head), needle_dir, args.config_arg, stages)
      selector = FrameSelector.from_checkpoint(os.path.join(root, head, f"stage{stages[-1]}"))
      items = jsonl.read(os.path.join(needle_dir, "test.jsonl"))
      table = evaluate(selector, needle_dir, items)
      print_table(head, times, table, len(items))


if __name__ == "__main__":
  main()
