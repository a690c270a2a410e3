"""Published frame selectors to compare against (peers): BOLT, AKS and GenS's answer format.

Plain numpy, one call per video. `bolt` and `aks` follow selection.py's conventions (and its
check of k):
  * inputs: scores float[n] (e.g. query-frame similarity), valid bool[n] (False marks padding),
    k a Python int with 1 <= k <= n.
  * output: int32[k] candidate indices, ascending, unique, all valid. When fewer than k
    candidates are valid, all valid ones are returned, followed by -1.
  * NaN scores rank lowest (as -inf); ties go to the lowest index.
Both work on the valid candidates only, in index order (padding is never seen). For min-max
normalisation, non-finite scores are clipped to the range of the finite valid ones (NaN and
-inf to the lowest, +inf to the highest); with no finite valid score all count as equal.

GenS (a fine-tuned VideoLLM) answers with JSON naming frames and their relevance;
`parse_gens` reads that answer and `gens_scores` turns it into scores for selection.top_k or
selection.nms_greedy. `GENS_INSTRUCTION` is the instruction GenS is asked with.

Sources:
  BOLT: Liu et al., CVPR 2025, github.com/sming256/BOLT, select_frames.py
        `inverse_transform_sampling` and scripts/frame_selection.sh (power 3, or 2.5 on
        LongVideoBench).
  AKS:  Tang et al., CVPR 2025, github.com/ncTimTang/AKS, frame_select.py (`meanstd` and
        `main`; defaults t1=0.8, t2=-100, all_depth=5).
  GenS: Yao et al., arXiv 2503.09146, github.com/yaolinli/GenS, inference.py (the prompt)
        and README (the answer format).
"""

from __future__ import annotations

import ast
import json
import math
import re

import numpy as np

from frameselect_jax.selection import check_k

# --- shared helpers ---


def _valid_scores(scores, valid, k):
  """-> (float64 scores of the valid candidates, NaN -> -inf; their indices, ascending)."""
  valid = np.asarray(valid).astype(bool)
  if valid.ndim != 1:
    raise ValueError(f"valid must be 1-D [n], got shape {valid.shape}")
  scores = np.asarray(scores, np.float64)
  if scores.shape != valid.shape:
    raise ValueError(f"scores {scores.shape} and valid {valid.shape} must have the same shape")
  check_k(k, valid.shape[0])
  index = np.flatnonzero(valid)
  values = scores[index]
  values[np.isnan(values)] = -np.inf
  return values, index


def _with_fill(picks, k: int) -> np.ndarray:
  """Sorted picks (candidate indices), then -1 up to k."""
  out = np.full(k, -1, np.int32)
  picks = np.sort(np.asarray(picks, np.int64))
  out[: len(picks)] = picks
  return out


def _unit_range(values):
  """Min-max normalisation to [0, 1] -> (normalised, constant). Non-finite values are
  clipped to the finite range first; `constant` when every value is then equal (the
  normalised values are all 0 in that case)."""
  finite = np.isfinite(values)
  if finite.any():
    clipped = np.clip(values, values[finite].min(), values[finite].max())
  else:
    clipped = np.zeros_like(values)
  lo, hi = clipped.min(), clipped.max()
  if hi <= lo:
    return np.zeros_like(values), True
  return (clipped - lo) / (hi - lo), False


def _best_first(values, positions):
  """positions sorted by value descending, then position ascending."""
  positions = np.asarray(positions)
  return positions[np.lexsort((positions, -values[positions]))]


# --- BOLT ---


