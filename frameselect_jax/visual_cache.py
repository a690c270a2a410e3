"""Cache of pooled visual tokens, one file per distinct set of candidate frames.

The vision tower is frozen in stage 2 and its pooled output depends only on the candidate
frames, so `encode_frames` runs once per video (jitted) instead of every step. Keys are
contents, never names, so a dataset rebuilt at the same path with new videos is re-encoded
and an unchanged one is reused wherever it lives:

- the directory is named by a fingerprint of the tower (its weights' identity, pooling
  grid, compute dtypes and input image size): `tower_fingerprint`;
- each file is named by `content_key(record, image_size)`: a hash of the candidates' pixels
  as the record stores them (the JPEG bytes, or the decoded array), their timestamps and
  validity, n and the image size they are resized to. Two questions about one video file
  with different spans have different candidates, so different keys; two questions about
  the same candidates share one entry.

A file is the .npy bytes of the tokens followed by the SHA-256 digest of those bytes. One
whose digest does not match (truncated or corrupt, as a killed writer or a bad disk can
leave it) is never loaded: `load` treats it as absent, so `fill` recomputes it. Writes are
atomic (temporary file, then rename): several processes may fill one directory at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

DIGEST_BYTES = 32  # SHA-256


def fingerprint(**parts) -> str:
  """A short stable hash of JSON-serialisable parts (e.g. config values, checkpoint files)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def arrays_fingerprint(tree) -> str:
  """A short hash of every array in a pytree (shapes, dtypes and bytes)."""
  import jax

  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def tower_fingerprint(model, selector_cfg, seed: int, trained_tower=None) -> str:
  """What decides the pooled tokens apart from the candidates: the tower's sizes and input
  size, pooling grid, dtypes, and its weights' identity (the Hugging Face files of
  model.vision_dir, else the seed of the random init; or a hash of a tower stage 1 trained).
  Names the trainer's cache directory, and a dataset built with visual tokens."""
  return fingerprint(
    vision=str(selector_cfg.vision),
    pool_grid=selector_cfg.pool_grid,
    dtype=model.dtype,
    frozen_dtype=model.frozen_dtype,
    vision_files=directory_identity(model.vision_dir),
    seed=None if model.vision_dir else seed,
    trained_tower=None if trained_tower is None else arrays_fingerprint(trained_tower),
  )


def directory_identity(directory: str) -> list:
  """(name, size, modification time) of each file in a checkpoint directory: cheap to compute
  for many GB of weights, and it changes when any file is replaced or rewritten."""
  if not directory:
    return []
  files = sorted((e for e in os.scandir(directory) if e.is_file()), key=lambda e: e.name)
  return [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files]


def _update_array(digest, name, array):
  array = np.ascontiguousarray(array)
  digest.update(f"{name}:{array.dtype.str}:{array.shape}:".encode())
  digest.update(array.tobytes())


def content_key(record: dict, image_size: int) -> str:
  """The hex key of a training record's candidate frames (schema: `records.py`): what its
  pooled tokens are computed from, and nothing else (not its video_id, not its path)."""
  digest = hashlib.sha256(f"frameselect-visual-tokens:v1:image_size={image_size}:".encode())
  _update_array(digest, "timestamps", np.asarray(record["timestamps"], np.float32))
  _update_array(digest, "valid", np.asarray(record["valid"], np.bool_))
  if "frames" in record:
    _update_array(digest, "frames", np.asarray(record["frames"], np.uint8))
  else:
    video = record["video"]
    digest.update(f"jpeg:{len(video)}:".encode())
    for jpeg in video:
      digest.update(len(jpeg).to_bytes(8, "little"))
      digest.update(jpeg)
  return digest.hexdigest()[:40]


class VisualTokenCache:
  """content key -> float32[n, g*g, vision width], stored as <directory>/<key>.npy."""

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)

  def path(self, key: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{8,64}", key or ""):
      raise ValueError(f"a cache key is a hex digest (content_key), got {key!r}")
    return os.path.join(self.directory, key + ".npy")

  def load(self, key: str) -> np.ndarray | None:
    """The tokens, or None when the entry is absent or damaged (its digest does not match)."""
    try:
      with open(self.path(key), "rb") as f:
        blob = f.read()
    except FileNotFoundError:
      return None
    body, digest = blob[:-DIGEST_BYTES], blob[-DIGEST_BYTES:]
    if len(blob) <= DIGEST_BYTES or hashlib.sha256(body).digest() != digest:
      return None
    return np.load(io.BytesIO(body))

  def get(self, key: str) -> np.ndarray:
    tokens = self.load(key)
    if tokens is None:
      state = "damaged" if os.path.exists(self.path(key)) else "missing"
      raise KeyError(f"visual tokens {key} are {state} in the cache {self.directory}")
    return tokens

  def put(self, key: str, tokens: np.ndarray) -> None:
    path = self.path(key)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(tokens, np.float32))
    body = buffer.getvalue()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def fill(
  cache: VisualTokenCache,
  videos: Iterable[tuple[str, Callable[[], np.ndarray]]],
  encode: Callable[[np.ndarray], np.ndarray],
  *,
  total: int | None = None,
  show_progress: bool = True,
) -> tuple[int, int]:
  """Encodes every entry missing from the cache, or damaged in it; returns (encoded, reused),
  counting distinct keys.

  videos: (content key, load_frames) pairs, load_frames() -> uint8[n, H, W, 3];
  encode: uint8 frames (1, n, H, W, 3) -> pooled tokens (1, n, g*g, D).
  """
  encoded = reused = 0
  seen = set()
  for key, load_frames in tqdm(
    videos, total=total, desc="visual-token cache", disable=not show_progress, leave=False
  ):
    if key in seen:
      continue
    seen.add(key)
    if cache.load(key) is not None:
      reused += 1
      continue
    cache.put(key, np.asarray(encode(load_frames()[None]))[0])
    encoded += 1
  return encoded, reused
