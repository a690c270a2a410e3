"""Ahead-of-time compilation of the real train step for a TPU topology on this CPU host
(needs libtpu, which `make test` installs through the test extra)."""
import importlib.util
import json
import subprocess
import sys

import pytest

from train_testlib import REPO, env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e .[tpu])")


def compile_step(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "train.compile", *args], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=timeout)


def test_tiny_stage1_compiles_for_v5e_2x2(tmp_path):
  out = tmp_path / "report.json"
  proc = compile_step("--config=configs/stage1.py:tiny", "--topology=v5e:2x2",
                      f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report["chips"] == 4 and report["chip"] == "v5e"
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert set(report["tasks"]) == {"instruction", "importance"}  # stage 1 alternates both
  for task, r in report["tasks"].items():
    assert r["fits"] and 0 < r["total_bytes"] < r["hbm_bytes"]
    assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0
    # the donated params and optimizer state alias their outputs
    assert 0 < r["alias_bytes"] <= r["output_bytes"]
    assert r["model_flops"] > 0 and r["hardware_flops"] >= r["model_flops"]
    assert r["estimated_step_s"] == max(r["compute_bound_s"], r["memory_bound_s"], r["ici_bound_s"])
    assert 0 < r["implied_mfu"] <= 1
  for words in ("arguments", "temporaries", "FLOPs per step", "compute bound", "memory bound",
                "implied model-FLOPs utilisation", "fits"):
    assert words in proc.stdout


def test_a_step_too_big_for_the_chip_fails_and_names_the_numbers():
  # 32768 examples per chip of the tiny model need far more than a v5e's 15.75 GiB: the TPU
  # compiler refuses the program, and the report says by how much.
  proc = compile_step("--config=configs/stage2.py:tiny", "--topology=v5e:2x2",
                      "--config.data.global_batch_size=131072")
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert "DOES NOT FIT" in proc.stdout
  assert "error: the importance step does not fit the 15.75 GiB HBM of a v5e chip" in proc.stderr
  assert "Ran out of memory on HBM, the total memory required for HLO temporaries" in proc.stderr
