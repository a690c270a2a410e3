"""Candidate decoding on tiny generated videos: sampling, padding, backends, needle, errors."""

import os
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from frameselect_jax import synthetic, video
from frameselect_jax.video import VideoError, decode_candidates

BACKENDS = ("decord", "pyav")


@pytest.fixture(scope="module", params=["mp4", "mkv"])
def needle(tmp_path_factory, request):
  """10 s at 12 fps, non-square; the needle shows in frames 60..71 (5.0 s .. 6.0 s).
  A keyframe every 12 frames and 16 candidates: PyAV both seeks and decodes on."""
  path = tmp_path_factory.mktemp("videos") / f"needle.{request.param}"
  return synthetic.needle_video(
    path, num_frames=120, fps=12, size=(96, 128), needle_start=60, needle_len=12, seed=1, gop=12
  )


@pytest.fixture(scope="module", params=["mp4", "mkv"])
def short_clip(tmp_path_factory, request):
  """10 frames, each a different flat grey, so every frame is recognisable. The
  mkv has no frame count in its header (PyAV then counts packets)."""
  path = tmp_path_factory.mktemp("videos") / f"short.{request.param}"
  greys = np.arange(10, dtype=np.uint8) * 24 + 10
  synthetic.write_video(path, np.broadcast_to(greys[:, None, None, None], (10, 32, 48, 3)), fps=5)
  return path, greys


@pytest.fixture(scope="module")
def faststart_bytes(tmp_path_factory):
  """An mp4 with its index first: when cut, it still opens but frames are missing."""
  path = tmp_path_factory.mktemp("videos") / "faststart.mp4"
  synthetic.needle_video(path, num_frames=64, fps=8, size=64, seed=2, gop=8, faststart=True)
  return path.read_bytes()


def test_sample_timestamps_are_segment_centres():
  np.testing.assert_allclose(video.sample_timestamps(8.0, 4), [1.0, 3.0, 5.0, 7.0])
  with pytest.raises(ValueError):
    video.sample_timestamps(0.0, 4)
  with pytest.raises(ValueError):
    video.sample_timestamps(1.0, 0)


