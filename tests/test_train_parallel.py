"""Scale-out gives the same training: a (2, 2, 2) mesh over 8 simulated CPU devices matches
one device, and two processes joined by jax.distributed on loopback (4 devices each, CPU
collectives) match one process with 8 devices. Compared: every step's loss and the
parameters of the final checkpoint (written cooperatively by both processes)."""

import os
import socket

import jax
import numpy as np
from train_testlib import losses, read_metrics, run_train, start_train

from frameselect_jax import checkpoint as ckpt

# float32 compute so that a different reduction order stays within ~1e-6.
COMMON = [
  "--config.train.num_steps=3",
  "--config.model.dtype=float32",
  "--config.model.frozen_dtype=float32",
  "--config.train.warmup_fraction=0",
  "--config.train.lr=1e-3",
  "--config.checkpoint.every_steps=3",
]
MESH_222 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
CONFIG = "configs/stage1.py:tiny"


def assert_same_training(workdir_a, workdir_b):
  loss_a, loss_b = losses(workdir_a), losses(workdir_b)
  assert sorted(loss_a) == sorted(loss_b) == [1, 2, 3]
  np.testing.assert_allclose(
    [loss_a[s] for s in (1, 2, 3)], [loss_b[s] for s in (1, 2, 3)], rtol=2e-5
  )
  params_a = ckpt.load_params_numpy(os.path.join(workdir_a, "checkpoints"), 3)
  params_b = ckpt.load_params_numpy(os.path.join(workdir_b, "checkpoints"), 3)
  assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), params_a, params_b
  )


def test_mesh_222_on_8_devices_matches_one_device(tmp_path):
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  run_train(CONFIG, one, *COMMON, devices=1)
  run_train(CONFIG, eight, *COMMON, *MESH_222, devices=8)
  start = [m for m in read_metrics(eight) if m.get("event") == "start"][0]
  assert start["devices"] == 8 and start["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert_same_training(one, eight)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback_match_one_process_with_8_devices(tmp_path):
  single, joined = str(tmp_path / "single"), str(tmp_path / "joined")
  port = free_port()
  workers = [
    start_train(
      CONFIG,
      joined,
      *COMMON,
      *MESH_222,
      *[
        f"--config.distributed.{k}={v}"
        for k, v in (
          ("initialize", True),
          ("coordinator_address", f"127.0.0.1:{port}"),
          ("num_processes", 2),
          ("process_id", pid),
        )
      ],
      devices=4,
    )
    for pid in (0, 1)
  ]
  run_train(CONFIG, single, *COMMON, *MESH_222, devices=8)
  for worker in workers:
    # a hang guard only: three trainers share two cores with the other test worker
    _, stderr = worker.communicate(timeout=600)
    assert worker.returncode == 0, stderr[-5000:]
  start = [m for m in read_metrics(joined) if m.get("event") == "start"][0]
  assert start["processes"] == 2 and start["devices"] == 8
  # Each process saved its own data-iterator position next to the shared arrays.
  data_dir = os.path.join(joined, "checkpoints", "3", "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  assert_same_training(single, joined)
