"""Training records: the schema, its check, serialisation and the JPEG codec of frames.

One record is one video-question pair:
  video_id    str
  video       JPEG bytes of each of the n candidate frames (list of bytes), or absent when
              `frames` holds them already decoded
  frames      uint8[n, H, W, 3], optional: decoded candidates
  visual_tokens  float[n, tokens per frame, vision width], optional: the candidates' pooled
              visual tokens instead of their pixels, with `visual_tower` (str), the
              fingerprint of the tower that made them (`visual_cache.tower_fingerprint`)
  timestamps  float32[n] seconds
  valid       bool[n]; False marks padding frames of short videos
  question    str, not empty
  options     list[str], may be empty
  answer      str
  labels      float32[n] in [0, 1]: the combined pseudo-label (mean of the two below)
  spatial     float32[n], temporal float32[n]: optional, when known
  other_labels  float32[n], optional: per candidate, the largest label among the other
              questions about the same video and candidates (`with_other_labels`); what
              `train.other_question_weight` reads
  qid, benchmark  str, optional: the question's id in its benchmark (`videoqa.Item`)

Records are stored as msgpack bytes in array_record files (the format TFDS uses) and read
through the sources of `frameselect_jax.input_pipeline`.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from flax import serialization

REQUIRED_FIELDS = ("video_id", "timestamps", "valid", "question", "answer", "labels")
ARRAY_FIELDS = {
  "timestamps": np.float32,
  "valid": np.bool_,
  "labels": np.float32,
  "spatial": np.float32,
  "temporal": np.float32,
  "other_labels": np.float32,
}


def check_record(record: dict, num_candidates: int) -> dict:
  """Raises a clear error when a record does not follow the schema above."""
  missing = [f for f in REQUIRED_FIELDS if f not in record]
  if not any(f in record for f in ("frames", "video", "visual_tokens")):
    missing.append("video (or frames, or visual_tokens)")
  if missing:
    raise ValueError(f"record {record.get('video_id', '?')!r} lacks fields {missing}")
  for name in ARRAY_FIELDS:
    if name in record and np.shape(record[name]) != (num_candidates,):
      raise ValueError(
        f"record {record['video_id']!r}: {name} has shape "
        f"{np.shape(record[name])}, expected ({num_candidates},) "
        f"(model.num_candidates={num_candidates})"
      )
  if not isinstance(record["question"], str) or not record["question"].strip():
    raise ValueError(f"record {record['video_id']!r} has an empty question")
  labels = np.asarray(record["labels"], np.float32)
  if not np.all((labels >= 0) & (labels <= 1)):
    raise ValueError(f"record {record['video_id']!r}: labels must lie in [0, 1]")
  if not np.any(record["valid"]):
    raise ValueError(f"record {record['video_id']!r} has no valid frame")
  return record


def with_other_labels(group: Sequence[dict]) -> list[dict]:
  """Copies of `group`'s records, each with `other_labels`: per candidate, the largest label
  among the other records of the same video and candidate times. A candidate that another
  question asks about but this one does not is a hard negative for this one. Records of
  other videos (or other candidates of one video: another span) do not count, so `group`
  may hold any records, in any order."""

  def key(record):
    times = np.asarray(record["timestamps"], np.float32)
    return record["video_id"], times.tobytes()

  by_key: dict = {}
  for i, record in enumerate(group):
    by_key.setdefault(key(record), []).append(i)
  out = []
  for i, record in enumerate(group):
    others = [np.asarray(group[j]["labels"], np.float32) for j in by_key[key(record)] if j != i]
    n = len(record["labels"])
    other = np.max(others, axis=0) if others else np.zeros(n, np.float32)
    out.append({**record, "other_labels": other.astype(np.float32)})
  return out


# --- Serialisation ---


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
  """Writes records to one array_record file, returns the path."""
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = ArrayRecordWriter(path, "group_size:1")
  for record in records:
    writer.write(serialize_record(record))
  writer.close()
  return path


TEXT_FIELDS = ("video_id", "qid", "benchmark", "question", "answer", "visual_tower")


def from_tfds(example: dict) -> dict:
  """A record as `tfds.data_source` returns it (text as bytes) -> the schema above."""
  record = dict(example)
  for name in TEXT_FIELDS:
    if isinstance(record.get(name), bytes):
      record[name] = record[name].decode("utf-8")
  if "options" in record:
    record["options"] = [
      o.decode("utf-8") if isinstance(o, bytes) else o for o in record["options"]
    ]
  if "video" in record:
    record["video"] = list(record["video"])
  return record


# --- Frames as JPEG bytes ---


def encode_jpeg_frames(frames, valid=None, quality: int = 90) -> list[bytes]:
  """uint8[n, H, W, 3] -> the JPEG bytes of each frame (a record's `video`); padding frames
  (valid False) become empty bytes."""
  from PIL import Image

  frames = np.asarray(frames, np.uint8)
  valid = np.ones(len(frames), bool) if valid is None else np.asarray(valid, bool)
  out = []
  for frame, ok in zip(frames, valid):
    buffer = io.BytesIO()
    if ok:
      Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    out.append(buffer.getvalue())
  return out


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
  """The record's n candidate frames, uint8[n, S, S, 3]."""
  if "frames" in record:
    frames = np.asarray(record["frames"], np.uint8)
    if frames.shape[1:] != (image_size, image_size, 3):
      raise ValueError(
        f"record {record['video_id']!r} frames are {frames.shape[1:]}, the vision "
        f"tower expects ({image_size}, {image_size}, 3)"
      )
    return frames
  video = record["video"]
  if not isinstance(video, (list, tuple)):
    raise ValueError(
      f"record {record['video_id']!r}: `video` must be a list of JPEG bytes, one per "
      f"candidate, got {type(video).__name__} (a path? decode its candidates with "
      f"frameselect_jax.video.decode_candidates and store them as JPEG bytes)"
    )
  return decode_jpeg_frames(video, record["valid"], image_size)