def bolt(scores, valid, k: int, power: float = 3.0) -> np.ndarray:
  """BOLT's inverse transform sampling over query-frame similarity, made to return k unique
  frames.

  Follows BOLT's `inverse_transform_sampling` (select_frames.py):
    1. min-max normalise the scores of the valid candidates to [0, 1];
    2. raise them to `power` (the published runs use 3, and 2.5 on LongVideoBench; BOLT's
       own default -1 means no power, which is power=1 here) and normalise them into a
       distribution p over the valid candidates; the lowest-scoring candidate gets mass 0;
    3. take k evenly spaced quantiles u of the CDF and map each to the candidate whose CDF
       interval contains it.
  Differences from the original:
    * quantiles at u_i = (i + 1/2) / k, i = 0..k-1 (BOLT: linspace(1/k, 1 - 1/k, k)), and
      candidate j's interval is [C_{j-1}, C_j), C_j = p_0 + ... + p_j (BOLT's
      searchsorted(side="left") uses (C_{j-1}, C_j]; this only matters exactly on a
      boundary). With constant scores (BOLT divides by zero there) every candidate gets the
      same mass, so the picks are exactly selection.uniform's: floor((i + 1/2) n_valid / k).
    * BOLT returns a frame several times when several quantiles fall in its interval (its
      evaluation code feeds the repeats to the model). Here collisions are broken in
      quantile order, i = 0..k-1: quantile i takes its candidate t if t is still free;
      otherwise it takes the free valid candidate nearest to t in index distance |j - t|,
      ties (one on each side) to the one with more mass p_j, then to the lower index. So a
      peak that draws m quantiles yields a run of about m frames around it, and every pick
      is unique. The result is sorted ascending.
    * Only valid candidates take part; NaN and -inf count as the lowest score, +inf as the
      highest (see the module docstring). power must be finite and >= 0 (0: uniform).

  Returns int32[k], ascending; all valid ones then -1 when fewer than k are valid.
  """
  power = float(power)
  if not math.isfinite(power) or power < 0:
    raise ValueError(f"power must be finite and >= 0, got {power}")
  values, index = _valid_scores(scores, valid, k)
  m = len(index)
  if m <= k:
    return _with_fill(index, k)
  unit, constant = _unit_range(values)
  mass = np.ones(m) if constant else unit**power  # 0**0 == 1: power 0 is uniform too
  cdf = np.cumsum(mass)
  total = cdf[-1]
  # u_i * total with exact integer arithmetic where it can be: (2i + 1) * total / (2k).
  targets = (2 * np.arange(k) + 1) * total / (2 * k)
  raw = np.searchsorted(cdf, targets, side="right")
  raw = np.minimum(raw, np.flatnonzero(mass > 0)[-1])  # rounding guard: never past the mass

  taken = np.zeros(m, bool)
  for t in raw:
    if not taken[t]:
      taken[t] = True
      continue
    free = np.flatnonzero(~taken)
    distance = np.abs(index[free] - index[t])
    best = free[np.lexsort((index[free], -mass[free], distance))[0]]
    taken[best] = True
  return _with_fill(index[taken], k)


# --- AKS ---


def _aks_leaves(unit, k: int, threshold: float, depth: int):
  """AKS's recursive split (`meanstd`): [(start, stop, level)] of the kept segments, in
  positions over the valid candidates, ordered by start."""
  leaves = []
  level_segments = [(0, len(unit), 0)]
  while level_segments:
    next_level = []
    for start, stop, level in level_segments:
      part = unit[start:stop]
      if len(part) == 0:  # the empty half of a 1-frame segment: nothing to pick from
        leaves.append((start, stop, level))
        continue
      top = np.sort(part)[::-1][:k]  # the top k of the segment, k = the whole budget
      stands_out = top.mean() - part.mean() > threshold
      if stands_out or level >= depth:
        leaves.append((start, stop, level))
      else:
        half = start + len(part) // 2
        next_level += [(start, half, level + 1), (half, stop, level + 1)]
    level_segments = next_level
  return sorted(leaves)


