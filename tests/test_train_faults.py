"""Faults: a run killed with SIGKILL resumes from its last checkpoint and reproduces the
uninterrupted run's later losses exactly; SIGTERM (preemption) checkpoints before exiting;
a non-finite loss stops the run naming the step and leaves the last good checkpoint intact."""

import os
import signal
import time

import jax
import numpy as np
from train_testlib import losses, read_metrics, run_train, start_train

from frameselect_jax import checkpoint as ckpt

CONFIG = "configs/stage1.py:tiny"
STEPS = 24
RUN = [
  f"--config.train.num_steps={STEPS}",
  "--config.checkpoint.every_steps=4",
  "--config.train.lr=1e-3",
]


def wait_for(condition, process, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(
        f"training exited early ({process.returncode}):\n{process.stderr.read()[-5000:]}"
      )
    if time.time() > deadline:
      process.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.05)


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  run_train(CONFIG, straight, *RUN)
  expected = losses(straight)
  assert sorted(expected) == list(range(1, STEPS + 1))

  process = start_train(CONFIG, killed, *RUN)
  checkpoints = os.path.join(killed, "checkpoints")
  wait_for(lambda: (ckpt.latest_step(checkpoints) or 0) >= 4, process)
  process.send_signal(signal.SIGKILL)  # no chance to clean up, maybe mid-save
  process.wait()
  resume_from = ckpt.latest_step(checkpoints)
  assert 4 <= resume_from < STEPS

  proc = run_train(CONFIG, killed, *RUN)
  assert f"resumed from the checkpoint of step {resume_from}" in proc.stderr
  resumed = [m for m in read_metrics(killed) if m.get("event") == "resume"]
  assert [m["step"] for m in resumed] == [resume_from]
  got = losses(killed)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(resume_from + 1, STEPS + 1):  # bit for bit: same data order, same state
    assert got[step] == expected[step], (step, got[step], expected[step])


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
  workdir = str(tmp_path / "run")
  args = [*RUN, "--config.checkpoint.every_steps=1000"]  # same programs as above: cached
  process = start_train(CONFIG, workdir, *args)
  wait_for(lambda: len(losses(workdir)) >= 2, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  preempted = [m for m in read_metrics(workdir) if m.get("event") == "preempted"]
  assert len(preempted) == 1
  stop_step = preempted[0]["step"]
  assert 2 <= stop_step < STEPS  # no periodic checkpoint was due: this one is the preemption's
  assert ckpt.latest_step(os.path.join(workdir, "checkpoints")) == stop_step
  run_train(CONFIG, workdir, *args)  # resumes there and finishes
  assert [m["step"] for m in read_metrics(workdir) if m.get("event") == "resume"] == [stop_step]
  assert max(losses(workdir)) == STEPS


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")
  # A learning rate of 1e30 makes the weights huge after one update; the next forward
  # pass overflows.
  proc = run_train(
    CONFIG,
    workdir,
    "--config.train.num_steps=10",
    "--config.train.lr=1e30",
    "--config.train.warmup_fraction=0",
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.keep=10",
    check=False,
  )
  assert proc.returncode != 0
  assert "FloatingPointError: non-finite training state at step 2" in proc.stderr, proc.stderr[
    -3000:
  ]
  assert "the last good checkpoint is step 1" in proc.stderr
  assert ckpt.latest_step(checkpoints) == 1
  assert sorted(os.listdir(checkpoints)) == ["1"]  # nothing half-written after it
  params = ckpt.load_params_numpy(checkpoints, 1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
