"""Experiment configs load with the paper's settings, and bad configs fail at start with a
clear message (before any model or data is built)."""

import importlib.util
import os
import re
import subprocess
import sys
import types

import pytest
from train_testlib import REPO, env

from frameselect_jax.models import presets
from train import trainer


def load(spec):
  """What `--config=configs/<spec>` gives: the file's get_config(arg), `path:arg` syntax."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
    "config_under_test", os.path.join(REPO, "configs", path)
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


@pytest.mark.parametrize(
  "spec, llm, tokens, stage",
  [
    ("stage1.py", "qwen2.5-1.5b", 9, 1),
    ("stage2.py", "qwen2.5-1.5b", 9, 2),
    ("ablation_llm.py:llm=0.5b,stage=1", "qwen2.5-0.5b", 9, 1),
    ("ablation_llm.py:llm=1.5b", "qwen2.5-1.5b", 9, 2),
    ("ablation_llm.py:llm=7b", "qwen2.5-7b", 9, 2),
    ("ablation_tokens.py:tokens=1", "qwen2.5-1.5b", 1, 2),
    ("ablation_tokens.py:tokens=25,stage=1", "qwen2.5-1.5b", 25, 1),
  ],
)
def test_paper_configs_use_real_presets(spec, llm, tokens, stage):
  config = load(spec)
  selector_cfg, ratio = trainer.check_config(config, runtime=False)
  assert config.model.llm == llm and config.stage == stage
  assert config.model.vision == "siglip-so400m-patch14-384"
  assert selector_cfg.tokens_per_frame == tokens and selector_cfg.num_candidates == 128
  assert selector_cfg.llm == presets.QWEN2[llm]
  assert config.model.dtype == "bfloat16" and config.model.remat == "block"
  if stage == 2:  # the paper: LoRA, importance only, lr 1e-5 with a cosine schedule, 5 epochs
    assert ratio == (0, 1) and config.train.lr == 1e-5
    assert config.train.schedule == "cosine" and config.train.epochs == 5
    assert config.train.init_from
  else:
    assert ratio == (1, 1) and config.train.epochs == 2


@pytest.mark.parametrize(
  "spec",
  [
    "stage1.py:tiny",
    "stage2.py:tiny",
    "ablation_llm.py:llm=0.5b,tiny",
    "ablation_tokens.py:tokens=25,tiny",
  ],
)
def test_tiny_variants_use_tiny_presets(spec):
  config = load(spec)
  trainer.check_config(config, runtime=False)
  assert config.model.llm == "tiny" and config.model.vision == "tiny"
  assert config.data.source == "synthetic" and config.data.tokenizer == "byte"


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument 'tokenz'"):
    load("ablation_tokens.py:tokenz=9")


def tiny(stage=1, **changes):
  config = load(f"stage{stage}.py:tiny")
  for dotted, value in changes.items():
    node = config
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_pool_grid_larger_than_patch_grid():
  with pytest.raises(trainer.ConfigError, match="pool_grid 8 must be in .*patch grid 7"):
    trainer.check_config(tiny(model__pool_grid=8))


def test_k_greater_than_n():
  with pytest.raises(
    trainer.ConfigError,
    match=r"validation.ks=\(2, 17\) must be frame budgets "
    r"in \[1, n=16\]",
  ):
    trainer.check_config(tiny(validation__ks=(2, 17)))


def test_a_boolean_config_argument_must_be_a_boolean():
  from configs import common

  assert common.parse_arg("tiny=no", tiny=True).tiny is False
  assert common.parse_arg("tiny=Yes", tiny=False).tiny is True
  with pytest.raises(ValueError, match="config argument 'tiny' is a boolean; 'ture' is none of"):
    common.parse_arg("tiny=ture", tiny=False)


def test_stage2_without_stage1_checkpoint(tmp_path):
  with pytest.raises(trainer.ConfigError, match="stage 2 needs a stage-1 checkpoint"):
    trainer.check_config(tiny(stage=2, train__init_from=str(tmp_path / "nothing")))
  with pytest.raises(trainer.ConfigError, match="set train.init_from"):
    trainer.check_config(tiny(stage=2, train__init_from=""))


def test_stage2_trains_importance_only():
  with pytest.raises(trainer.ConfigError, match="importance prediction only"):
    trainer.check_config(tiny(stage=2, train__task_ratio="1:1"), runtime=False)


@pytest.mark.parametrize("ratio", ["1", "a:b", "0:0", "-1:2"])
def test_bad_task_ratio(ratio):
  with pytest.raises(trainer.ConfigError, match="task_ratio"):
    trainer.check_config(tiny(train__task_ratio=ratio))


def test_task_ratio_alternates_batch_by_batch():
  assert [trainer.task_of_step(s, (1, 1)) for s in range(1, 5)] == ["instruction", "importance"] * 2
  assert [trainer.task_of_step(s, (1, 3)) for s in range(1, 9)] == (
    ["instruction"] + ["importance"] * 3
  ) * 2
  assert {trainer.task_of_step(s, (0, 1)) for s in range(1, 20)} == {"importance"}


def test_mesh_that_does_not_divide_the_devices():
  with pytest.raises(trainer.ConfigError, match="mesh: .*do not divide the 1 available devices"):
    trainer.make_mesh(tiny(mesh__data=3))


def mesh_of(data, fsdp, tensor):
  return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def test_batch_not_divisible_by_data_parallelism():
  with pytest.raises(
    trainer.ConfigError,
    match=r"global_batch_size=8 is not divisible by the data "
    r"parallelism data x fsdp = 3 x 1 = 3",
  ):
    trainer.check_batch(tiny(), mesh_of(3, 1, 1), process_count=1)
  with pytest.raises(trainer.ConfigError, match="not divisible by the 3 processes"):
    trainer.check_batch(tiny(), mesh_of(1, 1, 1), process_count=3)
  with pytest.raises(
    trainer.ConfigError, match="per-device batch 2 is not divisible by train.grad_accum_steps=4"
  ):
    trainer.check_batch(tiny(train__grad_accum_steps=4), mesh_of(2, 2, 1), process_count=1)
  trainer.check_batch(tiny(), mesh_of(2, 2, 2), process_count=2)  # 8 over data x fsdp = 4


def test_command_line_reports_config_errors(tmp_path):
  """`python -m train` prints the message and exits 2, with no traceback."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "train",
      "--config=configs/stage1.py:tiny",
      f"--workdir={tmp_path}",
      "--config.mesh.data=3",
    ],
    cwd=REPO,
    env=env(devices=2),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert (
    "config error: mesh: mesh sizes data=3 fsdp=1 tensor=1 do not divide the 2 available "
    "devices" in proc.stderr
  )
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "change, message",
  [
    (
      dict(num_candidates=8),
      r"timestamps has shape \(8,\), expected \(16,\) "
      r"\(model.num_candidates=16\)",
    ),
    (dict(question=""), r"has an empty question"),
    (dict(drop="question"), r"lacks fields \['question'\]"),
    (dict(image_size=32), r"frames are \(32, 32, 3\), the vision tower expects \(56, 56, 3\)"),
  ],
)
def test_data_that_cannot_fit_the_model_fails_before_training(tmp_path, change, message):
  """Another candidate count, another image size or a missing question: one config error
  naming the split, exit status 2, and no workdir written."""
  from frameselect_jax import records, synthetic

  recs = synthetic.needle_records(
    2, change.get("num_candidates", 16), change.get("image_size", 56), seed=0
  )
  for r in recs:
    if "question" in change:
      r["question"] = change["question"]
    if "drop" in change:
      del r[change["drop"]]
  path = records.write_array_record(str(tmp_path / "data" / "train.array_record"), recs * 4)
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "train",
      "--config=configs/stage1.py:tiny",
      f"--workdir={workdir}",
      "--config.data.source=array_record",
      f"--config.data.train_path={path}",
    ],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert re.search(
    "config error: the training split does not fit this config: .*" + message, proc.stderr
  ), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()
