"""Synthetic videos for tests, benchmarks and the demo (never downloaded data).

`write_video` encodes uint8 RGB frames with PyAV. `needle_video` writes a clip
whose background drifts smoothly and which shows a bright red square (the
"needle") in one short segment only, so a frame selector that finds the needle
can be checked exactly.

Encoders: the PyAV 18 wheel ships libx264 (H.264), mpeg4, libvpx and mjpeg.
We use libx264 and fall back to mpeg4 if a build lacks it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import av
import numpy as np

# Preferred first; the first one this PyAV build can encode with is used.
CODEC_FALLBACKS = ("libx264", "mpeg4")

# The needle is pure-ish red; the background palette keeps red low and green
# high, so no background pixel comes near the needle colour.
NEEDLE_RGB = (255, 32, 32)


def available_codec(preferred: str = "libx264") -> str:
  """Returns `preferred` if PyAV can encode with it, else the first usable fallback."""
  for name in (preferred, *CODEC_FALLBACKS):
    try:
      av.codec.Codec(name, "w")
      return name
    except Exception:  # av raises UnknownCodecError / ValueError depending on version
      continue
  raise RuntimeError(f"PyAV has none of the encoders {(preferred, *CODEC_FALLBACKS)}")


def write_video(
  path,
  frames: np.ndarray | Iterable[np.ndarray],
  fps: int,
  codec: str = "libx264",
  *,
  preset: str = "ultrafast",
  crf: int | None = None,
  gop: int | None = None,
  faststart: bool = False,
  input_format: str = "rgb24",
) -> str:
  """Encodes uint8 RGB frames to a video file with PyAV; returns the codec used.

  Args:
    path: output file; the container follows the extension (.mp4, .mkv, .avi).
    frames: uint8 array [T, H, W, 3], or any iterable of [H, W, 3] arrays (so
      long videos can be streamed without holding them in memory). H and W
      must be even (yuv420p).
    fps: frames per second (an integer rate).
    codec: encoder name; falls back to mpeg4 when PyAV lacks it.
    preset, crf: x264 speed preset and quality (ignored by other codecs).
    gop: keyframe interval in frames (encoder default when None).
    faststart: mp4 only; put the index (moov atom) at the start of the file.
      A truncated faststart file still opens but its tail frames are missing.
    input_format: "rgb24", or "yuv420p" for planar frames [H * 3 // 2, W]
      (Y, then U and V at quarter size) that skip the colour conversion:
      about 2x faster to write, for long benchmark videos.
  """
  if input_format not in ("rgb24", "yuv420p"):
    raise ValueError(f"input_format must be 'rgb24' or 'yuv420p', got {input_format!r}")
  codec = available_codec(codec)
  container_options = {"movflags": "+faststart"} if faststart else {}
  frames_written = 0
  with av.open(str(path), mode="w", options=container_options) as container:
    stream = None
    for frame in frames:
      frame = np.asarray(frame)
      if input_format == "rgb24":
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
          raise ValueError(f"frames must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        height, width = frame.shape[:2]
      else:
        if frame.dtype != np.uint8 or frame.ndim != 2 or frame.shape[0] % 3:
          raise ValueError(
            f"yuv420p frames must be uint8 [H * 3 // 2, W], got {frame.dtype} {frame.shape}"
          )
        height, width = frame.shape[0] * 2 // 3, frame.shape[1]
      if stream is None:  # the first frame fixes the size
        if height % 2 or width % 2:
          raise ValueError(f"height and width must be even for yuv420p, got {height}x{width}")
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        options = {}
        if codec == "libx264":
          options["preset"] = preset
          if crf is not None:
            options["crf"] = str(crf)
        if gop is not None:
          options["g"] = str(gop)
        stream.options = options
      elif (height, width) != (stream.height, stream.width):
        raise ValueError(
          f"frame {frames_written} is {height}x{width}, expected {stream.height}x{stream.width}"
        )
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format=input_format)):
        container.mux(packet)
      frames_written += 1
    if stream is None:
      raise ValueError("no frames to write")
    for packet in stream.encode():  # flush delayed frames
      container.mux(packet)
  return codec


@dataclasses.dataclass(frozen=True)
class NeedleInfo:
  """Where the needle is in a clip written by `needle_video`.

  Frame ranges are half-open: the needle shows in frames [start_frame, stop_frame).
  Times are seconds: frame i is shown during [i / fps, (i + 1) / fps).
  The box is (top, left, bottom, right) in pixels of the written video.
  """

  path: str
  num_frames: int
  fps: int
  height: int
  width: int
  start_frame: int
  stop_frame: int
  box: tuple[int, int, int, int]
  color: tuple[int, int, int] = NEEDLE_RGB

  @property
  def start_s(self) -> float:
    return self.start_frame / self.fps

  @property
  def stop_s(self) -> float:
    return self.stop_frame / self.fps

  @property
  def duration_s(self) -> float:
    return self.num_frames / self.fps

  def frame_has_needle(self, frame_index) -> np.ndarray:
    """True for source frame numbers inside the needle segment."""
    frame_index = np.asarray(frame_index)
    return (frame_index >= self.start_frame) & (frame_index < self.stop_frame)

  def time_has_needle(self, t) -> np.ndarray:
    """True for timestamps (frame start times, seconds) inside the needle segment."""
    return self.frame_has_needle(np.floor(np.asarray(t) * self.fps + 1e-6).astype(np.int64))


def background_frame(t: float, height: int, width: int, phase: np.ndarray) -> np.ndarray:
  """A smooth, slowly drifting colour gradient at time t (seconds); no reds.

  Low-frequency content compresses well and encodes fast, which keeps the
  long benchmark video cheap to generate.
  """
  y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
  x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]

  def wave(channel):  # in [0, 1]; each channel drifts at its own speed
    return 0.5 + 0.5 * np.sin(
      2 * np.pi * (x * 0.7 + y * 0.4) + 0.35 * t * (channel + 1) + phase[channel]
    )

  red = 20 + 60 * wave(0)
  green = 70 + 110 * wave(1)
  blue = 70 + 110 * (1 - wave(2))
  return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).astype(np.uint8)


def needle_video(
  path,
  num_frames: int = 64,
  fps: int = 8,
  size: int | Sequence[int] = (96, 128),
  needle_start: int | None = None,
  needle_len: int = 4,
  seed: int = 0,
  codec: str = "libx264",
  **write_kwargs,
) -> NeedleInfo:
  """Writes a clip with a bright red square visible only in a short segment.

  Args:
    path: output file (.mp4 recommended).
    num_frames, fps: clip length in frames and frame rate.
    size: int (square) or (height, width); both even.
    needle_start: first frame showing the needle; None draws it from `seed`.
    needle_len: number of consecutive frames showing the needle.
    seed: fixes the background phase, the needle position and (if not given)
      its start frame.
    codec, write_kwargs: passed to `write_video`.

  Returns:
    NeedleInfo with the needle's frame range, times and box.
  """
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  if not 1 <= needle_len <= num_frames:
    raise ValueError(f"needle_len must be in [1, {num_frames}], got {needle_len}")
  rng = np.random.default_rng(seed)
  if needle_start is None:
    needle_start = int(rng.integers(0, num_frames - needle_len + 1))
  if not 0 <= needle_start <= num_frames - needle_len:
    raise ValueError(
      f"needle [{needle_start}, {needle_start + needle_len}) is outside 0..{num_frames}"
    )
  # A square a quarter of the short side: large enough to survive resizing to 32 px.
  side = max(4, min(height, width) // 4)
  top = int(rng.integers(0, height - side + 1))
  left = int(rng.integers(0, width - side + 1))
  phase = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
  stop = needle_start + needle_len

  def frames():
    for i in range(num_frames):
      frame = background_frame(i / fps, height, width, phase)
      if needle_start <= i < stop:
        frame[top : top + side, left : left + side] = NEEDLE_RGB
      yield frame

  write_video(path, frames(), fps, codec, **write_kwargs)
  return NeedleInfo(
    str(path),
    num_frames,
    fps,
    height,
    width,
    needle_start,
    stop,
    (top, left, top + side, left + side),
  )


def needle_fraction(
  frames: np.ndarray, color: Sequence[int] = NEEDLE_RGB, tol: int = 60
) -> np.ndarray:
  """Fraction of pixels within `tol` (per channel) of the needle colour, per frame.

  Works on decoded, resized frames [..., H, W, 3] uint8: the needle's side is
  a quarter of the clip's short side (1/16 of a square clip, less of a wide
  one) and background pixels never come near its colour, so any clear
  positive value means "needle".
  """
  frames = np.asarray(frames).astype(np.int16)
  close = np.all(np.abs(frames - np.asarray(color, np.int16)) <= tol, axis=-1)
  return close.mean(axis=(-2, -1))
