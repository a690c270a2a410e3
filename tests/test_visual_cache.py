"""The visual-token cache: keys made of the candidates' content (never a path or a video
name), files written and read back, damaged files never loaded, each entry encoded once, and
a cache directory keyed so that changed vision weights never read stale tokens. The trainer
re-encodes a dataset rebuilt in place and reuses one that merely moved."""

import json
import os
import shutil

import numpy as np
import pytest
from train_testlib import run_train

from configs import stage1
from frameselect_jax import experiment, records, synthetic, visual_cache
from train import trainer


def _record(video_id="v", value=3, jpeg=False, n=4, size=8):
  frames = np.full((n, size, size, 3), value, np.uint8)
  record = {
    "video_id": video_id,
    "timestamps": np.arange(n, dtype=np.float32),
    "valid": np.ones(n, bool),
  }
  if jpeg:
    record["video"] = records.encode_jpeg_frames(frames)
  else:
    record["frames"] = frames
  return record


def test_content_key_covers_the_candidates_and_nothing_else():
  key = visual_cache.content_key(_record(), 8)
  assert key == visual_cache.content_key(_record(video_id="another name"), 8)
  different = [
    _record(value=4),  # other pixels
    dict(_record(), timestamps=np.arange(4, dtype=np.float32) + 8),  # another span
    dict(_record(), valid=np.array([1, 1, 1, 0], bool)),
    _record(n=5),
    _record(jpeg=True),  # other stored bytes
  ]
  keys = {visual_cache.content_key(r, 8) for r in different}
  assert len(keys) == len(different) and key not in keys
  assert visual_cache.content_key(_record(), 16) != key  # resized to another image size
  jpeg = visual_cache.content_key(_record(jpeg=True), 8)
  assert jpeg == visual_cache.content_key(_record(jpeg=True, video_id="x"), 8)


