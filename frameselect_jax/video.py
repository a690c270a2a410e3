"""Candidate frames: sample n frames uniformly over a video and decode only those.

The selector sees `n` candidate frames (128 in the paper) spread uniformly over
the whole video. `decode_candidates` seeks to those frames only, resized during
decoding, so a long video never sits decoded in memory. PyAV does the work by
default (the faster of the two on our benchmark, for the same frames); decord
is the other backend, and "auto" falls back to it when PyAV cannot open a file.
`decode_frames` reads any given source frames (thumbnails, other tools).

Padding convention (shared with `selection.py`): every array has length n;
where `valid` is False the frame is zeros, `frame_indices` is -1 and
`timestamps` is -1.0. A video with fewer than n frames yields each of its frames
once, followed by padding; a frame is never repeated to fill the budget.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import numpy as np

from frameselect_jax import errors

BACKENDS = ("auto", "decord", "pyav")

# What "auto" tries, in order; the next is used when one is missing or refuses
# the file. PyAV first: on the 10-minute 720p H.264 benchmark video it returns the
# same frames about twice as fast as decord (1.3 s against 2.6 s on 2 cores) and
# holds less memory (benchmarks/bench_decode.py, benchmarks/results_select.md).
AUTO_ORDER = ("pyav", "decord")

# decord returns candidates in chunks of this many, copied into one preallocated
# array, so the transient copy is a few frames rather than all n.
DECORD_CHUNK = 16

# SigLIP's image processor: mean = std = 0.5 on [0, 1] pixels.
SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


class VideoError(ValueError):
  """A video cannot be read, or some of its candidate frames failed to decode."""


class Candidates(NamedTuple):
  """The n candidate frames of one video (see the module docstring for padding).

  frames:        uint8 [n, size, size, 3], RGB, squashed to a square (no crop).
  timestamps:    float32 [n], presentation time of each frame in seconds.
  valid:         bool [n].
  frame_indices: int64 [n], source frame numbers.
  path:          the file.
  duration:      seconds covered by the video's frames (from its index or
                 packets; checked against the duration its header declares).
  """

  frames: np.ndarray
  timestamps: np.ndarray
  valid: np.ndarray
  frame_indices: np.ndarray
  path: str
  duration: float


def sample_timestamps(duration_s: float, n: int) -> np.ndarray:
  """n timestamps (float64 seconds) at the centres of n equal segments of [0, duration_s)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  if not duration_s > 0:
    raise ValueError(f"duration must be > 0, got {duration_s}")
  return (np.arange(n) + 0.5) * (duration_s / n)


def candidate_frame_indices(total_frames: int, n: int) -> np.ndarray:
  """Source frame numbers of the candidates: all frames if there are at most n,
  else the frame under the centre of each of n equal segments (unique, ascending).

  For a constant frame rate this is `floor(sample_timestamps(duration, n) * fps)`,
  computed in integers so it does not depend on rounding of the timestamps.
  """
  if total_frames <= n:
    return np.arange(total_frames, dtype=np.int64)
  j = np.arange(n, dtype=np.int64)
  return (2 * j + 1) * total_frames // (2 * n)


def normalize(frames_uint8):
  """uint8 pixels -> float32 in [-1, 1] (SigLIP: mean = std = 0.5).

  Returns the same array type it gets (numpy or jax).
  """
  if not hasattr(frames_uint8, "astype"):
    frames_uint8 = np.asarray(frames_uint8)
  return (frames_uint8.astype(np.float32) / 255.0 - SIGLIP_MEAN) / SIGLIP_STD


def _raise_or_warn(message, allow_partial, remedy, outcome):
  """A partial decode is an error unless the caller allowed it; then it is a warning."""
  if not allow_partial:
    raise VideoError(f"{message}. Pass allow_partial=True to {remedy}.")
  warnings.warn(f"{message}. {outcome}.", RuntimeWarning, stacklevel=4)


