"""The train step itself: losses fall on the tiny config, the cached-visual-token path and the
ViT path agree, gradient accumulation equals one big batch, and stage 2 starts from stage 1."""

import os

import jax
import numpy as np
import pytest
from test_train_config import tiny
from train_testlib import losses, read_metrics, run_train, tensorboard_scalars

from frameselect_jax import checkpoint as ckpt
from frameselect_jax import experiment, input_pipeline, synthetic, video
from frameselect_jax import sharding as shd
from train import modeling, trainer
from train import step as step_lib


def build(config):
  mesh = shd.make_mesh(1, 1, 1, jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  graphdef, params, frozen, param_sh, frozen_sh = modeling.prepare(config, mesh, rules)
  return mesh, graphdef, params, frozen, param_sh, frozen_sh


def batch_of(config, count=8, seed=3):
  selector_cfg = experiment.selector_config(config.model)
  spec = trainer.example_spec(config, selector_cfg)
  tokenizer, eos = trainer.load_tokenizer(config)
  recs = synthetic.needle_records(
    count // 2, selector_cfg.num_candidates, selector_cfg.vision.image_size, seed=seed
  )
  examples = [
    input_pipeline.make_example(
      r, spec, tokenizer, eos_id=eos, vocab_size=selector_cfg.llm.vocab_size
    )
    for r in recs
  ]
  return spec, {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def one_step(config, graphdef, params, frozen, batch, task, *, accum=1, vision_abstract=None):
  tx, _ = step_lib.make_optimizer(config.train, 10)
  opt_state = tx.init(params)
  step = jax.jit(
    step_lib.make_train_step(
      graphdef, tx, task=task, accum_steps=accum, vision_abstract=vision_abstract
    )
  )
  fields = step_lib.step_fields(task, "visual" in batch)
  new_params, _, metrics = step(params, frozen, opt_state, {k: batch[k] for k in fields})
  return float(metrics["loss"]), jax.device_get(new_params)


def float32_tiny(**changes):
  # float32 compute so that equal math gives equal numbers to ~1e-6
  return tiny(
    model__dtype="float32",
    model__frozen_dtype="float32",
    train__warmup_fraction=0.0,
    train__lr=1e-3,
    **changes,
  )


@pytest.fixture(scope="module")
def float32_setup():
  config = float32_tiny()
  _, graphdef, params, frozen, _, _ = build(config)
  _, batch = batch_of(config)
  return config, graphdef, params, frozen, batch


def test_cached_visual_tokens_give_the_same_loss_as_running_the_vit(float32_setup):
  config, graphdef, params, frozen, batch = float32_setup
  # The cache path: encode once per video (as the trainer does), then drop the tower.
  encode = jax.jit(
    lambda frozen, frames: step_lib.merge_model(graphdef, params, frozen).encode_frames(
      video.normalize(frames)
    )
  )
  cached = dict(batch, visual=np.asarray(encode(frozen, batch["frames"])))
  del cached["frames"]
  vision_abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen["vision_tower"]
  )
  without_tower = {k: v for k, v in frozen.items() if k != "vision_tower"}
  for task in ("importance", "instruction"):
    loss_vit, params_vit = one_step(config, graphdef, params, frozen, batch, task)
    loss_cached, params_cached = one_step(
      config, graphdef, params, without_tower, cached, task, vision_abstract=vision_abstract
    )
    assert np.isfinite(loss_vit)
    np.testing.assert_allclose(loss_cached, loss_vit, rtol=1e-5, err_msg=task)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_cached, params_vit
    )


def test_other_question_weight_multiplies_only_the_hard_negatives(float32_setup):
  """BCE by hand: the negative part of a candidate that another question asks for (and this
  one does not) counts w times; positives, other negatives and the normaliser do not change."""
  config, graphdef, params, frozen, batch = float32_setup
  model = step_lib.merge_model(graphdef, params, frozen)
  batch = dict(batch)
  valid = batch["valid"]
  other = np.zeros_like(batch["labels"])
  other[:, ::3] = 1.0  # made-up: every third candidate is another question's
  batch["other_labels"] = other * valid
  plain, count, logits = step_lib.importance_sums(model, batch)
  weighted, count_w, _ = step_lib.importance_sums(
    model, batch, loss=step_lib.ImportanceLoss(other_question_weight=5.0)
  )
  x, y = np.asarray(logits, np.float64), batch["labels"].astype(np.float64)
  log_p, log_not_p = -np.logaddexp(0, -x), -np.logaddexp(0, x)
  hard = np.maximum(batch["other_labels"] - y, 0)
  expected = -(y * log_p + (1 + 4 * hard) * (1 - y) * log_not_p) * valid
  assert float(weighted) == pytest.approx(expected.sum(), rel=1e-5)
  assert float(plain) == pytest.approx((-(y * log_p + (1 - y) * log_not_p) * valid).sum(), rel=1e-5)
  assert float(weighted) > float(plain) and float(count_w) == float(count)


