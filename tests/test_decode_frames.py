"""video.decode_frames: any source frames of a video, by index, from both backends."""

import numpy as np
import pytest

from frameselect_jax import synthetic, video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clip") / "needle.mp4")
  return synthetic.needle_video(
    path, num_frames=24, fps=8, size=(48, 64), needle_start=10, needle_len=3, seed=4
  )


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_frames_come_back_in_the_order_asked_at_native_or_square_size(clip, backend):
  frames = video.decode_frames(clip.path, [11, 2, 11, 23], backend=backend)
  assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
  found = synthetic.needle_fraction(frames)
  assert found[0] > 0.02 and found[2] > 0.02 and found[1] == 0 and found[3] == 0
  np.testing.assert_array_equal(frames[0], frames[2])
  square = video.decode_frames(clip.path, [11], size=32, backend=backend)
  assert square.shape == (1, 32, 32, 3)


def test_backends_agree_on_the_frames(clip):
  indices = [0, 5, 12, 20]
  a = video.decode_frames(clip.path, indices, backend="pyav").astype(int)
  b = video.decode_frames(clip.path, indices, backend="decord").astype(int)
  assert np.abs(a - b).mean() < 2.0


def test_an_index_outside_the_video_is_named(clip):
  with pytest.raises(video.VideoError, match=r"frames \[24\] are outside its 24 frames"):
    video.decode_frames(clip.path, [3, 24])
  with pytest.raises(video.VideoError, match="no such file"):
    video.decode_frames(clip.path + ".missing", [0])
