"""The selection file: the hand-off between choosing frames and answering questions.

JSON Lines, one object per (question, strategy, k), strict JSON (no NaN):

  qid         str, unique within a benchmark: the question
  video_id    str: the video the frames come from
  strategy    str: what chose them (nms_greedy, uniform, top_k, ...)
  n           int >= 1: candidates the strategy chose from
  k           int >= 1: frames asked for
  indices     list[int]: the chosen candidates, ascending, unique, each in [0, n); at most k
              (fewer when the video has fewer valid candidates)
  timestamps  list[float]: seconds of each chosen candidate in the video, one per index
  scores      list[float | null], optional: the strategy's score of every candidate
              (length n; null on padding candidates of a short video)

Other fields (a benchmark name, a seed) are kept as they are. `frameselect select --json`,
the Python API and the evaluation harness write it; other harnesses can read it. This
module needs only json and numpy, so reporting tools read it without importing JAX.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from frameselect_jax import jsonl

REQUIRED = ("qid", "video_id", "strategy", "n", "k", "indices", "timestamps")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check(record: dict) -> dict:
  """Raises ValueError naming the first field that breaks the schema above."""
  missing = [f for f in REQUIRED if f not in record]
  if missing:
    raise ValueError(f"missing fields {missing}")
  for name in ("qid", "video_id", "strategy"):
    if not isinstance(record[name], str) or not record[name]:
      raise ValueError(f"{name} must be a non-empty string, got {record[name]!r}")
  n, k = record["n"], record["k"]
  for name, value in (("n", n), ("k", k)):
    if not _is_int(value) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  indices, timestamps = record["indices"], record["timestamps"]
  if not isinstance(indices, list) or not all(_is_int(i) for i in indices):
    raise ValueError(f"indices must be a list of integers, got {indices!r}")
  if len(indices) > k:
    raise ValueError(f"{len(indices)} indices for k={k}")
  if any(not 0 <= i < n for i in indices):
    raise ValueError(f"indices {indices} must lie in [0, n={n})")
  if any(b <= a for a, b in zip(indices, indices[1:])):
    raise ValueError(f"indices {indices} must be sorted and unique")
  if not isinstance(timestamps, list) or not all(
    _is_number(t) and math.isfinite(t) for t in timestamps
  ):
    raise ValueError("timestamps must be a list of finite numbers")
  if len(timestamps) != len(indices):
    raise ValueError(f"{len(timestamps)} timestamps for {len(indices)} indices")
  scores = record.get("scores")
  if scores is not None:
    if not isinstance(scores, list) or len(scores) != n:
      raise ValueError(
        f"scores must be a list of length n={n}, got "
        f"{len(scores) if isinstance(scores, list) else type(scores).__name__}"
      )
    if not all(s is None or (_is_number(s) and math.isfinite(s)) for s in scores):
      raise ValueError("scores must be finite numbers or null")
  return record


def read(path: str) -> list[dict]:
  """Every record of a selection file, checked; a bad line raises jsonl.JsonlError naming
  the file and the line number."""
  return jsonl.read(path, check)


def append(path: str, records: Iterable[dict]) -> int:
  """Checks each record and appends it as one whole line; returns how many were written."""
  return jsonl.append(path, (check(r) for r in records))


def write(path: str, records: Iterable[dict]) -> int:
  """Writes a new selection file (replacing any file at `path`)."""
  with open(path, "w"):
    pass
  return append(path, records)