def check_span(span) -> tuple[float, float] | None:
  """None, or (start_s, end_s) as floats with 0 <= start_s < end_s; else ValueError."""
  if span is None:
    return None
  try:
    start_s, end_s = (float(t) for t in span)
  except (TypeError, ValueError):
    raise ValueError(f"a span is (start_s, end_s) in seconds, got {span!r}") from None
  if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s < end_s):
    raise ValueError(f"a span needs 0 <= start_s < end_s, got [{start_s}, {end_s}]")
  return start_s, end_s


def span_frames(total_frames: int, fps: float, span) -> tuple[int, int]:
  """[first, end) source frame numbers whose presentation time i / fps lies in the span
  [start_s, end_s); the whole video for span None."""
  if span is None:
    return 0, total_frames
  start_s, end_s = span
  first = min(total_frames, math.ceil(start_s * fps - 1e-6))
  return first, max(first, min(total_frames, math.ceil(end_s * fps - 1e-6)))


def decode_candidates(
  path,
  n: int = 128,
  size: int = 224,
  backend: str = "auto",
  allow_partial: bool = False,
  span: tuple[float, float] | None = None,
  frame_rate: float | None = None,
) -> Candidates:
  """Decodes n candidate frames spread uniformly over a video, or over a span of it, seeking
  to each.

  Args:
    path: video file.
    n: number of candidates.
    size: output frames are size x size (aspect ratio is not kept, as in
      SigLIP's preprocessing).
    backend: "decord", "pyav", or "auto" (PyAV; decord when PyAV cannot open
      the file).
    allow_partial: if some candidates fail to decode (a truncated or corrupt
      stream), mark them invalid and warn instead of raising.
    span: (start_s, end_s): only the frames shown in [start_s, end_s) are candidates
      (a bounded question); None: the whole video. Timestamps stay the video's own.
    frame_rate: when path is a folder of frames (image files, taken in the order of the
      numbers in their names; some benchmarks ship videos so), the rate they were taken at,
      frames per second; frame i is shown at i / frame_rate. Required for a folder.

  Raises:
    VideoError: missing file, not a video, no decodable frames, a span that holds no
      frame, or (unless allow_partial) some candidates failed; the message names the
      file, the cause and the failed candidates.
  """
  path = os.fspath(path)
  if n < 1 or size < 1:
    raise ValueError(f"n and size must be >= 1, got n={n}, size={size}")
  span = check_span(span)

  def pick(total, fps):
    first, end = span_frames(total, fps, span)
    if end <= first:
      raise VideoError(
        f"{path}: the span [{span[0]:g}, {span[1]:g}) s holds none of its {total} frames "
        f"({total / fps:.2f} s at {fps:g} fps)"
      )
    return first + candidate_frame_indices(end - first, n)

  if os.path.isdir(path):
    result = _decode_frame_folder(path, pick, size, n, frame_rate)
  else:
    result = _decode(path, pick, size, n, backend)
  return _finish(path, n, size, result, allow_partial)


def decode_frames(
  path, frame_indices, size: int | None = None, backend: str = "auto"
) -> np.ndarray:
  """The given source frames of a video, uint8 [len(frame_indices), H, W, 3], in the order
  given (repeats allowed). size None keeps the video's resolution; an int squashes each
  frame to size x size, as `decode_candidates` does.

  Raises VideoError naming the file for a missing or unreadable file, an index outside the
  video, or a frame that fails to decode.
  """
  path = os.fspath(path)
  wanted = np.asarray(frame_indices, np.int64).reshape(-1)
  if size is not None and size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  unique = np.unique(wanted)

  def pick(total, fps):
    outside = unique[(unique < 0) | (unique >= total)]
    if len(outside):
      raise VideoError(f"{path}: frames {outside.tolist()} are outside its {total} frames")
    return unique

  if len(unique) == 0:
    return np.zeros((0, size or 0, size or 0, 3), np.uint8)
  result = _decode(path, pick, size, len(unique), backend)
  if result.failed:
    listing = "; ".join(
      f"frame {result.frame_indices[i]}: {why}" for i, why in result.failed.items()
    )
    raise VideoError(
      f"{path}: {len(result.failed)} of {len(unique)} frames failed to decode ({listing})"
    )
  got = np.asarray(result.frame_indices)
  if not np.array_equal(got, unique):
    raise VideoError(f"{path}: asked for frames {unique.tolist()}, the stream gave {got.tolist()}")
  return result.frames[np.searchsorted(unique, wanted)]


