"""Training records: the schema, generated needle records, grain sources and the input pipeline.

One record is one video-question pair (DESIGN.md):
  video_id    str
  video       JPEG bytes of each of the n candidate frames (list of bytes), or absent when
              `frames` holds them already decoded (generated records)
  frames      uint8[n, H, W, 3], optional: decoded candidates
  timestamps  float32[n] seconds
  valid       bool[n]; False marks padding frames of short videos
  question    str
  options     list[str], may be empty
  answer      str
  labels      float32[n] in [0, 1]: the combined pseudo-label (mean of the two below)
  spatial     float32[n], temporal float32[n]: optional, when known

A source is anything with `__len__` and `__getitem__(int) -> record` (grain's
RandomAccessDataSource protocol): `InMemorySource`, `ArrayRecordSource`, or later
`tfds.data_source(...)` of the TFDS builder. `make_example` turns a record into fixed-shape
arrays, `global_batches` makes the deterministic, resumable, per-process grain pipeline.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import os
from typing import Any, Callable, Sequence

import grain
import ml_dtypes
from absl import flags
import numpy as np
from flax import serialization

from frameselect_jax.text import question_prompt

REQUIRED_FIELDS = ("video_id", "timestamps", "valid", "question", "answer", "labels")
ARRAY_FIELDS = {"timestamps": np.float32, "valid": np.bool_, "labels": np.float32,
                "spatial": np.float32, "temporal": np.float32}


def check_record(record: dict, num_candidates: int) -> dict:
  """Raises a clear error when a record does not follow the schema above."""
  missing = [f for f in REQUIRED_FIELDS if f not in record]
  if "frames" not in record and "video" not in record:
    missing.append("video (or frames)")
  if missing:
    raise ValueError(f"record {record.get('video_id', '?')!r} lacks fields {missing}")
  for name in ARRAY_FIELDS:
    if name in record and np.shape(record[name]) != (num_candidates,):
      raise ValueError(f"record {record['video_id']!r}: {name} has shape "
                       f"{np.shape(record[name])}, expected ({num_candidates},)")
  labels = np.asarray(record["labels"], np.float32)
  if not np.all((labels >= 0) & (labels <= 1)):
    raise ValueError(f"record {record['video_id']!r}: labels must lie in [0, 1]")
  if not np.any(record["valid"]):
    raise ValueError(f"record {record['video_id']!r} has no valid frame")
  return record


# --- Generated needle records (tests, benchmarks, tiny configs) ---

NEEDLE_COLORS = {"red": (230, 30, 30), "blue": (30, 60, 235), "yellow": (240, 220, 20),
                 "white": (250, 250, 250), "green": (20, 200, 40), "magenta": (220, 30, 220)}


def needle_records(num_videos: int, num_candidates: int, image_size: int, *,
                   questions_per_video: int = 2, needle_frames: tuple[int, int] = (1, 3),
                   padded_fraction: float = 0.25, seed: int = 0) -> list[dict]:
  """Videos as frame arrays: a drifting muted background, and one coloured square (a needle)
  per question, each visible in a short run of frames. The question names a colour; the
  labels are high on that needle's frames only (highest on the frame where the square is
  whole), so a good selector must read the question.

  A `padded_fraction` of the videos are short: their last candidates are padding
  (valid False, zero frames, label 0).
  """
  rng = np.random.default_rng(seed)
  names = list(NEEDLE_COLORS)
  if questions_per_video > len(names):
    raise ValueError(f"at most {len(names)} questions per video, got {questions_per_video}")
  n, size = num_candidates, image_size
  records = []
  for v in range(num_videos):
    num_valid = n if rng.random() >= padded_fraction else int(rng.integers(n // 2, n))
    # Muted background (channels in [60, 170]) drifting smoothly over time.
    base = rng.uniform(70, 150, 3)
    drift = rng.uniform(-20, 20, 3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = rng.uniform(-15, 15, 2)
    t = np.linspace(0, 1, n)
    frames = ((base + drift * t[:, None])[:, None, None, :]
              + (ramp[0] * yy + ramp[1] * xx)[None, :, :, None])
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
        frames[f, y:y + s, x:x + s] = NEEDLE_COLORS[names[c]]
        spatial[f] = 0.9 if f == peak else 0.6
      runs.append((names[c], start, length, spatial * valid))
    frames = frames.astype(np.uint8)
    duration = float(num_valid)  # one second per candidate
    timestamps = np.where(valid, np.arange(n, dtype=np.float32) * duration / num_valid, -1.0)
    for color, start, length, spatial in runs:
      # Spatial: a soft "does this frame help" score per frame; temporal: listed frames get 1.
      temporal = np.zeros(n, np.float32)
      temporal[start:start + length] = 1.0
      temporal = temporal * valid
      # Half the questions are multiple choice over the start frame.
      options = []
      if rng.random() < 0.5:
        options = sorted({start, *rng.integers(0, num_valid, 3).tolist()})
        options = [f"frame {o}" for o in options]
      records.append({
          "video_id": f"needle-{seed}-{v:05d}", "frames": frames,
          "timestamps": timestamps.astype(np.float32), "valid": valid,
          "question": f"When does the {color} square appear?",
          "options": options,
          "answer": f"frames {start} to {start + length - 1}",
          "labels": ((spatial + temporal) / 2).astype(np.float32),
          "spatial": spatial, "temporal": temporal.astype(np.float32),
      })
  return records


# --- Sources ---

class InMemorySource:
  """A list of records as a grain random-access source."""

  def __init__(self, records: Sequence[dict]):
    self.records = list(records)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]

  def __repr__(self):
    return f"InMemorySource({len(self)} records)"


def serialize_record(record: dict) -> bytes:
  """msgpack bytes (flax.serialization keeps numpy arrays exactly)."""
  return serialization.msgpack_serialize(dict(record))


def deserialize_record(data: bytes) -> dict:
  record = serialization.msgpack_restore(data)
  if isinstance(record.get("options"), dict):  # msgpack_restore turns lists into {"0": ...}
    record["options"] = [record["options"][k] for k in sorted(record["options"], key=int)]
  if isinstance(record.get("video"), dict):
    record["video"] = [record["video"][k] for k in sorted(record["video"], key=int)]
  return record


def write_array_record(path: str, records: Sequence[dict]) -> str:
  """Writes records to one array_record file (the format TFDS uses), returns the path."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = ArrayRecordWriter(path, "group_size:1")
  for record in records:
    writer.write(serialize_record(record))
  writer.close()
  return path


