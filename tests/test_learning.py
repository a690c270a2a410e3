"""The selector learns: trained from scratch on generated needle videos (real mp4 files
decoded through video.py), it finds the frames a question asks about in held-out videos,
far better than uniform sampling. Seeded and deterministic; no timing is asserted."""

import os

import numpy as np
import pytest
from train_testlib import losses, read_metrics, run_train

from frameselect_jax import jsonl, selection, synthetic
from frameselect_jax.api import FrameSelector

# A smaller needle benchmark and a shorter schedule than configs/needle.py's.
SMALL = [
  "--config.data.needle.train_videos=64",
  "--config.data.needle.test_videos=16",
  "--config.validation.every_steps=0",
  "--config.checkpoint.every_steps=1000",
]


@pytest.mark.slow
def test_the_selector_learns_to_find_the_asked_needle(tmp_path):
  needle_dir = str(tmp_path / "needle_data")
  stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
  run_train(
    "configs/needle.py:stage=1",
    stage1,
    *SMALL,
    f"--config.data.needle.dir={needle_dir}",
    "--config.train.num_steps=160",
    timeout=600,
  )
  final = [m for m in read_metrics(stage1) if "validation/recall_at_4" in m][-1]
  # Held-out videos: NMS over the trained scores against uniform sampling (the needles are
  # too short for uniform picks to find: 4 picks of 32 candidates).
  assert final["validation/uniform_recall_at_4"] < 0.3
  assert final["validation/recall_at_4"] > final["validation/uniform_recall_at_4"] + 0.35, final
  assert final["validation/oracle_recall_at_4"] == 1.0
  # Each held-out question has the video's two other needles to avoid (16 videos x 3).
  assert final["validation/other_questions"] == 48
  assert 0.0 <= final["validation/other_question_hit_at_4"] <= 1.0
  # uniform picks land on another question's needle about twice as often as on the asked one
  assert final["validation/uniform_other_question_hit_at_4"] >= final["validation/uniform_hit_at_4"]

  # Stage 2 (LoRA) starts from stage 1: its checkpoint carries the backbone stage 1 trained,
  # so the inference API rebuilds the trained selector from it alone.
  run_train(
    "configs/needle.py:stage=2",
    stage2,
    *SMALL,
    f"--config.data.needle.dir={needle_dir}",
    f"--config.train.init_from={stage1}/checkpoints",
    "--config.train.num_steps=8",
    timeout=600,
  )
  assert len(losses(stage2)) == 8
  selector = FrameSelector.from_checkpoint(stage2)
  items = jsonl.read(os.path.join(needle_dir, "test.jsonl"))
  results = selector.select_many(
    [(os.path.join(needle_dir, it["video"]), it["question"], it["options"]) for it in items],
    k=4,
    batch_size=16,
  )
  relevant = np.stack(
    [
      synthetic.candidate_relevance(it, r.candidate_frame_indices) > 0
      for it, r in zip(items, results)
    ]
  )
  chosen = np.stack(
    [np.pad(r.indices, (0, 4 - len(r.indices)), constant_values=-1) for r in results]
  )
  uniform = selection.select_batch("uniform", None, np.stack([r.valid for r in results]), 4)
  api_recall = float(np.nanmean(selection.recall_at_k(chosen, relevant)))
  uniform_recall = float(np.nanmean(selection.recall_at_k(uniform, relevant)))
  assert api_recall > uniform_recall + 0.35, (api_recall, uniform_recall)