def test_candidate_frame_indices():
  np.testing.assert_array_equal(video.candidate_frame_indices(5, 8), np.arange(5))
  indices = video.candidate_frame_indices(18000, 128)
  assert len(indices) == 128 and np.all(np.diff(indices) > 0)
  # Constant frame rate: the frame under each segment-centre timestamp.
  fps = 30.0
  np.testing.assert_array_equal(indices, np.floor(video.sample_timestamps(18000 / fps, 128) * fps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_shapes_timestamps_and_valid(needle, backend):
  c = decode_candidates(needle.path, n=16, size=32, backend=backend)
  assert c.frames.shape == (16, 32, 32, 3) and c.frames.dtype == np.uint8  # non-square -> square
  assert c.timestamps.dtype == np.float32 and c.valid.dtype == bool
  assert c.valid.all()
  np.testing.assert_array_equal(c.frame_indices, video.candidate_frame_indices(120, 16))
  np.testing.assert_allclose(c.timestamps, c.frame_indices / 12, atol=1e-3)
  assert c.duration == pytest.approx(10.0, abs=0.1)
  assert c.path == str(needle.path)


def test_backends_agree(needle):
  a = decode_candidates(needle.path, n=16, size=64, backend="decord")
  b = decode_candidates(needle.path, n=16, size=64, backend="pyav")
  np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
  np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-3)
  # Same frames; the two ffmpeg builds' scalers may round differently.
  per_frame_diff = np.abs(a.frames.astype(np.int16) - b.frames).mean(axis=(1, 2, 3))
  assert per_frame_diff.max() < 3.0, per_frame_diff


@pytest.mark.parametrize("backend", BACKENDS)
def test_needle_visible_exactly_at_its_timestamps(needle, backend):
  c = decode_candidates(needle.path, n=16, size=64, backend=backend)
  expected = needle.time_has_needle(c.timestamps)
  assert expected.sum() == 2  # candidates at frames 63 and 71
  np.testing.assert_array_equal(expected, needle.frame_has_needle(c.frame_indices))
  fraction = synthetic.needle_fraction(c.frames)
  np.testing.assert_array_equal(fraction > 0.01, expected)
  assert fraction[expected].min() > 0.03  # the square is 1/16 of the frame


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_video_every_frame_once_then_padding(short_clip, backend):
  path, greys = short_clip
  c = decode_candidates(path, n=16, size=32, backend=backend)
  assert c.valid.tolist() == [True] * 10 + [False] * 6
  np.testing.assert_array_equal(c.frame_indices, list(range(10)) + [-1] * 6)
  np.testing.assert_allclose(c.timestamps[:10], np.arange(10) / 5, atol=1e-3)
  assert np.all(c.timestamps[10:] == -1.0)
  np.testing.assert_allclose(
    c.frames[:10].mean(axis=(1, 2, 3)), greys, atol=3
  )  # distinct, in order
  assert not c.frames[10:].any()


def test_auto_falls_back_to_pyav_without_decord(needle, monkeypatch):
  monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` fail
  with pytest.raises(VideoError, match="decord: not installed"):
    decode_candidates(needle.path, n=4, size=16, backend="decord")
  c = decode_candidates(needle.path, n=4, size=16)
  reference = decode_candidates(needle.path, n=4, size=16, backend="pyav")
  np.testing.assert_array_equal(c.frames, reference.frames)


def test_decord_resize_bug_sizes_fall_back_to_pyav(needle):
  # decord 0.6.0 returns mis-shaped frames at size 16 (and 2..24, 48, 72).
  with pytest.raises(VideoError, match="decord resize bug"):
    decode_candidates(needle.path, n=4, size=16, backend="decord")
  c = decode_candidates(needle.path, n=4, size=16)
  np.testing.assert_array_equal(
    c.frames, decode_candidates(needle.path, n=4, size=16, backend="pyav").frames
  )


def test_missing_file(tmp_path):
  with pytest.raises(VideoError, match=r"missing\.mp4: no such file"):
    decode_candidates(tmp_path / "missing.mp4")


@pytest.mark.parametrize("backend", ("auto",) + BACKENDS)
def test_text_file_renamed_mp4(tmp_path, backend):
  path = tmp_path / "notes.mp4"
  path.write_text("not a video at all\n")
  with pytest.raises(VideoError, match=r"notes\.mp4: cannot decode it as a video"):
    decode_candidates(path, n=4, size=16, backend=backend)


def test_empty_file(tmp_path):
  path = tmp_path / "empty.mp4"
  path.write_bytes(b"")
  with pytest.raises(VideoError, match="empty file"):
    decode_candidates(path)


def test_truncated_file(needle, tmp_path):
  data = open(needle.path, "rb").read()
  path = tmp_path / f"half{os.path.splitext(needle.path)[1]}"
  path.write_bytes(data[: len(data) // 2])
  if path.suffix == ".mp4":
    # Default mp4: the index (moov) is at the end, so the first half cannot be opened.
    with pytest.raises(VideoError, match=r"half\.mp4: cannot decode it as a video"):
      decode_candidates(path, n=8, size=32)
    return
  # mkv: the first half reads as a shorter video; only the header's duration tells.
  for backend in BACKENDS:
    with pytest.raises(
      VideoError, match=r"half\.mkv: its frames end at .* header declares 10\.00s"
    ):
      decode_candidates(path, n=8, size=32, backend=backend)
  with pytest.warns(RuntimeWarning, match="truncated"):
    c = decode_candidates(path, n=8, size=32, allow_partial=True)
  assert c.valid.all() and c.duration < 7


def test_truncated_file_names_failed_candidates(faststart_bytes, tmp_path):
  path = tmp_path / "half.mp4"
  path.write_bytes(faststart_bytes[: len(faststart_bytes) // 2])
  with pytest.raises(VideoError, match=r"half\.mp4: \d+ of 16 candidate frames failed") as info:
    decode_candidates(path, n=16, size=16)
  assert "#15 (frame 62, 7.750s)" in str(info.value)  # the last candidate is surely lost

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    c = decode_candidates(path, n=16, size=16, allow_partial=True)
  assert any("Marked invalid" in str(w.message) for w in caught)
  assert 0 < c.valid.sum() < 16
  assert c.valid[0] and not c.valid[-1]
  assert np.all(c.frame_indices[~c.valid] == -1) and not c.frames[~c.valid].any()
  ok = c.frame_indices[c.valid]
  np.testing.assert_array_equal(ok, video.candidate_frame_indices(64, 16)[c.valid])


def test_header_only_file_has_no_decodable_frames(faststart_bytes, tmp_path):
  path = tmp_path / "header.mp4"
  path.write_bytes(faststart_bytes[: faststart_bytes.find(b"mdat") + 64])
  with pytest.raises(VideoError, match=r"header\.mp4: no decodable frames"):
    decode_candidates(path, n=4, size=16, allow_partial=True)


def test_bad_arguments(needle):
  with pytest.raises(ValueError, match="backend must be one of"):
    decode_candidates(needle.path, backend="opencv")
  with pytest.raises(ValueError, match="n and size must be >= 1"):
    decode_candidates(needle.path, n=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_span_spreads_the_candidates_over_its_own_frames(needle, backend):
  """[5 s, 6 s) at 12 fps holds frames 60..71 (the needle's): the candidates are spread over
  those, with the video's own timestamps; a span shorter than n frames pads."""
  c = decode_candidates(needle.path, n=4, size=32, backend=backend, span=(5.0, 6.0))
  np.testing.assert_array_equal(c.frame_indices, 60 + video.candidate_frame_indices(12, 4))
  np.testing.assert_allclose(c.timestamps, c.frame_indices / 12, atol=1e-3)
  assert c.valid.all()
  short = decode_candidates(needle.path, n=4, size=32, backend=backend, span=(5.0, 5.25))
  np.testing.assert_array_equal(short.frame_indices, [60, 61, 62, -1])
  np.testing.assert_array_equal(short.valid, [True, True, True, False])


def test_bad_spans_are_named(needle):
  with pytest.raises(VideoError, match=r"the span \[20, 30\) s holds none of its 120 frames"):
    decode_candidates(needle.path, n=4, size=32, span=(20, 30))
  for bad in [(3, 2), (-1, 2), (1,), "ab", (0, float("nan"))]:
    with pytest.raises(ValueError, match="span"):
      decode_candidates(needle.path, n=4, size=32, span=bad)


def test_normalize_numpy_and_jax():
  pixels = np.array([0, 127, 255], np.uint8)
  out = video.normalize(pixels)
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_allclose(out, [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
  out_jax = video.normalize(jnp.asarray(pixels))
  assert isinstance(out_jax, jnp.ndarray) and out_jax.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out_jax), out, atol=1e-6)


def test_write_video_rejects_bad_frames(tmp_path):
  with pytest.raises(ValueError, match="even"):
    synthetic.write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), fps=4)
  with pytest.raises(ValueError, match="uint8"):
    synthetic.write_video(tmp_path / "float.mp4", np.zeros((2, 16, 16, 3), np.float32), fps=4)
  with pytest.raises(ValueError, match="no frames"):
    synthetic.write_video(tmp_path / "none.mp4", [], fps=4)
