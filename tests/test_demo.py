"""The main job's machinery (`frameselect demo --small`): every stage runs through the real
commands, in order, on a few videos and steps, and writes what the next one reads. (The full
demo, with its accuracy targets, is what `make demo` runs: benchmarks/results_demo.md.)"""

import json
import subprocess
import sys

import pytest
from train_testlib import REPO, env


@pytest.mark.slow
def test_the_main_job_runs_every_stage_end_to_end(tmp_path):
  out = tmp_path / "demo"
  proc = subprocess.run(
    [sys.executable, "-m", "frameselect_jax.cli", "demo", "--small", f"--out={out}"],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  for stage in ("generate", "label", "build", "train stage 1", "train stage 2", "evaluate"):
    assert f"{stage}" in proc.stdout
  # Each stage's output, as the next one read it.
  assert len((out / "labels" / "train.jsonl").read_text().splitlines()) == 16 * 3
  assert (out / "tfds" / "frameselect_records" / "needle_demo").is_dir()
  for stage in (1, 2):
    assert (out / "workdirs" / f"stage{stage}" / "checkpoints").is_dir()
  report = json.loads((out / "eval" / "report.json").read_text())
  strategies = {r["strategy"] for r in report["table"]}
  assert strategies == {"uniform", "random", "pixel_diff", "top_k", "nms_greedy"}
  assert {r["k"] for r in report["table"]} == {2, 4, 8}
  assert report["questions"] == 8 * 3
  assert (out / "eval" / "accuracy_vs_frames.png").stat().st_size > 0
  assert (out / "selection.png").stat().st_size > 0
  assert "nms_greedy - uniform at k=4" in proc.stdout and "stage times:" in proc.stdout


def test_the_full_demo_trains_as_many_steps_as_the_needle_config_says(monkeypatch):
  from configs import needle
  from frameselect_jax import demo

  monkeypatch.chdir(REPO)
  expected = tuple(needle.get_config(f"stage={s}").train.num_steps for s in (1, 2))
  assert demo._needle_steps() == expected
