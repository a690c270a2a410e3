"""Uncertainty of benchmark accuracies: percentile-bootstrap intervals of a mean and of a
paired difference, and McNemar's test for two strategies answered on the same questions.

Numpy and the standard library only.
"""

import math

import numpy as np

# Resampled values held at once (chunk rows x questions): 10000 x 5000 in ~40 MB pieces.
_CHUNK_ELEMENTS = 1 << 22


def _vector(values, name: str) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
  if array.size == 0:
    raise ValueError(f"{name} is empty")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} holds a NaN or infinite value")
  return array


def _bootstrap(values: np.ndarray, resamples: int, level: float, seed: int):
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must lie in (0, 1), got {level}")
  if resamples < 1:
    raise ValueError(f"resamples must be at least 1, got {resamples}")
  n = values.size
  rng = np.random.default_rng(seed)
  rows = max(1, _CHUNK_ELEMENTS // n)
  means = np.empty(resamples)
  for start in range(0, resamples, rows):
    stop = min(start + rows, resamples)
    means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return float(values.mean()), float(low), float(high)


def bootstrap_interval(values, resamples=10000, level=0.95, seed=0) -> tuple[float, float, float]:
  """(mean, low, high): the mean of per-question values (0/1 correctness or real scores) and
  its percentile-bootstrap interval at `level`, resampling questions with replacement.

  Deterministic for a seed; resamples are drawn in chunks, so memory stays bounded.
  """
  return _bootstrap(_vector(values, "values"), resamples, level, seed)


def paired_bootstrap(a, b, resamples=10000, level=0.95, seed=0) -> tuple[float, float, float]:
  """(mean(a - b), low, high): the difference of two strategies scored on the same questions,
  with the interval from resampling questions (the same draw for both, hence paired)."""
  a, b = _vector(a, "a"), _vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must have the same length, got {a.size} and {b.size}")
  return _bootstrap(a - b, resamples, level, seed)


def _correct(values, name: str) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
  if not np.all((array == 0) | (array == 1)):
    raise ValueError(f"{name} must hold 0/1 (or bool) correctness values")
  return array.astype(bool)


def mcnemar(a, b) -> dict:
  """McNemar's test of two strategies' per-question correctness on the same questions.

  Returns a_only (a right, b wrong), b_only, statistic, p_value and exact. Under 25 discordant
  pairs: the exact two-sided binomial test (statistic = min(a_only, b_only)); otherwise the
  chi-square statistic with continuity correction, (|a_only - b_only| - 1)^2 / (a_only +
  b_only), on one degree of freedom.
  """
  a, b = _correct(a, "a"), _correct(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must have the same length, got {a.size} and {b.size}")
  a_only = int(np.sum(a & ~b))
  b_only = int(np.sum(b & ~a))
  n = a_only + b_only
  if n < 25:
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    p_value = 1.0 if n == 0 else min(1.0, 2.0 * tail)
    statistic, exact = float(k), True
  else:
    statistic = (abs(a_only - b_only) - 1) ** 2 / n
    p_value = math.erfc(math.sqrt(statistic / 2.0))  # chi-square(1) survival function
    exact = False
  return {
    "a_only": a_only,
    "b_only": b_only,
    "statistic": float(statistic),
    "p_value": float(p_value),
    "exact": exact,
  }
