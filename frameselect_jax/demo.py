"""The main job (`make demo`, `frameselect demo`): the whole method, end to end, on a CPU.

1. generate the needle benchmark (real mp4 videos; train and test splits of disjoint videos);
2. label both splits through the labelling runner (`python -m data.label`), with the oracle
   labeller plus noise, behind the same interface as real pseudo-labels;
3. build the TFDS dataset (`python -m data.build`);
4. train the selector through the real trainer (`python -m train`, configs/needle.py): stage
   1, then stage 2 with LoRA, with checkpoints;
5. evaluate the test split through the real harness (`python -m eval`, configs/eval/needle.py)
   with the pixel-reading downstream model: uniform, random, pixel difference, top-k and
   greedy NMS at k = 2, 4 and 8;
6. print the summary and draw one test question's score curve with the chosen frames.

The stages run as the same commands a user runs, from the repository root, each in its own
process (the library never imports the stage folders). A second run reuses what the first
one finished: each command resumes, and a finished stage is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from frameselect_jax import errors

TRAIN_VIDEOS, TEST_VIDEOS = 256, 64  # configs/needle.py's needle benchmark
SMALL_VIDEOS = (16, 8)  # --small: the machinery only (tests)
N = 32  # configs/needle.py's candidates
LABEL_NOISE = (
  "--config.label.oracle.spatial_noise=0.1",
  "--config.label.oracle.temporal_flip=0.01",
)
KS = "(2,4,8)"
DATASET = "frameselect_records/needle_demo"


def _check_repository():
  missing = [d for d in ("configs", "data", "train", "eval") if not os.path.isdir(d)]
  if missing:
    raise errors.InputError(
      f"the demo runs the stage commands from the repository root; {os.getcwd()} lacks "
      f"{', '.join(missing)}/ (cd to the frameselect-jax checkout)"
    )


def _command(*args) -> list[str]:
  return [sys.executable, "-m", *args]


def _needle_steps() -> tuple[int, int]:
  """num_steps of configs/needle.py's stages 1 and 2, read by a command run from the
  repository root, as the trainer reads the config (the library imports no configs)."""
  code = (
    "from configs import needle; "
    "print(*(needle.get_config(f'stage={s}').train.num_steps for s in (1, 2)))"
  )
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"could not read configs/needle.py's steps: {done.stderr.strip()}")
  first, second = (int(v) for v in done.stdout.split())
  return first, second


def _run(stage: str, command: list[str]) -> None:
  done = subprocess.run(command)
  if done.returncode != 0:
    raise RuntimeError(f"stage '{stage}' failed with status {done.returncode}: {' '.join(command)}")


def _finished(workdir: str, steps: int) -> bool:
  from frameselect_jax import checkpoint

  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and (checkpoint.latest_step(directory) or 0) >= steps


def run(out: str = "demo_out", small: bool = False) -> dict:
  """Runs every stage (skipping finished ones); returns {stage: seconds} and the summary."""
  _check_repository()
  out = os.path.abspath(out)
  errors.check_can_create(out, "--out")
  os.makedirs(out, exist_ok=True)
  needle, labels, tfds_dir = (os.path.join(out, d) for d in ("needle", "labels", "tfds"))
  stage1, stage2 = (os.path.join(out, "workdirs", f"stage{s}") for s in (1, 2))
  steps = (30, 10) if small else _needle_steps()
  times = {}

  def stage(name, function):
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    function()
    times[name] = time.perf_counter() - start
    print(f"== {name}: {times[name]:.1f} s ==", flush=True)

  def generate():
    from frameselect_jax import synthetic

    train, test = SMALL_VIDEOS if small else (TRAIN_VIDEOS, TEST_VIDEOS)
    synthetic.write_needle_benchmark(needle, {"train": train, "test": test})

  def label():
    for split in ("train", "test"):
      _run(
        "label",
        _command(
          "data.label",
          "--config=configs/label.py:oracle",
          f"--config.label.root={needle}",
          f"--config.label.split={split}",
          f"--config.label.output={labels}/{split}.jsonl",
          f"--config.label.num_candidates={N}",
          "--config.label.image_size=64",
          *LABEL_NOISE,
        ),
      )

  def build():
    _run(
      "build",
      _command(
        "data.build",
        "--config=configs/build.py:tiny",
        f"--config.build.root={needle}",
        "--config.build.generate_needle=False",
        f"--config.build.labels={labels}/train.jsonl,{labels}/test.jsonl",
        "--config.build.splits=('train','test')",
        "--config.build.name=needle_demo",
        f"--config.build.data_dir={tfds_dir}",
        "--config.build.shard_size=64",
        f"--config.model.num_candidates={N}",
      ),
    )

  data = (
    "--config.data.source=tfds",
    f"--config.data.tfds_name={DATASET}",
    f"--config.data.tfds_dir={tfds_dir}",
    "--config.data.eval_split=test",
  )
  small_run = ("--config.validation.every_steps=0",) if small else ()

  def train(number):
    workdir = stage1 if number == 1 else stage2
    if _finished(workdir, steps[number - 1]):
      print(f"stage {number} already trained ({workdir})")
      return
    extra = (f"--config.train.init_from={stage1}/checkpoints",) if number == 2 else ()
    _run(
      f"train stage {number}",
      _command(
        "train",
        f"--config=configs/needle.py:stage={number}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={steps[number - 1]}",
        *data,
        *extra,
        *small_run,
      ),
    )

  def evaluate():
    _run(
      "evaluate",
      _command(
        "eval",
        f"--config=configs/eval/needle.py:checkpoint={stage2}/checkpoints",
        f"--config.root={needle}",
        f"--config.output={out}/eval",
        f"--config.ks={KS}",
      ),
    )

  def picture():
    _plot_one_question(needle, f"{stage2}/checkpoints", os.path.join(out, "selection.png"))

  stage("1. generate the needle benchmark", generate)
  stage("2. label it (oracle labeller, with noise)", label)
  stage("3. build the TFDS dataset", build)
  stage("4. train stage 1", lambda: train(1))
  stage("5. train stage 2 (LoRA)", lambda: train(2))
  stage("6. evaluate on the test split", evaluate)
  stage("7. draw one question", picture)
  summary = _summary(os.path.join(out, "eval", "report.json"))
  print(summary)
  print(
    "stage times: " + ", ".join(f"{name.split('. ')[1]} {t:.0f} s" for name, t in times.items())
  )
  print(f"outputs: {out}/eval/report.md, report.json, accuracy_vs_frames.png; {out}/selection.png")
  return {"times": times, "summary": summary}


def _summary(path: str) -> str:
  """The report's accuracy table (all items, 95% CI) and NMS against uniform."""
  with open(path) as f:
    report = json.load(f)
  rows = {(r["strategy"], r["k"]): r["all"] for r in report["table"]}
  strategies = sorted(
    {s for s, _ in rows}, key=["uniform", "random", "pixel_diff", "top_k", "nms_greedy"].index
  )
  ks = sorted({k for _, k in rows})
  lines = [f"\naccuracy on {report['questions']} test questions (95% bootstrap interval):"]
  lines.append(f"{'strategy':<12}" + "".join(f"{'k=' + str(k):>20}" for k in ks))
  for s in strategies:
    cells = [rows.get((s, k)) for k in ks]
    lines.append(
      f"{s:<12}"
      + "".join(
        f"{100 * c['accuracy']:>8.1f} [{100 * c['low']:4.1f}, {100 * c['high']:5.1f}]"
        if c
        else " " * 20
        for c in cells
      )
    )
  for p in report["paired"]:
    if p["strategy"] == "nms_greedy":
      lines.append(
        f"nms_greedy - uniform at k={p['k']}: {100 * p['difference']:+.1f} points "
        f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}], "
        f"McNemar p = {p['mcnemar']['p_value']:.2g}"
      )
  return "\n".join(lines)


def _plot_one_question(needle: str, checkpoint: str, path: str) -> None:
  from frameselect_jax import plot, videoqa
  from frameselect_jax.api import FrameSelector

  item = videoqa.load("needle", needle, "test")[0]
  selector = FrameSelector.from_checkpoint(checkpoint)
  result = selector.select(item.video, item.question, k=4, options=item.options)
  start, stop = item.extra["needle"]["seconds"]
  thumbnails = plot.load_thumbnails(item.video, result.frame_indices)
  plot.plot_selection(
    result,
    path,
    thumbnails,
    note=f"trained selector (demo stage 2); the asked card shows in [{start:.2f}, {stop:.2f}) s",
    spans=[(start, stop, "the asked card")],
  )
  picked = ", ".join(f"{t:.2f}" for t in result.timestamps)
  print(f"{item.qid}: {item.question} the selector picks {picked} s -> {path}")