def test_label_smoothing_moves_the_targets_and_keeps_the_hard_negative_weight(float32_setup):
  """By hand: the BCE's targets become y (1 - e) + e / 2; the hard-negative weight still
  multiplies the negative part, and still picks the candidates by the unsmoothed labels."""
  config, graphdef, params, frozen, batch = float32_setup
  model = step_lib.merge_model(graphdef, params, frozen)
  batch = dict(batch)
  valid = batch["valid"]
  other = np.zeros_like(batch["labels"])
  other[:, 1::4] = 1.0
  batch["other_labels"] = other * valid
  loss = step_lib.ImportanceLoss(other_question_weight=3.0, label_smoothing=0.2)
  smoothed, count, logits = step_lib.importance_sums(model, batch, loss=loss)
  x, y = np.asarray(logits, np.float64), batch["labels"].astype(np.float64)
  t = 0.8 * y + 0.1
  log_p, log_not_p = -np.logaddexp(0, -x), -np.logaddexp(0, x)
  hard = np.maximum(batch["other_labels"] - y, 0)
  expected = -(t * log_p + (1 + 2 * hard) * (1 - t) * log_not_p) * valid
  assert float(smoothed) == pytest.approx(expected.sum(), rel=1e-5)


def test_listwise_weight_adds_the_softmax_cross_entropy_per_record(float32_setup):
  """By hand: each record adds w times the cross-entropy between its labels normalised to
  one and the softmax of its logits over its valid candidates, counted once per valid
  candidate; invalid candidates and a record without positives add nothing."""
  config, graphdef, params, frozen, batch = float32_setup
  model = step_lib.merge_model(graphdef, params, frozen)
  batch = dict(batch, valid=batch["valid"].copy(), labels=batch["labels"].copy())
  batch["valid"][0, -3:] = False  # fewer candidates in one record
  batch["labels"][1] = 0.0  # a record with no positive candidate
  plain, count, logits = step_lib.importance_sums(model, batch)
  listwise, count_l, _ = step_lib.importance_sums(
    model, batch, loss=step_lib.ImportanceLoss(listwise_weight=0.5)
  )
  x = np.asarray(logits, np.float64)
  valid, weight = batch["valid"], batch["weight"]
  y = np.where(valid, batch["labels"], 0.0).astype(np.float64)
  expected = 0.0
  for r in range(x.shape[0]):
    if y[r].sum() == 0:
      continue
    v = valid[r]
    log_softmax = x[r, v] - np.log(np.exp(x[r, v]).sum())
    expected += -(y[r, v] / y[r].sum() * log_softmax).sum() * v.sum() * weight[r]
  assert float(listwise) - float(plain) == pytest.approx(0.5 * expected, rel=1e-4)
  assert expected > 0 and float(count_l) == float(count)


def test_the_learning_rate_scales_with_the_batch():
  config = tiny()
  assert step_lib.scaled_lr(config.train, 512) == config.train.lr  # off by default
  config.train.lr, config.train.lr_reference_batch = 1e-4, 128
  config.train.lr_scaling = "linear"
  assert step_lib.scaled_lr(config.train, 512) == pytest.approx(4e-4)
  config.train.lr_scaling = "sqrt"
  assert step_lib.scaled_lr(config.train, 512) == pytest.approx(2e-4)
  schedule = step_lib.make_schedule(config.train, 100, global_batch=512)
  assert max(float(schedule(s)) for s in range(100)) == pytest.approx(2e-4, rel=1e-3)
  config.train.lr_reference_batch = 0
  with pytest.raises(ValueError, match="needs train.lr_reference_batch >= 1"):
    step_lib.scaled_lr(config.train, 512)


def test_gradient_accumulation_equals_one_big_batch(float32_setup):
  config, graphdef, params, frozen, batch = float32_setup
  batch = dict(batch, valid=batch["valid"].copy())
  batch["valid"][1, 10:] = False  # uneven valid counts: the loss is normalised over the batch
  loss_1, params_1 = one_step(config, graphdef, params, frozen, batch, "importance", accum=1)
  loss_4, params_4 = one_step(config, graphdef, params, frozen, batch, "importance", accum=4)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_4, params_1
  )


