"""Synthetic videos and records for tests, benchmarks and the demo (never downloaded data).

`write_video` encodes uint8 RGB frames with PyAV. `needle_video` writes a clip
whose background drifts smoothly and which shows a bright red square (the
"needle") in one short segment only, so a frame selector that finds the needle
can be checked exactly. `write_needle_benchmark` writes a whole benchmark of
such videos with several coloured needles each and one question per needle
(real mp4 files plus JSONL), which the selector learns from. `needle_records`
makes training records as frame arrays, for unit tests.

Encoders: the PyAV 18 wheel ships libx264 (H.264), mpeg4, libvpx and mjpeg.
We use libx264 and fall back to mpeg4 if a build lacks it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Iterable, Sequence

import av
import numpy as np

# Preferred first; the first one this PyAV build can encode with is used.
CODEC_FALLBACKS = ("libx264", "mpeg4")

# Saturated needle colours, far from every background of this module (muted greys, or
# needle_video's low-red gradient) and from each other.
NEEDLE_COLORS = {
  "red": (230, 30, 30),
  "blue": (30, 60, 235),
  "yellow": (240, 220, 20),
  "white": (250, 250, 250),
  "green": (20, 200, 40),
  "magenta": (220, 30, 220),
}


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
  color: tuple[int, int, int] = NEEDLE_COLORS["red"]

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
        frame[top : top + side, left : left + side] = NEEDLE_COLORS["red"]
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
  frames: np.ndarray, color: Sequence[int] = NEEDLE_COLORS["red"], tol: int = 60
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


# --- The needle benchmark: real videos, several needles each, one question per needle ---

# Black symbols drawn on a needle's card: what a question asks about.
SYMBOLS = ("circle", "cross", "bar", "ring")


@dataclasses.dataclass(frozen=True)
class NeedleSettings:
  """How the needle benchmark's videos look (every split uses the same settings).

  Each video shows a muted, slowly drifting background. `needles` cards, each in its own
  colour of NEEDLE_COLORS and with a black symbol, appear for `needle_s` seconds each, at
  random places and non-overlapping times; each gets one question ("Which symbol is on the
  red card?", four options). `distractors` more cards, in colours no question of the video
  names, show for 1 to 3 s each; `distractor_alike` in [0, 1] blends their colour from grey
  (easy to ignore) to a fully saturated needle colour (told apart by colour alone).
  """

  duration_s: float = 16.0
  fps: int = 8
  size: int = 64
  needles: int = 3
  needle_s: float = 0.5
  distractors: int = 2
  distractor_alike: float = 1.0
  card_fraction: float = 0.34  # card side / frame side
  seed: int = 0

  @property
  def num_frames(self) -> int:
    return int(round(self.duration_s * self.fps))

  @property
  def needle_frames(self) -> int:
    return max(1, int(round(self.needle_s * self.fps)))

  def validate(self) -> "NeedleSettings":
    if self.size % 2 or self.size < 16:
      raise ValueError(f"size must be even and >= 16, got {self.size}")
    if not 1 <= self.needles <= len(NEEDLE_COLORS):
      raise ValueError(f"needles must be in [1, {len(NEEDLE_COLORS)}], got {self.needles}")
    if self.needles + self.distractors > len(NEEDLE_COLORS):
      raise ValueError(
        f"needles + distractors must be at most {len(NEEDLE_COLORS)} (one "
        f"colour each), got {self.needles} + {self.distractors}"
      )
    if self.needles * self.needle_frames > self.num_frames:
      raise ValueError(
        f"{self.needles} needles of {self.needle_frames} frames do not fit in "
        f"{self.num_frames} frames"
      )
    if not 0.0 <= self.distractor_alike <= 1.0:
      raise ValueError(f"distractor_alike must be in [0, 1], got {self.distractor_alike}")
    if not 0.1 <= self.card_fraction <= 0.5:
      raise ValueError(f"card_fraction must be in [0.1, 0.5], got {self.card_fraction}")
    return self


def symbol_mask(symbol: str, side: int) -> np.ndarray:
  """bool[side, side]: where `symbol` is drawn (black) on a card of that side."""
  yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side - 0.5  # card centre at 0, half-side 0.5
  radius = np.hypot(yy, xx)
  if symbol == "circle":
    return radius <= 0.3
  if symbol == "ring":
    return (radius >= 0.2) & (radius <= 0.36)
  if symbol == "cross":
    return ((np.abs(xx) <= 0.1) | (np.abs(yy) <= 0.1)) & (
      np.maximum(np.abs(xx), np.abs(yy)) <= 0.36
    )
  if symbol == "bar":
    return (np.abs(yy) <= 0.12) & (np.abs(xx) <= 0.36)
  raise ValueError(f"unknown symbol {symbol!r}; known: {SYMBOLS}")


def card_image(color, symbol: str, side: int) -> np.ndarray:
  """uint8[side, side, 3]: a card of `color` with its black symbol."""
  card = np.empty((side, side, 3), np.uint8)
  card[:] = np.asarray(color, np.uint8)
  card[symbol_mask(symbol, side)] = 0
  return card


def muted_background(t: float, size: int, phase: float, tint: np.ndarray) -> np.ndarray:
  """A grey gradient (levels 70 to 130, a small colour tint) drifting with time t (seconds)."""
  y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
  x = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
  grey = 100 + 30 * np.sin(2 * np.pi * (0.6 * x + 0.3 * y) + 0.3 * t + phase)
  return np.clip(grey[..., None] + tint, 0, 255).astype(np.uint8)


def _video_rng(settings: NeedleSettings, split: str, index: int) -> np.random.Generator:
  """Each video its own stream, from (seed, split, index): splits never share a video, and
  adding videos to a split changes none of the others."""
  return np.random.default_rng([settings.seed, zlib.crc32(split.encode()), index])


def needle_video_plan(settings: NeedleSettings, split: str, index: int) -> dict:
  """Everything about one video, drawn from its own random stream (nothing is written)."""
  settings.validate()
  rng = _video_rng(settings, split, index)
  size, frames, length = settings.size, settings.num_frames, settings.needle_frames
  side = max(6, int(round(settings.card_fraction * size)))
  colours = list(NEEDLE_COLORS)
  picked = rng.permutation(len(colours))
  needle_colours = [colours[i] for i in picked[: settings.needles]]
  distractor_colours = [
    colours[i] for i in picked[settings.needles : settings.needles + settings.distractors]
  ]
  # One needle per equal slot of the timeline, in a random order: never two at once.
  slot = frames // settings.needles
  order = rng.permutation(settings.needles)
  needles = []
  for colour, slot_index in zip(needle_colours, order):
    start = int(slot_index * slot + rng.integers(0, slot - length + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    needles.append(
      {
        "color": colour,
        "symbol": SYMBOLS[int(rng.integers(len(SYMBOLS)))],
        "frames": [start, start + length],
        "box": [top, left, top + side, left + side],
      }
    )
  grey = np.full(3, 128.0)
  distractors = []
  for colour in distractor_colours:
    span = int(rng.integers(settings.fps, 3 * settings.fps + 1))
    start = int(rng.integers(0, max(1, frames - span)))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    rgb = grey + settings.distractor_alike * (np.asarray(NEEDLE_COLORS[colour]) - grey)
    distractors.append(
      {
        "rgb": [int(round(c)) for c in rgb],
        "symbol": SYMBOLS[int(rng.integers(len(SYMBOLS)))],
        "frames": [start, min(frames, start + span)],
        "box": [top, left, top + side, left + side],
      }
    )
  questions = []
  for needle in needles:
    options = [str(o) for o in rng.permutation(SYMBOLS)]
    questions.append(
      {
        "question": f"Which symbol is on the {needle['color']} card?",
        "options": options,
        "answer": needle["symbol"],
        "answer_index": options.index(needle["symbol"]),
      }
    )
  return {
    "phase": float(rng.uniform(0, 2 * np.pi)),
    "tint": [float(v) for v in rng.uniform(-10, 10, 3)],
    "needles": needles,
    "distractors": distractors,
    "questions": questions,
  }


def render_needle_video(settings: NeedleSettings, plan: dict):
  """The frames of a planned video, one uint8[size, size, 3] at a time."""
  tint = np.asarray(plan["tint"], np.float32)
  cards = [
    (d["frames"], d["box"], card_image(d["rgb"], d["symbol"], d["box"][2] - d["box"][0]))
    for d in plan["distractors"]
  ]
  # Needles last: a distractor never hides one.
  cards += [
    (
      n["frames"],
      n["box"],
      card_image(NEEDLE_COLORS[n["color"]], n["symbol"], n["box"][2] - n["box"][0]),
    )
    for n in plan["needles"]
  ]
  for i in range(settings.num_frames):
    frame = muted_background(i / settings.fps, settings.size, plan["phase"], tint)
    for (start, stop), (top, left, bottom, right), card in cards:
      if start <= i < stop:
        frame[top:bottom, left:right] = card
    yield frame


def write_needle_benchmark(
  root: str,
  splits: dict[str, int],
  settings: NeedleSettings = NeedleSettings(),
  *,
  progress: bool = True,
) -> dict[str, str]:
  """Writes the needle benchmark under `root`; returns {split: path of its JSONL}.

  root/videos/<split>-<index>.mp4 and root/<split>.jsonl, one line per question in the
  generic JSONL format (qid, video relative to root, question, options, answer,
  answer_index, category) plus the ground truth: the needle's source frames
  [start, stop), its seconds, box, colour and symbol, and the video's fps and frame count
  (`candidate_relevance` turns these into per-candidate relevance for any n). A manifest
  records the settings: a second call with the same ones reuses what is there, videos
  already written are kept, and each file is written whole (temporary name, then rename).
  """
  settings.validate()
  os.makedirs(os.path.join(root, "videos"), exist_ok=True)
  manifest_path = os.path.join(root, "manifest.json")
  manifest = {"settings": dataclasses.asdict(settings), "splits": dict(splits)}
  paths = {split: os.path.join(root, f"{split}.jsonl") for split in splits}
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      existing = json.load(f)
    if existing["settings"] != manifest["settings"]:
      raise ValueError(
        f"{root} holds a needle benchmark with other settings "
        f"({existing['settings']}); use another directory"
      )
    if existing["splits"] == manifest["splits"] and all(map(os.path.exists, paths.values())):
      return paths
  from tqdm import tqdm

  jobs = [(split, i) for split, count in splits.items() for i in range(count)]
  lines: dict[str, list[dict]] = {split: [] for split in splits}
  for split, i in tqdm(jobs, desc="needle videos", disable=not progress, leave=False):
    video_id = f"{split}-{i:05d}"
    relative = os.path.join("videos", video_id + ".mp4")
    path = os.path.join(root, relative)
    plan = needle_video_plan(settings, split, i)
    if not os.path.exists(path):
      tmp = f"{path[:-4]}.tmp-{os.getpid()}.mp4"
      write_video(tmp, render_needle_video(settings, plan), settings.fps)
      os.replace(tmp, path)
    for q, (needle, question) in enumerate(zip(plan["needles"], plan["questions"])):
      start, stop = needle["frames"]
      lines[split].append(
        {
          "qid": f"{video_id}-q{q}",
          "video_id": video_id,
          "video": relative,
          **question,
          "category": {"color": needle["color"]},
          "duration_s": settings.duration_s,
          "fps": settings.fps,
          "num_frames": settings.num_frames,
          "needle": {
            "color": needle["color"],
            "rgb": list(NEEDLE_COLORS[needle["color"]]),
            "symbol": needle["symbol"],
            "frames": [start, stop],
            "seconds": [start / settings.fps, stop / settings.fps],
            "box": needle["box"],
          },
        }
      )
  for split, path in paths.items():
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines[split])
    os.replace(tmp, path)
  tmp = f"{manifest_path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, manifest_path)
  return paths


def candidate_relevance(item: dict, frame_indices) -> np.ndarray:
  """float32[n]: 1 where the candidate's source frame shows the item's needle (padding
  candidates, frame index -1, never do)."""
  start, stop = item["needle"]["frames"]
  frame_indices = np.asarray(frame_indices)
  return ((frame_indices >= start) & (frame_indices < stop)).astype(np.float32)


# --- Training records as frame arrays (unit tests) ---


def needle_records(
  num_videos: int,
  num_candidates: int,
  image_size: int,
  *,
  questions_per_video: int = 2,
  needle_frames: tuple[int, int] = (1, 3),
  padded_fraction: float = 0.25,
  seed: int = 0,
) -> list[dict]:
  """Training records whose candidates are frame arrays: a drifting muted background, and
  one coloured square (a needle) per question, each visible in a short run of frames. The
  question names a colour; the labels are high on that needle's frames only (highest on the
  frame where the square is whole), so a good selector must read the question.

  A `padded_fraction` of the videos are short: their last candidates are padding
  (valid False, zero frames, label 0). For unit tests of the pipeline and the trainer; the
  selector learns from real videos (`write_needle_benchmark`).
  """
  rng = np.random.default_rng(seed)
  names = list(NEEDLE_COLORS)
  if questions_per_video > len(names):
    raise ValueError(f"at most {len(names)} questions per video, got {questions_per_video}")
  n, size = num_candidates, image_size
  out = []
  for v in range(num_videos):
    num_valid = n if rng.random() >= padded_fraction else int(rng.integers(n // 2, n))
    # Muted background (channels in [60, 170]) drifting smoothly over time.
    base = rng.uniform(70, 150, 3)
    drift = rng.uniform(-20, 20, 3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = rng.uniform(-15, 15, 2)
    t = np.linspace(0, 1, n)
    frames = (base + drift * t[:, None])[:, None, None, :] + (ramp[0] * yy + ramp[1] * xx)[
      None, :, :, None
    ]
    frames = np.clip(frames, 60, 170)
    frames[num_valid:] = 0
    colors = rng.choice(len(names), questions_per_video, replace=False)
    side = max(2, size // 3)
    runs = []
    valid = np.arange(n) < num_valid
    for c in colors:
      length = int(rng.integers(needle_frames[0], needle_frames[1] + 1))
      start = int(rng.integers(0, num_valid - length + 1))
      peak = start + int(rng.integers(0, length))
      y, x = rng.integers(0, size - side + 1, 2)
      spatial = np.full(n, 0.05, np.float32)
      for f in range(start, start + length):
        # The square is whole at the peak frame and half-size around it, so the label has
        # one best frame per question.
        s = side if f == peak else max(1, side // 2)
        frames[f, y : y + s, x : x + s] = NEEDLE_COLORS[names[c]]
        spatial[f] = 0.9 if f == peak else 0.6
      runs.append((names[c], start, length, spatial * valid))
    frames = frames.astype(np.uint8)
    duration = float(num_valid)  # one second per candidate
    timestamps = np.where(valid, np.arange(n, dtype=np.float32) * duration / num_valid, -1.0)
    for color, start, length, spatial in runs:
      # Spatial: a soft "does this frame help" score per frame; temporal: listed frames get 1.
      temporal = np.zeros(n, np.float32)
      temporal[start : start + length] = 1.0
      temporal = temporal * valid
      # Half the questions are multiple choice over the start frame.
      options = []
      if rng.random() < 0.5:
        options = sorted({start, *rng.integers(0, num_valid, 3).tolist()})
        options = [f"frame {o}" for o in options]
      out.append(
        {
          "video_id": f"needle-{seed}-{v:05d}",
          "frames": frames,
          "timestamps": timestamps.astype(np.float32),
          "valid": valid,
          "question": f"When does the {color} square appear?",
          "options": options,
          "answer": f"frames {start} to {start + length - 1}",
          "labels": ((spatial + temporal) / 2).astype(np.float32),
          "spatial": spatial,
          "temporal": temporal.astype(np.float32),
        }
      )
  return out