def aks(scores, valid, k: int, threshold: float = 0.8, depth: int = 5) -> np.ndarray:
  """AKS's adaptive keyframe sampling (its repository's frame_select.py) with the published
  defaults, made to return exactly k frames.

  The repository's algorithm, as implemented here:
    1. min-max normalise the scores over the whole video to [0, 1] (once, not per segment);
    2. starting from the whole video at level 0, for every segment: take the mean of its k
       highest normalised scores (k = the whole frame budget at every level, as in the
       repository; a segment of k frames or fewer therefore never stands out) minus the
       segment's mean. If that exceeds `threshold` (0.8) the segment is kept; else, if its
       level is below `depth` (5), it is split into halves [:len//2] and [len//2:] at
       level + 1 and both are examined in turn; else (at the depth limit) it is kept;
    3. a kept segment at level d gets k / 2**d frames: its highest-scoring ones (ties: the
       lowest index, as heapq.nlargest gives).
  The repository also requires the score std to exceed t2 = -100, which always holds, so
  it is left out.
  Differences from the original:
    * the repository's quota is int(k / 2**d) and a short segment gives what it has, so it
      returns fewer than k frames whenever k / 2**d is not whole for a kept segment (k=8
      split to level 5 gives none at all). Here the kept segments, in time order, get
      quotas by cumulative rounding: with W_s the sum of k / 2**d over the segments up to
      and including s, segment s gets round(W_s) - round(W_{s-1}) (halves rounded up).
      These are exactly the repository's quotas whenever it returns k frames (every
      k / 2**d whole), and otherwise add up to k while keeping each segment's share. A
      segment with fewer frames than its quota gives them all; any frames still missing
      are the highest-scoring candidates not yet picked (ties: lowest index);
    * only valid candidates take part (padding is dropped before the split); with
      n_valid <= k every valid candidate is returned (the repository returns all frames
      when the video has fewer than k, and needs n_valid > k to pick k of them anyway);
    * constant scores (the repository divides by zero) normalise to 0: nothing stands out,
      so the video is split down to `depth` and the picks spread over it;
    * ranking inside a segment uses the raw scores (NaN as -inf); the threshold test uses
      the normalised ones (non-finite clipped, see the module docstring).

  Returns int32[k], ascending; all valid ones then -1 when fewer than k are valid.
  """
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
    raise ValueError(f"depth must be an int >= 0, got {depth!r}")
  threshold = float(threshold)
  values, index = _valid_scores(scores, valid, k)
  m = len(index)
  if m <= k:
    return _with_fill(index, k)
  unit, _ = _unit_range(values)
  leaves = _aks_leaves(unit, k, threshold, int(depth))

  # Quotas k / 2**d as exact fractions over 2**depth, rounded cumulatively (halves up).
  denominator = 2 ** int(depth)
  picked = np.zeros(m, bool)
  cumulative = rounded_before = 0
  for start, stop, level in leaves:
    cumulative += k * 2 ** (int(depth) - level)
    rounded = (2 * cumulative + denominator) // (2 * denominator)
    quota, rounded_before = rounded - rounded_before, rounded
    if quota > 0 and stop > start:
      picked[_best_first(values, np.arange(start, stop))[:quota]] = True
  missing = k - int(picked.sum())
  if missing > 0:
    picked[_best_first(values, np.flatnonzero(~picked))[:missing]] = True
  return _with_fill(index[picked], k)


# --- GenS ---

# GenS's instruction, as its inference.py sends it (the whitespace of its triple-quoted
# source collapsed to single spaces). GenS's user turn is
#   "".join(f"[{i}]<image>\n" for each frame i) + f"Question: {question}\n" + GENS_INSTRUCTION,
# with frames at 1 fps, so the "timestamps in seconds" it returns are the [i] labels. Number
# the images 0..n-1 by candidate index and the answer's keys are candidate indices.
GENS_INSTRUCTION = (
  "Please identify the video frames most relevant to the given question and provide their "
  "timestamps in seconds along with a relevance score. The score should be on a scale from 1 "
  "to 5, where higher scores indicate greater relevance. Return the output strictly in the "
  'following JSON format: {"timestamp": score, ...}.'
)

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.S)
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")
_KEY = re.compile(r"^\s*(\d+)\s*(?:[-\u2013]\s*(\d+)\s*)?$")


def _load_object(text: str):
  """A dict from JSON or a Python-literal dict (single quotes, trailing comma), else None."""
  try:
    obj = json.loads(text)
  except ValueError:
    try:
      obj = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      return None
  return obj if isinstance(obj, dict) else None


def _key_range(key) -> tuple[int, int]:
  """'15' -> (15, 15); '45-46' -> (45, 46) (inclusive); anything else raises ValueError."""
  if isinstance(key, bool):
    raise ValueError(f"malformed frame key {key!r}")
  match = _KEY.match(str(key))
  if match is None:
    raise ValueError(f"malformed frame key {key!r}: expected an index or a range like '45-46'")
  first = int(match.group(1))
  last = int(match.group(2)) if match.group(2) is not None else first
  if last < first:
    raise ValueError(f"malformed frame key {key!r}: the range runs backwards")
  return first, last


def _relevance(key, value) -> float:
  """An int, float or numeric string -> float; anything else raises ValueError."""
  if isinstance(value, bool):
    raise ValueError(f"relevance of {key!r} is not a number: {value!r}")
  if isinstance(value, (int, float)):
    score = float(value)
  elif isinstance(value, str):
    try:
      score = float(value.strip())
    except ValueError:
      raise ValueError(f"relevance of {key!r} is not a number: {value!r}") from None
  else:
    raise ValueError(f"relevance of {key!r} is not a number: {value!r}")
  if not math.isfinite(score):
    raise ValueError(f"relevance of {key!r} is not finite: {value!r}")
  return score


def parse_gens(text: str, n: int) -> dict[int, float]:
  """GenS's answer -> {candidate index: relevance}, ascending by index.

  GenS answers with a flat JSON object of frame indices or inclusive index ranges and a
  relevance from 1 to 5, e.g. {"15": 5, "16": 4, "45-46": 3}. Read here:
    * the object alone, inside a code fence (```json ... ``` or ``` ... ```; fenced text is
      tried first), or with prose around it: the first flat {...} that parses is used;
    * JSON, or a Python-style dict (single-quoted keys and values, integer keys, a trailing
      comma);
    * keys: an index "15" or an inclusive range "45-46" (an en dash works too, spaces are
      allowed); values: integers, floats, or the same as strings ("5");
    * a frame named more than once (e.g. by "15" and "14-16") keeps its highest relevance;
    * {} is a valid answer (no relevant frame) and gives {}.
  Raises ValueError (the caller counts these and falls back) when the answer has no
  readable JSON object, when a key or value is malformed (e.g. "a-b", "46-45", "high"),
  or when an index falls outside [0, n): the message names the out-of-range keys.
  """
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}")
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be an int >= 1, got {n!r}")
  obj = None
  for body in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
    for match in _FLAT_OBJECT.finditer(body):
      obj = _load_object(match.group(0))
      if obj is not None:
        break
    if obj is not None:
      break
  if obj is None:
    raise ValueError(f"no readable JSON object in the GenS answer: {text[:120]!r}")

  relevance: dict[int, float] = {}
  out_of_range = []
  for key, value in obj.items():
    first, last = _key_range(key)
    score = _relevance(key, value)
    if last >= n:
      out_of_range.append(str(key))
      continue
    for i in range(first, last + 1):
      relevance[i] = max(relevance.get(i, -math.inf), score)
  if out_of_range:
    raise ValueError(f"GenS named frames outside [0, {n}): {', '.join(out_of_range)}")
  return dict(sorted(relevance.items()))


def gens_scores(relevance: dict[int, float], n: int) -> np.ndarray:
  """{candidate index: relevance} (from `parse_gens`) -> float32[n] scores, 0 for candidates
  GenS did not name, for selection.top_k / selection.nms_greedy. With fewer than k named
  candidates the rest of the picks are unnamed ones (top_k: the lowest indices).
  Raises ValueError for an index outside [0, n)."""
  scores = np.zeros(n, np.float32)
  bad = [i for i in relevance if isinstance(i, bool) or not 0 <= int(i) < n or int(i) != i]
  if bad:
    raise ValueError(f"relevance names candidates outside [0, {n}): {bad}")
  for i, score in relevance.items():
    scores[int(i)] = score
  return scores