def test_only_the_heads_train_in_stage1_and_lora_joins_in_stage2():
  mesh = shd.make_mesh(1, 1, 1, jax.devices()[:1])
  rules = shd.LOGICAL_RULES
  _, params1, frozen1, _, _ = modeling.prepare_abstract(tiny(), mesh, rules)
  assert sorted(params1) == ["projector", "score_head", "score_query"]
  assert sorted(frozen1) == ["llm", "vision_tower"]
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params1))  # fp32 trainables
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(frozen1))  # bf16 backbone
  _, params2, frozen2, _, _ = modeling.prepare_abstract(tiny(stage=2), mesh, rules)
  lora = [path for path, _ in jax.tree_util.tree_flatten_with_path(params2["llm"])[0]]
  assert len(lora) == 2 * 7 * 3  # A and B of 7 projections in each of 3 blocks
  assert all(str(path[-1].key) in ("lora_a", "lora_b") for path in lora)
  assert sorted(params2) == ["llm", "projector", "score_head", "score_query"]
  assert "lora_a" not in str(jax.tree_util.tree_flatten_with_path(frozen2)[0])


def test_tiny_loss_falls_and_stage2_starts_from_stage1(tmp_path):
  """Stage 1 on a fixed small needle dataset: both task losses fall. Stage 2 then starts
  from stage 1's projector and heads, adds LoRA, and keeps the importance loss falling."""
  stage1 = str(tmp_path / "stage1")
  run_train(
    "configs/stage1.py:tiny",
    stage1,
    "--config.train.num_steps=32",
    "--config.train.lr=3e-3",
    "--config.checkpoint.every_steps=16",
  )
  importance = [v for s, v in sorted(losses(stage1, "loss/importance").items())]
  instruction = [v for s, v in sorted(losses(stage1, "loss/instruction").items())]
  assert len(importance) == len(instruction) == 16
  assert np.mean(importance[-4:]) < np.mean(importance[:4]) - 0.05, importance
  assert np.mean(instruction[-4:]) < np.mean(instruction[:4]) - 0.05, instruction
  metrics = read_metrics(stage1)
  step_lines = [m for m in metrics if "grad_norm" in m]
  assert {"lr", "grad_norm", "examples_per_s", "step_time_s"} <= set(step_lines[0])
  assert any(
    "validation/bce" in m and "validation/recall_at_4" in m and "validation/hit_at_4" in m
    for m in metrics
  )
  scalars = tensorboard_scalars(stage1)  # the same names and values as the JSONL
  assert {
    "loss/importance",
    "loss/instruction",
    "lr",
    "validation/recall_at_4",
    "validation/hit_at_4",
  } <= set(scalars)
  assert dict(scalars["loss/importance"]) == pytest.approx(losses(stage1, "loss/importance"))
  assert ckpt.latest_step(os.path.join(stage1, "checkpoints")) == 32

  stage2 = str(tmp_path / "stage2")
  run_train(
    "configs/stage2.py:tiny",
    stage2,
    "--config.train.num_steps=16",
    f"--config.train.init_from={stage1}/checkpoints",
    "--config.train.lr=3e-3",
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.keep=20",
  )
  first = ckpt.load_params_numpy(os.path.join(stage2, "checkpoints"), step=1)
  before = ckpt.load_params_numpy(os.path.join(stage1, "checkpoints"))
  # One Adam step moves each parameter by at most the learning rate (3e-3): stage 2 started
  # from stage 1's heads, not from a fresh init (which differs by ~0.02).
  for name in ("projector", "score_query", "score_head"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=3.01e-3, rtol=0), first[name], before[name]
    )
  assert "lora_a" in first["llm"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
  loss2 = [v for s, v in sorted(losses(stage2).items())]
  assert len(loss2) == 16 and np.mean(loss2[-4:]) < np.mean(loss2[:4])
  start = [m for m in read_metrics(stage2) if m.get("event") == "start"][0]
  assert (
    start["trainable_params"]
    > [m for m in read_metrics(stage1) if m.get("event") == "start"][0]["trainable_params"]
  )


def test_backbones_load_from_hugging_face_directories(tmp_path):
  """model.llm_dir / model.vision_dir: the frozen backbone is the checkpoint's (bf16 storage),
  LoRA and the heads are fresh, and a stage-2 step trains on it."""
  import torch
  from conftest import save_random_qwen2, save_random_siglip

  llm_dir, vision_dir = str(tmp_path / "qwen2"), str(tmp_path / "siglip")
  reference = save_random_qwen2(llm_dir, vocab_size=300)  # the byte tokenizer needs 258 ids
  save_random_siglip(vision_dir)
  config = tiny(stage=2, model__llm_dir=llm_dir, model__vision_dir=vision_dir)
  _, graphdef, params, frozen, _, _ = build(config)
  embed = reference.model.embed_tokens.weight.detach().to(torch.float32).numpy()
  np.testing.assert_array_equal(
    np.asarray(frozen["llm"]["model"]["embed_tokens"]["embedding"]),
    embed.astype(jax.numpy.bfloat16),
  )
  assert "lora_a" in params["llm"]["model"]["layers"][0]["self_attn"]["q_proj"]
  _, batch = batch_of(config)
  loss, _ = one_step(config, graphdef, params, frozen, batch, "importance")
  assert np.isfinite(loss) and 0.3 < loss < 2.0
