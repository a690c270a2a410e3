"""Helpers for the trainer tests: run `python -m train` in a subprocess (simulated devices,
a shared persistent compilation cache) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiled programs are reused across the test processes (and across test runs): the same
# tiny train step is compiled by many of these tests.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "frameselect_jax_test_compile_cache")
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# A small, fast stage-1 run on generated needle videos.
TINY = [
  "--config.data.synthetic_train_videos=16",
  "--config.data.synthetic_eval_videos=4",
  "--config.log.progress=False",
  "--config.validation.every_steps=0",
]


def env(devices: int = 1) -> dict:
  out = dict(os.environ)
  out.update(
    PYTHONPATH=REPO + os.pathsep + out.get("PYTHONPATH", ""),
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
  )
  return out


def train_command(config: str, workdir: str, *overrides: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "train",
    f"--config={config}",
    f"--workdir={workdir}",
    *TINY,
    *overrides,
  ]


def run_train(
  config: str,
  workdir: str,
  *overrides: str,
  devices: int = 1,
  timeout: int = 300,
  check: bool = True,
) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    train_command(config, workdir, *overrides),
    cwd=REPO,
    env=env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  return proc


def start_train(
  config: str, workdir: str, *overrides: str, devices: int = 1, extra_env: dict | None = None
) -> subprocess.Popen:
  return subprocess.Popen(
    train_command(config, workdir, *overrides),
    cwd=REPO,
    env={**env(devices), **(extra_env or {})},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # a line being written right now
      pass
  return out


def losses(workdir: str, key: str = "loss") -> dict[int, float]:
  """step -> loss; the last line of a step wins (a resumed run rewrites later steps)."""
  return {m["step"]: m[key] for m in read_metrics(workdir) if "step" in m and key in m}


def tensorboard_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] read back from the run's TensorBoard event files (TFRecord
  framing: length, its CRC, the Event proto, its CRC)."""
  import struct

  from tensorboardX.proto import event_pb2

  scalars: dict[str, list[tuple[int, float]]] = {}
  folder = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      while header := f.read(12):
        (length,) = struct.unpack("<Q", header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        for value in event.summary.value:
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars
