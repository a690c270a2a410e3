"""The visual-token cache: files written and read back, escaped ids kept distinct, each video
encoded once, and a cache directory keyed so that changed vision weights never read stale
tokens."""

import os

import numpy as np
import pytest

from configs import stage1
from frameselect_jax import experiment, visual_cache
from train import trainer


def test_put_get_round_trip_and_distinct_escaped_ids(tmp_path):
  cache = visual_cache.VisualTokenCache(str(tmp_path / "cache"))
  a, b = np.arange(24, dtype=np.float32).reshape(2, 3, 4), -np.ones((2, 3, 4), np.float32)
  cache.put("clips/a b.mp4", a)
  cache.put("clips_a_b.mp4", b)  # what "clips/a b.mp4" escapes to
  np.testing.assert_array_equal(cache.get("clips/a b.mp4"), a)
  np.testing.assert_array_equal(cache.get("clips_a_b.mp4"), b)
  assert "clips/a b.mp4" in cache and "other" not in cache
  assert not [f for f in os.listdir(cache.directory) if ".tmp-" in f]  # atomic writes
  with pytest.raises(KeyError, match="other"):
    cache.get("other")
  with pytest.raises(ValueError, match="empty"):
    cache.path("")


def test_fill_encodes_each_missing_video_once(tmp_path):
  cache = visual_cache.VisualTokenCache(str(tmp_path))
  cache.put("done", np.zeros((2, 1, 1), np.float32))
  calls = []

  def encode(frames):
    calls.append(frames.shape)
    return frames.mean(axis=(2, 3, 4), keepdims=True)[..., 0].astype(np.float32)

  frames = lambda value: lambda: np.full((2, 4, 4, 3), value, np.uint8)
  videos = [("x", frames(3)), ("done", frames(9)), ("x", frames(5)), ("y", frames(7))]
  assert visual_cache.fill(cache, videos, encode, show_progress=False) == 2
  assert calls == [(1, 2, 4, 4, 3)] * 2
  np.testing.assert_array_equal(cache.get("x"), np.full((2, 1, 1), 3.0))
  np.testing.assert_array_equal(cache.get("done"), np.zeros((2, 1, 1)))


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
