"""Cache of pooled visual tokens, one .npy file per video.

The vision tower is frozen in both training stages and its pooled output depends only on
the video, so `encode_frames` runs once per video (jitted) instead of every step. The
cache directory is keyed by a fingerprint of everything the tokens depend on (vision
weights, pooling grid, compute dtype, image size), so a changed model never reads stale
tokens. Writes are atomic (temporary file, then rename): several processes may fill one
directory at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm


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


def directory_identity(directory: str) -> list:
  """(name, size, modification time) of each file in a checkpoint directory: cheap to compute
  for many GB of weights, and it changes when any file is replaced or rewritten."""
  if not directory:
    return []
  files = sorted((e for e in os.scandir(directory) if e.is_file()), key=lambda e: e.name)
  return [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files]


class VisualTokenCache:
  """video_id -> float32[n, g*g, vision width] stored as <directory>/<video_id>.npy."""

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)

  def path(self, video_id: str) -> str:
    if not video_id:
      raise ValueError("empty video_id")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", video_id)
    if safe != video_id:  # keep distinct ids distinct after escaping
      safe += "-" + hashlib.sha1(video_id.encode()).hexdigest()[:8]
    return os.path.join(self.directory, safe + ".npy")

  def __contains__(self, video_id: str) -> bool:
    return os.path.exists(self.path(video_id))

  def get(self, video_id: str) -> np.ndarray:
    path = self.path(video_id)
    if not os.path.exists(path):
      raise KeyError(f"video {video_id!r} is not in the visual-token cache {self.directory}")
    return np.load(path)

  def put(self, video_id: str, tokens: np.ndarray) -> None:
    path = self.path(video_id)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(tokens, np.float32))
    os.replace(tmp, path)


def fill(
  cache: VisualTokenCache,
  videos: Iterable[tuple[str, Callable[[], np.ndarray]]],
  encode: Callable[[np.ndarray], np.ndarray],
  *,
  total: int | None = None,
  show_progress: bool = True,
) -> int:
  """Encodes every video missing from the cache; returns how many were computed.

  videos: (video_id, load_frames) pairs, load_frames() -> uint8[n, H, W, 3];
  encode: uint8 frames (1, n, H, W, 3) -> pooled tokens (1, n, g*g, D).
  """
  computed = 0
  seen = set()
  for video_id, load_frames in tqdm(
    videos, total=total, desc="visual-token cache", disable=not show_progress, leave=False
  ):
    if video_id in seen or video_id in cache:
      seen.add(video_id)
      continue
    seen.add(video_id)
    tokens = np.asarray(encode(load_frames()[None]))[0]
    cache.put(video_id, tokens)
    computed += 1
  return computed