class ArrayRecordSource:
  """Records from array_record files (a glob pattern or a list of paths)."""

  def __init__(self, paths: str | Sequence[str]):
    files = sorted(glob.glob(paths)) if isinstance(paths, str) else list(paths)
    if not files:
      raise FileNotFoundError(f"no array_record files match {paths!r}")
    self.paths = files
    self.source = grain.sources.ArrayRecordDataSource(files)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return deserialize_record(self.source[index])

  def __repr__(self):
    return f"ArrayRecordSource({len(self)} records in {len(self.paths)} files)"


def tfds_source(name: str, split: str, data_dir: str | None = None):
  """The TFDS builder's array_record split, read without TensorFlow."""
  import tensorflow_datasets as tfds
  return tfds.data_source(name, split=split, data_dir=data_dir or None)


# --- Record -> fixed-shape arrays ---

def normalize_frames(frames):
  """uint8 pixels -> [-1, 1] (SigLIP: mean = std = 0.5). Works on numpy and jax arrays."""
  return frames.astype(np.float32) / 127.5 - 1.0


def decode_jpeg_frames(jpegs: Sequence[bytes], valid, image_size: int) -> np.ndarray:
  """JPEG bytes of the candidates -> uint8[n, S, S, 3]; padding frames stay zero."""
  from PIL import Image
  frames = np.zeros((len(valid), image_size, image_size, 3), np.uint8)
  for i, (data, ok) in enumerate(zip(jpegs, valid)):
    if ok and data:
      image = Image.open(io.BytesIO(data)).convert("RGB")
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
      frames[i] = np.asarray(image)
  return frames


def record_frames(record: dict, image_size: int) -> np.ndarray:
  if "frames" in record:
    frames = np.asarray(record["frames"], np.uint8)
    if frames.shape[1:] != (image_size, image_size, 3):
      raise ValueError(f"record {record['video_id']!r} frames are {frames.shape[1:]}, the vision "
                       f"tower expects ({image_size}, {image_size}, 3)")
    return frames
  video = record["video"]
  if not isinstance(video, (list, tuple)):
    raise ValueError(
        f"record {record['video_id']!r}: `video` must be a list of JPEG bytes, one per "
        f"candidate, got {type(video).__name__} (a path? decode its candidates with "
        f"frameselect_jax.video.decode_candidates and store them as JPEG bytes)")
  return decode_jpeg_frames(video, record["valid"], image_size)


def instruction_prompt(question: str, options: Sequence[str] = ()) -> str:
  """Stage-1 visual instruction following: the text before the answer."""
  text = f"Question: {question.strip()}"
  if options:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text += "\nOptions:\n" + "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
  return text + "\nAnswer:"


