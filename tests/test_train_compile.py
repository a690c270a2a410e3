"""Ahead-of-time compilation of the real train step for a TPU topology on this CPU host
(needs libtpu, which `make test` installs through the test extra)."""

import importlib.util
import json
import subprocess
import sys

import pytest
from train_testlib import REPO, env

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e .[tpu])",
)


def compile_step(*args, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "train.compile", *args],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@needs_libtpu
def test_tiny_stage1_compiles_for_v5e_2x2(tmp_path):
  out = tmp_path / "report.json"
  proc = compile_step("--config=configs/stage1.py:tiny", "--topology=v5e:2x2", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report["chips"] == 4 and report["chip"] == "v5e"
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert set(report["tasks"]) == {"instruction", "importance"}  # stage 1 alternates both
  for r in report["tasks"].values():
    assert r["fits"] and 0 < r["total_bytes"] < r["hbm_bytes"]
    # The tiny importance step keeps every temporary in on-chip VMEM: none left in HBM.
    assert r["temp_bytes"] >= 0 and r["argument_bytes"] > 0
    assert r["total_bytes"] == (
      r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    )
    # the donated params and optimizer state alias their outputs
    assert 0 < r["alias_bytes"] <= r["output_bytes"]
    assert r["model_flops"] > 0 and r["hardware_flops"] >= r["model_flops"]
    assert r["estimated_step_s"] == max(r["compute_bound_s"], r["memory_bound_s"], r["ici_bound_s"])
    # HBM traffic: at least AdamW reading and writing each fp32 trainable, its mu and nu; less
    # than what the compiler counts in every memory space; it sets the memory bound (v5e 819 GB/s)
    adamw_bytes = 2 * 3 * 4 * report["trainable_params"]
    assert adamw_bytes <= r["hbm_traffic_per_device"] < r["compiler_bytes_accessed_per_device"]
    assert r["memory_bound_s"] == pytest.approx(r["hbm_traffic_per_device"] / 819e9)
    assert 0 < r["implied_mfu"] <= 1
  for words in (
    "arguments",
    "temporaries",
    "FLOPs per step",
    "compute bound",
    "memory bound",
    "implied model-FLOPs utilisation",
    "fits",
  ):
    assert words in proc.stdout


@needs_libtpu
def test_a_cached_compile_is_read_back_not_recompiled(tmp_path):
  """--cache_dir keeps each program's compile under the hash of the lowered program: a second
  run reads the same figures back; a config that changes the program compiles anew."""
  args = ("--config=configs/stage2.py:tiny", "--topology=v5e:2x2", f"--cache_dir={tmp_path}/c")
  runs = []
  for extra in ((), (), ("--config.data.global_batch_size=16",)):
    out = tmp_path / f"report{len(runs)}.json"
    proc = compile_step(*args, *extra, f"--json_out={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs.append((json.loads(out.read_text())["tasks"]["importance"], proc.stdout))
  (first, _), (again, stdout), (bigger, _) = runs
  assert not first["cached"] and again["cached"] and not bigger["cached"]
  assert "from the cache" in stdout
  assert {k: v for k, v in again.items() if k != "cached"} == {
    k: v for k, v in first.items() if k != "cached"
  }
  assert bigger["argument_bytes"] > first["argument_bytes"]  # twice the batch in the arguments
  assert len(list((tmp_path / "c").glob("*.json"))) == 2


@needs_libtpu
def test_an_unchanged_config_and_code_is_not_lowered_again(tmp_path, monkeypatch):
  """compile_report remembers the program key of each step it lowered under the config's
  lowering_key (config, topology, source, versions, flags): the same config again reads its
  figures without tracing or lowering the step; changed code lowers again (and finds the
  program it already compiled); a changed config lowers and compiles anew."""
  import copy

  from ml_collections import config_flags  # noqa: F401 (configs import absl flags)

  from configs import stage2
  from train import aot

  config, cache = stage2.get_config("tiny"), str(tmp_path / "c")
  report = lambda c: aot.compile_report(copy.deepcopy(c), "v5e:2x2", cache)["tasks"]["importance"]
  first = report(config)
  lowered, program_key = [], aot.program_key
  monkeypatch.setattr(aot, "program_key", lambda *a: lowered.append(a) or program_key(*a))
  again = report(config)
  assert not lowered and again["cached"] and not first["cached"]
  assert {k: v for k, v in again.items() if k != "cached"} == {
    k: v for k, v in first.items() if k != "cached"
  }
  monkeypatch.setattr(aot, "source_fingerprint", lambda: "other code")
  code_changed = report(config)
  assert len(lowered) == 1 and code_changed["cached"]
  assert code_changed["program_key"] == first["program_key"]
  bigger = copy.deepcopy(config)
  bigger.data.global_batch_size = 16
  assert not report(bigger)["cached"] and len(lowered) == 2
  assert len(list((tmp_path / "c" / "lowered").glob("*.json"))) == 3
  # what else decides the lowering
  key = aot.lowering_key(config, "v5e:2x2")
  assert key != aot.lowering_key(config, "v5e:2x4")
  monkeypatch.setenv("XLA_FLAGS", "--xla_some_flag=1")
  assert key != aot.lowering_key(config, "v5e:2x2")


@needs_libtpu
def test_hbm_traffic_is_counted_through_the_gradient_accumulation_loop(tmp_path):
  # The accumulation loop carries no trip-count annotation: the count reads it off the loop.
  out = tmp_path / "report.json"
  proc = compile_step(
    "--config=configs/stage2.py:tiny",
    "--topology=v5e:2x2",
    "--config.train.grad_accum_steps=2",
    f"--json_out={out}",
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(out.read_text())["tasks"]["importance"]
  assert r["hbm_traffic_per_device"] is not None
  assert "of HBM traffic" in proc.stdout


@needs_libtpu
def test_a_step_too_big_for_the_chip_fails_and_names_the_numbers():
  # 32768 examples per chip of the tiny model need far more than a v5e's 15.75 GiB: the TPU
  # compiler refuses the program, and the report says by how much.
  proc = compile_step(
    "--config=configs/stage2.py:tiny",
    "--topology=v5e:2x2",
    "--config.data.global_batch_size=131072",
  )
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert "DOES NOT FIT" in proc.stdout
  assert "error: the importance step does not fit the 15.75 GiB HBM of a v5e chip" in proc.stderr
  assert "Ran out of memory on HBM, the total memory required for HLO temporaries" in proc.stderr


# A scheduled TPU module in the compiler's text form: an HBM parameter prefetched into VMEM
# (S(1)) by an async copy, an async slice of another, a fusion entirely in VMEM, one writing
# HBM, an in-place dynamic-update-slice into HBM, and a loop `for (i = 0; i < 3; i += 1)`
# whose body reads and writes HBM.
HLO = """HloModule jit_step, is_scheduled=true

%fused_negate (param_0: f32[256]) -> f32[256] {
  %param_0 = f32[256]{0} parameter(0)
  ROOT %negate.0 = f32[256]{0} negate(%param_0)
}

%fused_update (param_0.1: f32[1024], param_1.1: f32[256], param_2.1: s32[]) -> f32[1024] {
  %param_0.1 = f32[1024]{0} parameter(0)
  %param_1.1 = f32[256]{0} parameter(1)
  %param_2.1 = s32[] parameter(2)
  ROOT %dynamic-update-slice.0 = f32[1024]{0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2.1)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %fusion.9 = f32[256]{0} fusion(%x), kind=kLoop, calls=%fused_negate
  ROOT %tuple.9 = (s32[], f32[256]{0}) tuple(%next, %fusion.9)
}

%cond (p.1: (s32[], f32[256])) -> pred[] {
  %p.1 = (s32[], f32[256]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %three = s32[] constant(3)
  ROOT %compare.0 = pred[] compare(%i.1, %three), direction=LT
}

ENTRY %main (p0: f32[1024], p1: bf16[64,128]) -> f32[256] {
  %p0 = f32[1024]{0:T(1024)} parameter(0)
  %p1 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(1)
  %copy-start = (bf16[64,128]{1,0:T(8,128)(2,1)S(1)}, bf16[64,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%p1)
  %slice-start = ((f32[1024]{0:T(1024)}), f32[256]{0:T(256)S(1)}, s32[]{:S(2)}) slice-start(%p0), slice={[0:256]}
  %slice-done = f32[256]{0:T(256)S(1)} slice-done(%slice-start)
  %copy-done = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %fusion.1 = f32[256]{0:T(256)S(1)} fusion(%slice-done, %copy-done), kind=kLoop, calls=%fused_negate
  %fusion.2 = f32[256]{0:T(256)} fusion(%fusion.1), kind=kLoop, calls=%fused_negate
  %zero = s32[] constant(0)
  %fusion.3 = f32[1024]{0:T(1024)} fusion(%p0, %fusion.2, %zero), kind=kLoop, calls=%fused_update
  %tuple.1 = (s32[], f32[256]{0}) tuple(%zero, %fusion.2)
  %while.1 = (s32[], f32[256]{0}) while(%tuple.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[256]{0} get-tuple-element(%while.1), index=1
}
"""


def test_hbm_traffic_counts_only_hbm_buffers():
  from train import hlo_traffic

  prefetch = 64 * 128 * 2  # the whole bf16 parameter, read from HBM once
  slice_read = 256 * 4  # the slice, not the 1024-element source
  fusion_write = 256 * 4  # fusion.2's output; fusion.1 touches only VMEM
  update = 256 * 4 + 256 * 4 + 4  # writes the 256-float update (read from fusion.2) at %zero
  trip = 256 * 4 + 256 * 4 + 3 * 4  # reads and writes 256 floats; the counter's add
  loop = 3 * trip
  expected = prefetch + slice_read + fusion_write + update + loop
  assert hlo_traffic.hbm_bytes_accessed(HLO) == expected
  # without the compiler's annotation the trip count is read off the loop's shape
  unannotated = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  assert hlo_traffic.hbm_bytes_accessed(unannotated) == expected
  assert hlo_traffic.hbm_bytes_accessed(unannotated.replace("constant(3)", "constant(5)")) == (
    expected + 2 * trip
  )
  # a loop of a shape it cannot read gives no count rather than a wrong one
  assert hlo_traffic.hbm_bytes_accessed(unannotated.replace("direction=LT", "direction=NE")) is None
  assert (
    hlo_traffic.hbm_bytes_accessed(unannotated.replace("while(%tuple.1)", "while(%elsewhere)"))
    is None
  )


def test_the_program_key_does_not_depend_on_where_the_environment_lives():
  """A Pallas kernel's embedded bytecode names its source file under site-packages: two
  virtual environments must still give one program one text to hash."""
  import base64

  from train import aot

  def program(site_packages: str, shape: str = "f32") -> str:
    body = base64.b64encode(site_packages.encode() + b"/jax/flash_attention.py").decode()
    return (
      f'custom_call {{backend_config = "{{\\22body\\22: \\22{body}\\22}}", '
      f'kernel_name = "_flash_attention_kernel"}} : {shape}'
    )

  here = aot.portable_program_text(program("/work/.venv/lib/python3.11/site-packages"))
  assert here == aot.portable_program_text(program("/tmp/clone/.venv/lib/site-packages"))
  assert "_flash_attention_kernel" in here and here.endswith(": f32")
  assert aot.portable_program_text(program("/work/.venv", "bf16")) != here


def test_the_source_fingerprint_covers_the_code_that_traces_the_step(tmp_path):
  """An edit to the library or to the step's modules changes source_fingerprint (so lowering
  memos written by the old code are not read); an edit to the planner's or the compile
  command's own module, which reach the program only through the config, does not."""
  import os
  import shutil

  for package in ("frameselect_jax", "train"):
    shutil.copytree(
      os.path.join(REPO, package), tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
    )

  def fingerprint():
    return subprocess.run(
      [sys.executable, "-c", "from train import aot; print(aot.source_fingerprint())"],
      cwd=tmp_path,
      env={**env(), "PYTHONPATH": str(tmp_path)},
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()

  def edit(path):
    with open(tmp_path / path, "a") as f:
      f.write("\n# an edit\n")

  original = fingerprint()
  edit("train/plan.py")
  edit("train/compile.py")
  assert fingerprint() == original
  edit("train/step.py")
  after_step = fingerprint()
  assert after_step != original
  edit("frameselect_jax/__init__.py")
  assert fingerprint() not in (original, after_step)
