"""The pod-run planner (`python -m train.plan`) on the tiny config and a small topology: the
largest batch it finds fits and the next size up does not, a second run compiles nothing, the
reports are written and read back, and the linear memory model holds against compiles.

Compiles for TPU from this CPU host (libtpu, no TPU). The chip's HBM is set small
(--hbm_gib) so that the tiny model's largest batch is a few examples per replica."""

import importlib.util
import json
import subprocess
import sys

import pytest
from train_testlib import REPO, env

from train import plan

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e .[tpu])",
)

HBM_GIB = 0.03  # ~31 MiB chips: the tiny stage-2 step fits a handful of examples per replica
ARGS = (
  "--config=configs/stage2.py:tiny",
  "--topologies=v5e:2x2",
  "--meshes=4:1:1,2:1:2",
  "--remats=none,block",
  f"--hbm_gib={HBM_GIB}",
  "--headroom=0.1",
  "--max_per_replica=64",
)


def run_plan(out, *extra):
  return subprocess.run(
    [sys.executable, "-m", "train.plan", *ARGS, f"--out={out}", *extra],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan")
  first = run_plan(out)
  assert first.returncode == 0, first.stderr[-4000:]
  report = json.loads((out / "plan.json").read_text())
  second = run_plan(out)
  assert second.returncode == 0, second.stderr[-4000:]
  return out, report, json.loads((out / "plan.json").read_text()), first


def test_mesh_shapes_are_the_factorisations_the_heads_allow():
  from frameselect_jax import experiment

  cfg = experiment.selector_config(dict(llm="qwen2.5-1.5b", vision="siglip-so400m-patch14-384"))
  meshes = plan.mesh_shapes(16, cfg, cached=True)
  # Qwen2.5-1.5B: 12 query heads, 2 key-value heads and an MLP of 8960 allow tensor 1 and 2
  assert {m.tensor for m in meshes} == {1, 2}
  assert all(m.data * m.fsdp * m.tensor == 16 for m in meshes)
  assert len(meshes) == 5 + 4 and len(set(meshes)) == len(meshes)
  # the vision tower (16 heads, MLP 4304) runs when its tokens are not cached
  assert {m.tensor for m in plan.mesh_shapes(16, cfg, cached=False)} == {1, 2}


def test_the_search_finds_the_boundary_on_a_linear_memory_model():
  """The search itself, on made-up compiles: memory 10 + 3 b per replica, limit 90 -> 26."""
  calls = []

  def compile_point(topology, mesh, remat, global_batch):
    calls.append(global_batch)
    b = global_batch // mesh.replicas
    return {"total_bytes": 10.0 + 3.0 * b + (0.5 if b > 20 else 0.0), "global_batch": global_batch}

  found = plan.search_candidate(
    compile_point, "t", plan.Mesh(2, 1, 1), "none", lambda r: 90.0, cap=1000
  )
  assert found["predicted"] == 26  # (90 - 10) / 3, from batches 1 and 2
  assert found["largest"] == 26  # 88.5 fits; 27 needs 91.5
  assert calls == [2, 4, 52, 54]  # global batches: two small, the prediction, the one above


def test_a_wrong_prediction_is_corrected_within_the_known_bounds():
  """Memory that bends upward (a quadratic term): the first prediction does not fit."""

  def compile_point(topology, mesh, remat, global_batch):
    b = global_batch // mesh.replicas
    return {"total_bytes": 10.0 + 3.0 * b + 0.05 * b * b, "global_batch": global_batch}

  found = plan.search_candidate(
    compile_point, "t", plan.Mesh(1, 1, 1), "none", lambda r: 90.0, cap=1000
  )
  fits = lambda b: 10.0 + 3.0 * b + 0.05 * b * b <= 90.0
  largest = found["largest"]
  assert fits(largest) and not fits(largest + 1)
  assert largest + 1 in found["points"] and len(found["points"]) <= 8


@needs_libtpu
def test_the_largest_batch_fits_and_the_next_does_not(planned):
  _, report, _, first = planned
  p = report["topologies"]["v5e:2x2"]
  limit = (1 - 0.1) * HBM_GIB * 1024**3
  assert p["chips"] == 4 and len(p["candidates"]) == 4
  for cand in p["candidates"]:
    largest = cand["largest_per_replica"]
    assert largest and largest >= 2, cand
    points = cand["points"]
    assert points[str(largest)]["fits"] and points[str(largest)]["memory_per_chip_bytes"] <= limit
    above = points[str(largest + 1)]
    assert not above["fits"] and above["memory_per_chip_bytes"] > limit
    # the global batch is a multiple of the batch axes (data x fsdp)
    data, fsdp, _ = (int(x) for x in cand["mesh"].split("x"))
    assert cand["best"]["global_batch"] == largest * data * fsdp
    assert cand["best"]["examples_per_s"] == pytest.approx(
      cand["best"]["global_batch"] / cand["best"]["estimated_step_s"]
    )
  assert p["fastest"] in {f"{c['mesh']}/{c['remat']}" for c in p["candidates"]}
  assert p["compiles"] >= 4 * 4 and p["cached_results"] >= 0
  assert "planning" in first.stderr  # the progress bar


@needs_libtpu
def test_a_second_run_compiles_nothing(planned):
  _, first, second, _ = planned
  assert first["topologies"]["v5e:2x2"]["compiles"] > 0
  assert second["topologies"]["v5e:2x2"]["compiles"] == 0
  assert (
    second["topologies"]["v5e:2x2"]["candidates"] == first["topologies"]["v5e:2x2"]["candidates"]
  )


@needs_libtpu
def test_the_reports_are_written_and_read_back(planned):
  out, report, _, first = planned
  text = (out / "plan.md").read_text()
  assert text == plan.markdown(report)
  assert "## v5e:2x2 (4 chips)" in text and "**fastest**" in text
  assert "The config's default" in text
  assert (out / "examples_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert text.strip() in first.stdout


@needs_libtpu
def test_memory_grows_linearly_with_the_batch(planned):
  """The prediction from per-replica batches 1 and 2 against compiles at three more sizes
  (the planner's cache answers those it made)."""
  from ml_collections import config_flags  # noqa: F401 (configs import absl flags)

  from configs import stage2

  out, report, _, _ = planned
  cand = next(c for c in report["topologies"]["v5e:2x2"]["candidates"] if c["mesh"] == "4x1x1")
  compiler = plan.Compiler(stage2.get_config("tiny"), str(out / "compile_cache"), None)
  mesh = plan.Mesh(4, 1, 1)
  memory = {
    b: compiler("v5e:2x2", mesh, cand["remat"], 4 * b)["total_bytes"]
    for b in (1, 2, 3, 5, cand["largest_per_replica"])
  }
  intercept, slope = plan.linear_fit({1: memory[1], 2: memory[2]}, 2)
  assert slope > 0
  for b in (3, 5, cand["largest_per_replica"]):
    assert intercept + slope * b == pytest.approx(memory[b], rel=0.05), b