def _encode(tokenizer, text):
  return list(tokenizer.encode(text, add_special_tokens=False))


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What `make_example` produces; shared by the pipeline, the train step and AOT compile."""
  num_candidates: int
  image_size: int
  tokens_per_frame: int
  vision_width: int
  max_question_length: int
  max_instruction_length: int
  visual_dtype: str = "float32"   # dtype of cached visual tokens fed to the step

  def shapes(self, cached: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
    """field -> (shape without batch, dtype) of one example."""
    n = self.num_candidates
    out = {"valid": ((n,), np.bool_), "labels": ((n,), np.float32),
           "question_ids": ((self.max_question_length,), np.int32),
           "question_mask": ((self.max_question_length,), np.int32),
           "text_ids": ((self.max_instruction_length,), np.int32),
           "text_mask": ((self.max_instruction_length,), np.int32),
           "answer_mask": ((self.max_instruction_length,), np.int32),
           "weight": ((), np.float32)}
    if cached:
      dtype = ml_dtypes.bfloat16 if self.visual_dtype == "bfloat16" else np.dtype(self.visual_dtype)
      out["visual"] = ((n, self.tokens_per_frame, self.vision_width), dtype)
    else:
      out["frames"] = ((n, self.image_size, self.image_size, 3), np.uint8)
    return out


def make_example(record: dict, spec: ExampleSpec, tokenizer, *, eos_id: int,
                 vocab_size: int, visual_lookup: Callable[[str], np.ndarray] | None = None) -> dict:
  """One record -> fixed-shape numpy arrays for both training tasks.

  question_ids/mask: the selector prompt, right-padded. text_ids/mask: instruction prompt,
  answer and eos, right-padded; answer_mask marks the answer and eos tokens (the targets of
  the instruction loss). With `visual_lookup`, the cached pooled tokens of the video replace
  the frames.
  """
  n = spec.num_candidates
  check_record(record, n)
  valid = np.asarray(record["valid"], bool)
  question_tokens = _encode(tokenizer, question_prompt(record["question"], record.get("options") or ()))
  prompt = _encode(tokenizer, instruction_prompt(record["question"], record.get("options") or ()))
  answer = _encode(tokenizer, " " + record["answer"].strip()) + [eos_id]
  for name, tokens, limit in (("question prompt", question_tokens, spec.max_question_length),
                              ("instruction prompt + answer", prompt + answer,
                               spec.max_instruction_length)):
    if len(tokens) > limit:
      raise ValueError(f"record {record['video_id']!r}: {name} has {len(tokens)} tokens, more "
                       f"than the configured maximum {limit}")
    if max(tokens) >= vocab_size:
      raise ValueError(f"token id {max(tokens)} >= vocab_size {vocab_size}: the tokenizer does "
                       f"not match the LLM")
  q_ids = np.zeros(spec.max_question_length, np.int32)
  q_ids[:len(question_tokens)] = question_tokens
  text = prompt + answer
  t_ids = np.zeros(spec.max_instruction_length, np.int32)
  t_ids[:len(text)] = text
  answer_mask = np.zeros(spec.max_instruction_length, np.int32)
  answer_mask[len(prompt):len(text)] = 1
  example = {
      "valid": valid,
      "labels": np.where(valid, np.asarray(record["labels"], np.float32), 0.0).astype(np.float32),
      "question_ids": q_ids,
      "question_mask": (np.arange(spec.max_question_length) < len(question_tokens)).astype(np.int32),
      "text_ids": t_ids,
      "text_mask": (np.arange(spec.max_instruction_length) < len(text)).astype(np.int32),
      "answer_mask": answer_mask,
      "weight": np.float32(1.0),
  }
  shapes = spec.shapes(cached=visual_lookup is not None)
  if visual_lookup is not None:
    visual = visual_lookup(record["video_id"])
    shape, dtype = shapes["visual"]
    if visual.shape != shape:
      raise ValueError(f"cached visual tokens of {record['video_id']!r} have shape {visual.shape}, "
                       f"expected {shape}: the cache was built for another model config")
    example["visual"] = np.asarray(visual).astype(dtype)
  else:
    example["frames"] = record_frames(record, spec.image_size)
  return example


def empty_example(spec: ExampleSpec, cached: bool) -> dict:
  """An all-zero example with weight 0 (pads the last evaluation batch)."""
  return {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.shapes(cached).items()}


# --- grain pipeline ---

def global_batches(dataset: grain.MapDataset, *, global_batch_size: int, process_index: int,
                   process_count: int, seed: int | None, num_epochs: int | None) -> grain.MapDataset:
  """Deterministic, per-process batches of a random-access dataset.

  The order is a seeded permutation, reshuffled every epoch (seed None: file order, one
  pass). Global batch s holds elements [s*B, (s+1)*B) of that order; process p reads only
  its block [s*B + p*B/P, s*B + (p+1)*B/P), so the union over processes is the same batch
  a single process would read. Everything is lazy: a process loads only its records.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  local = global_batch_size // process_count
  if seed is not None:
    dataset = dataset.shuffle(seed=seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  dataset = dataset.batch(local, drop_remainder=True)
  return dataset[process_index::process_count]


def to_iterator(dataset: grain.MapDataset, num_threads: int = 2, prefetch: int = 4,
                worker_count: int = 0):
  """A checkpointable grain iterator; worker processes when worker_count > 0."""
  iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch))
  if worker_count > 0:
    # grain's workers read absl flags; outside an absl program nothing has parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)