def test_put_get_round_trip_and_damaged_files_are_never_loaded(tmp_path):
  cache = visual_cache.VisualTokenCache(str(tmp_path / "cache"))
  a, b = np.arange(24, dtype=np.float32).reshape(2, 3, 4), -np.ones((2, 3, 4), np.float32)
  ka, kb = "ab" * 20, "cd" * 20
  cache.put(ka, a)
  cache.put(kb, b)
  np.testing.assert_array_equal(cache.get(ka), a)
  np.testing.assert_array_equal(cache.get(kb), b)
  assert not [f for f in os.listdir(cache.directory) if ".tmp-" in f]  # atomic writes
  with pytest.raises(KeyError, match="missing"):
    cache.get("ef" * 20)
  with pytest.raises(ValueError, match="hex digest"):
    cache.path("../escape")
  # Truncated (a killed writer), then one flipped byte (a bad disk): absent, never loaded.
  blob = open(cache.path(ka), "rb").read()
  for damaged in (blob[: len(blob) // 2], blob[:-1], blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]):
    open(cache.path(ka), "wb").write(damaged)
    assert cache.load(ka) is None
    with pytest.raises(KeyError, match="damaged"):
      cache.get(ka)


def test_fill_encodes_each_missing_or_damaged_entry_once(tmp_path):
  cache = visual_cache.VisualTokenCache(str(tmp_path))
  done, broken, x, y = "d0" * 20, "b0" * 20, "a1" * 20, "a2" * 20
  cache.put(done, np.zeros((2, 1, 1), np.float32))
  cache.put(broken, np.zeros((2, 1, 1), np.float32))
  with open(cache.path(broken), "r+b") as f:
    f.truncate(30)
  calls = []

  def encode(frames):
    calls.append(frames.shape)
    return frames.mean(axis=(2, 3, 4), keepdims=True)[..., 0].astype(np.float32)

  frames = lambda value: lambda: np.full((2, 4, 4, 3), value, np.uint8)
  videos = [(x, frames(3)), (done, frames(9)), (x, frames(5)), (y, frames(7)), (broken, frames(1))]
  assert visual_cache.fill(cache, videos, encode, show_progress=False) == (3, 1)
  assert calls == [(1, 2, 4, 4, 3)] * 3
  np.testing.assert_array_equal(cache.get(x), np.full((2, 1, 1), 3.0))
  np.testing.assert_array_equal(cache.get(done), np.zeros((2, 1, 1)))
  np.testing.assert_array_equal(cache.get(broken), np.full((2, 1, 1), 1.0))


def test_cache_directory_changes_with_the_vision_weights(tmp_path):
  vision_dir = tmp_path / "siglip"
  vision_dir.mkdir()
  (vision_dir / "model.safetensors").write_bytes(b"weights one")
  config = stage1.get_config("tiny")
  config.model.vision_dir = str(vision_dir)
  selector_cfg = experiment.selector_config(
    dict(llm="tiny", vision="tiny", num_candidates=16, pool_grid=3)
  )
  first = trainer.cache_directory(config, selector_cfg, str(tmp_path / "work"))
  assert first == trainer.cache_directory(config, selector_cfg, str(tmp_path / "work"))
  (vision_dir / "model.safetensors").write_bytes(b"weights two, same path")
  assert trainer.cache_directory(config, selector_cfg, str(tmp_path / "work")) != first
  config.model.dtype = "float32" if config.model.dtype != "float32" else "bfloat16"
  assert trainer.cache_directory(config, selector_cfg, str(tmp_path / "work")) != first
  # Where the data lives does not enter it: the files are keyed by content.
  config.data.train_path = "/elsewhere/train.array_record"
  config.data.eval_path = "/elsewhere/val.array_record"
  assert trainer.cache_directory(config, selector_cfg, str(tmp_path / "work")) == (
    trainer.cache_directory(config, selector_cfg, str(tmp_path / "work"))
  )


def _write_dataset(folder, seed):
  """8 training and 4 held-out needle records, each its own video, named clip-i / heldout-i
  whatever the seed: the same names for other content."""
  made = synthetic.needle_records(12, 16, 56, questions_per_video=1, seed=seed)
  for i, r in enumerate(made):
    r["video_id"] = f"clip-{i}" if i < 8 else f"heldout-{i - 8}"
  os.makedirs(folder, exist_ok=True)
  train = records.write_array_record(os.path.join(folder, "train.array_record"), made[:8])
  held_out = records.write_array_record(os.path.join(folder, "val.array_record"), made[8:])
  return train, held_out


def _train_on(folder, workdir):
  """Two steps of stage 1 tiny (frozen tower, cached tokens) on the dataset in `folder`;
  returns the start event's cache counts and the cache directory."""
  proc = run_train(
    "configs/stage1.py:tiny",
    str(workdir),
    "--config.data.source=array_record",
    f"--config.data.train_path={os.path.join(folder, 'train.array_record')}",
    f"--config.data.eval_path={os.path.join(folder, 'val.array_record')}",
    "--config.data.global_batch_size=4",
    "--config.train.num_steps=2",
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    start = next(e for e in map(json.loads, f) if e.get("event") == "start")
  assert "videos encoded" in proc.stderr
  return (start["visual_cache_encoded"], start["visual_cache_reused"])


def test_trainer_reencodes_a_rebuilt_dataset_and_reuses_a_moved_one(tmp_path):
  runs = tmp_path / "runs"  # the workdirs sit side by side: one cache beside them
  data = str(tmp_path / "data")
  _write_dataset(data, seed=0)
  assert _train_on(data, runs / "first") == (12, 0)
  (cache_dir,) = [os.path.join(runs / "visual_cache", d) for d in os.listdir(runs / "visual_cache")]
  first_files = set(os.listdir(cache_dir))
  assert len(first_files) == 12 and not any(f.startswith(("clip", "heldout")) for f in first_files)

  _write_dataset(data, seed=1)  # rebuilt in place: same paths, same names, other videos
  assert _train_on(data, runs / "rebuilt") == (12, 0)
  files = set(os.listdir(cache_dir))
  assert len(files) == 24 and first_files < files

  moved = str(tmp_path / "moved")
  shutil.copytree(data, moved)
  shutil.rmtree(data)
  # One entry cut short, as a writer killed mid-file leaves it: recomputed, never loaded.
  cache = visual_cache.VisualTokenCache(cache_dir)
  key = sorted(files - first_files)[0]
  fresh = cache.get(key[: -len(".npy")])
  with open(os.path.join(cache_dir, key), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(cache_dir, key)) // 2)
  assert _train_on(moved, runs / "moved") == (1, 11)
  np.testing.assert_array_equal(cache.get(key[: -len(".npy")]), fresh)