def _decode(path, pick, size, capacity, backend) -> "_Decoded":
  """Runs a backend ("auto": each of AUTO_ORDER until one opens the file)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if not os.path.exists(path):
    raise VideoError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise VideoError(f"{path}: not a regular file")
  if os.path.getsize(path) == 0:
    raise VideoError(f"{path}: empty file")
  open_errors = []
  for name in AUTO_ORDER if backend == "auto" else (backend,):
    try:
      return _DECODERS[name](path, pick, size, capacity)
    except _OpenError as error:
      open_errors.append(f"{name}: {error}")
  raise VideoError(f"{path}: cannot decode it as a video ({'; '.join(open_errors)})")


class _OpenError(Exception):
  """The backend cannot read this file at all (so "auto" may try the next one)."""


class _Decoded(NamedTuple):
  """What a backend returns: the m <= capacity frames it tried, and which failed."""

  frames: np.ndarray  # uint8 [capacity, H, W, 3]: the m tried first, zeros after
  timestamps: np.ndarray  # float [m]
  frame_indices: np.ndarray  # int [m]
  failed: dict  # position in the m candidates -> reason
  duration: float  # end of the last frame the index or packets list, seconds
  backend: str


def _finish(path, n, size, decoded: _Decoded, allow_partial) -> Candidates:
  """Applies the failure policy and pads to n (frames in place: no copy of the candidates)."""
  m = len(decoded.frame_indices)
  if m == 0:
    raise VideoError(f"{path}: no decodable frames (the {decoded.backend} backend found none)")
  ok = np.ones(m, bool)
  ok[list(decoded.failed)] = False
  if not ok.any():
    first = next(iter(decoded.failed.values()))
    raise VideoError(
      f"{path}: no decodable frames; all {m} candidates failed "
      f"({decoded.backend}; first error: {first})"
    )
  if decoded.failed:
    by_reason = {}  # one line per distinct cause, listing its candidates
    for i, why in sorted(decoded.failed.items()):
      by_reason.setdefault(why, []).append(
        f"#{i} (frame {decoded.frame_indices[i]}, {decoded.timestamps[i]:.3f}s)"
      )
    listing = "; ".join(f"{', '.join(where)}: {why}" for why, where in by_reason.items())
    message = (
      f"{path}: {len(decoded.failed)} of {m} candidate frames failed to decode "
      f"(truncated or corrupt stream?) with {decoded.backend}: {listing}"
    )
    _raise_or_warn(message, allow_partial, "mark them invalid instead", "Marked invalid")

  # A container cut short (e.g. an mkv) may still list fewer frames consistently,
  # and every candidate then decodes: only the header's duration gives it away.
  declared = None if os.path.isdir(path) else _declared_duration(path)
  if declared and declared - decoded.duration > max(1.0, 0.05 * declared):
    message = (
      f"{path}: its frames end at {decoded.duration:.2f}s but its header declares "
      f"{declared:.2f}s (truncated?); candidates cover only the frames present"
    )
    _raise_or_warn(message, allow_partial, "accept that", "Accepted")

  frames = decoded.frames
  frames[:m][~ok] = 0
  timestamps = np.full(n, -1.0, np.float32)
  frame_indices = np.full(n, -1, np.int64)
  valid = np.zeros(n, bool)
  timestamps[:m][ok] = decoded.timestamps[ok]
  frame_indices[:m][ok] = decoded.frame_indices[ok]
  valid[:m] = ok
  return Candidates(frames, timestamps, valid, frame_indices, path, float(decoded.duration))


def _decode_decord(path, pick, size, capacity) -> _Decoded:
  """decord: resizes inside the decoder; get_batch seeks to each frame `pick(total, fps)` names."""
  try:
    import decord
  except ImportError as error:
    raise _OpenError(f"not installed ({error})") from error
  try:
    # One decoding thread: each seek flushes a frame-threaded pipeline (measured on the
    # 10-minute 720p benchmark video with 2 cores: 2.9 s against 3.6 s with decord's default).
    reader = decord.VideoReader(path, width=size or -1, height=size or -1, num_threads=1)
  except Exception as error:  # decord raises RuntimeError or its DECORDError
    raise _OpenError(
      f"cannot open it: not a video, or truncated/corrupt? ({errors.one_line(error)})"
    ) from error
  total = len(reader)
  if total == 0:
    raise _OpenError("reports zero frames")  # "auto" then asks PyAV for a second opinion
  indices = pick(total, float(reader.get_avg_fps()))
  times = reader.get_frame_timestamp(indices.tolist())[:, 0].astype(np.float64)
  duration = float(reader.get_frame_timestamp(total - 1)[1])
  height, width = (size, size) if size else reader[0].shape[:2]
  expected_shape = (len(indices), height, width, 3)
  failed = {}
  frames = np.zeros((capacity, height, width, 3), np.uint8)
  try:
    for start in range(0, len(indices), DECORD_CHUNK):
      chunk = reader.get_batch(indices[start : start + DECORD_CHUNK].tolist()).asnumpy()
      if chunk.shape[1:] != expected_shape[1:]:
        raise ValueError(
          f"get_batch returned {chunk.shape}, expected frames of {expected_shape[1:]}"
        )
      frames[start : start + len(chunk)] = chunk
  except Exception:
    # Something in the batch is unreadable: retry one by one to name the culprits.
    for position, index in enumerate(indices.tolist()):
      try:
        frame = reader[index].asnumpy()
      except Exception as error:
        failed[position] = errors.one_line(error)
        continue
      if frame.shape != expected_shape[1:]:
        # decord 0.6.0 mis-sizes its output at some sizes (2..24, 48, 72; not
        # 32, 64, 224, 384...). Not the file's fault: let "auto" use PyAV.
        raise _OpenError(
          f"returns frames of shape {frame.shape} for size={size} "
          "(a decord resize bug at some sizes; use backend='pyav')"
        ) from None
      frames[position] = frame
  return _Decoded(frames, times, indices, failed, duration, "decord")


def _decode_pyav(path, pick, size, capacity) -> _Decoded:
  """PyAV: seek to the keyframe before each frame `pick(total, fps)` names, decode forward to it."""
  import av

  try:
    container = av.open(path)
  except Exception as error:  # InvalidDataError for non-videos, others for odd files
    raise _OpenError(
      f"cannot open it: not a video, or truncated/corrupt? ({errors.one_line(error)})"
    ) from error
  with container:
    if not container.streams.video:
      raise _OpenError("no video stream")
    stream = container.streams.video[0]
    # No frame threading: every seek flushes its pipeline, so it is no faster
    # here, and each thread holds frames (measured: 2x the memory).
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
      raise _OpenError("no frame rate for the video stream")
    fps = float(rate)
    time_base = float(stream.time_base)
    start_s = (stream.start_time or 0) * time_base
    total, keyframes = _frame_count_and_keyframes(container, stream, fps, start_s)
    duration = total / fps
    indices = pick(total, fps)
    height, width = (
      (size, size) if size else (stream.codec_context.height, stream.codec_context.width)
    )
    frames = np.zeros((capacity, height, width, 3), np.uint8)
    times = indices / fps  # replaced by each decoded frame's own time
    got_indices = indices.copy()
    failed = {}
    decoded_iter = None  # the running decode after the last seek; None forces a seek
    last_taken = -1  # never return a source frame twice, even if the stream's times are off
    for position, target in enumerate(indices.tolist()):
      target = max(target, last_taken + 1)
      # Seek only when a keyframe lies between the last decoded frame and the
      # target; otherwise decoding on reaches it with fewer frames than a seek
      # (which lands on a keyframe at or before where we already are).
      keyframe_before = keyframes[max(np.searchsorted(keyframes, target, side="right") - 1, 0)]
      try:
        if decoded_iter is None or keyframe_before > last_taken:
          container.seek(
            int(round((start_s + target / fps) / time_base)),
            stream=stream,
            backward=True,
            any_frame=False,
          )
          decoded_iter = container.decode(stream)
        frame = None
        for frame in decoded_iter:
          index = int(round((frame.time - start_s) * fps))
          if index >= target:
            break
        else:
          frame = None
        if frame is None:
          raise EOFError("stream ended before this frame")
      except Exception as error:
        failed[position] = errors.one_line(error)
        decoded_iter = None  # the decoder state is suspect: seek afresh
        continue
      frames[position] = frame.to_ndarray(width=width, height=height, format="rgb24")
      times[position] = frame.time - start_s
      got_indices[position] = last_taken = index
  return _Decoded(frames, times, got_indices, failed, duration, "pyav")


FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_folder_files(path: str) -> list[str]:
  """The image files of a folder of frames, in frame order: by the numbers in their names
  (frame_2 before frame_10), then by name."""
  import re

  names = [n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS)]
  numbers = lambda name: [int(d) for d in re.findall(r"\d+", name)]
  return [os.path.join(path, n) for n in sorted(names, key=lambda n: (numbers(n), n))]


def _decode_frame_folder(path, pick, size, capacity, frame_rate) -> _Decoded:
  """A folder of image files taken at frame_rate: the files `pick(total, fps)` names."""
  from PIL import Image

  files = frame_folder_files(path)
  if not files:
    raise VideoError(
      f"{path}: not a regular file, nor a folder of frames (no {'/'.join(FRAME_EXTENSIONS)} "
      f"files in it)"
    )
  if not frame_rate or frame_rate <= 0:
    raise VideoError(
      f"{path} is a folder of frames: pass frame_rate (frames per second they were taken at)"
    )
  indices = pick(len(files), float(frame_rate))
  frames, failed = None, {}
  for position, index in enumerate(indices.tolist()):
    try:
      with Image.open(files[index]) as image:
        image = image.convert("RGB")
        if size:
          image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image)
    except Exception as error:  # PIL: UnidentifiedImageError, OSError for truncated files
      failed[position] = errors.one_line(error)
      continue
    if frames is None:
      frames = np.zeros((capacity, *array.shape), np.uint8)
    if array.shape != frames.shape[1:]:
      failed[position] = f"{os.path.basename(files[index])}: not the first frame's size"
      continue
    frames[position] = array
  if frames is None:
    frames = np.zeros((capacity, size or 1, size or 1, 3), np.uint8)
  times = indices.astype(np.float64) / frame_rate
  return _Decoded(frames, times, indices, failed, len(files) / frame_rate, "frame folder")


def _declared_duration(path):
  """The video stream's duration as the container header declares it, in
  seconds; None when it declares none or PyAV cannot read the header."""
  import av

  try:
    with av.open(path) as container:
      stream = container.streams.video[0]
      if stream.duration:
        return stream.duration * float(stream.time_base)
      tag = stream.metadata.get("DURATION")  # mkv / webm: per track, "HH:MM:SS.nnnnnnnnn"
      if tag:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
      if container.duration:
        return container.duration / 1e6  # av.time_base units; may include audio
  except Exception:
    return None
  return None


def _frame_count_and_keyframes(container, stream, fps, start_s):
  """The stream's frame count and its keyframes' frame numbers (ascending, never empty).

  From the container's index when it lists every frame (mp4: nothing is
  read), else from packet headers (mkv, webm: reads the file but decodes
  nothing; a count from packets, unlike an estimate from the duration, never
  names a frame past the end). Keyframe numbers may be off by a frame or two
  (index timestamps can be decode times); they only decide between seeking
  and decoding on, and either reaches the right frame.
  """
  time_base = float(stream.time_base)
  entries = stream.index_entries
  if stream.frames and len(entries) == stream.frames:
    total = stream.frames
    timestamps = [entry.timestamp for entry in entries if entry.is_keyframe]
  else:
    total, timestamps = 0, []
    for packet in container.demux(stream):
      if packet.size:  # the demuxer ends with an empty flush packet
        total += 1
        if packet.is_keyframe and packet.pts is not None:
          timestamps.append(packet.pts)
  keyframes = sorted({int(round((t * time_base - start_s) * fps)) for t in timestamps})
  return total, np.array(keyframes or [0], np.int64)


_DECODERS = {"decord": _decode_decord, "pyav": _decode_pyav}
