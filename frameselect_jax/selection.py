"""Frame selection: pick k of n candidate frames, given importance scores.

Three strategies, all pure JAX, jit-able with a static k and vmap-able over a batch:
  uniform     k frames spread evenly over the valid candidates (ignores scores)
  top_k       the k highest scores
  nms_greedy  the paper's greedy non-maximum suppression: take the best frame,
              suppress its temporal neighbours, repeat k times
and `random_k`, k valid frames drawn at random from a PRNG key (a baseline), and
`frame_difference_scores`, a question-blind score (how much a candidate differs from the one
before it) that top_k turns into the pixel-difference keyframe baseline,

and the two measures of a selection against the candidates that matter (`relevant`):
  recall_at_k  the share of the relevant candidates chosen, out of as many as k picks can hold
  hit_at_k     whether at least one chosen candidate is relevant

Conventions shared by every strategy:
  * inputs: scores float[n], valid bool[n] (False marks padding, see video.py),
    k a static Python int with 1 <= k <= n.
  * output: int32[k] candidate indices, ascending, unique, all valid. When fewer
    than k candidates are valid, all valid ones are returned, followed by -1.
  * ties go to the lowest index (like np.argmax); NaN scores rank lowest (as -inf).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("uniform", "top_k", "nms_greedy")


def check_k(k, n: int) -> None:
  """k must be a Python int in [1, n]; these checks run at trace time (k is static). The
  peers (peers.py) check their k with it too."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"k must be a Python int, got {type(k).__name__}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if k > n:
    raise ValueError(f"k={k} is larger than the number of candidates n={n}")


def _check_inputs(scores, valid, k):
  """Casts scores to float32 (NaN -> -inf) and valid to bool, and checks shapes and k."""
  valid = jnp.asarray(valid).astype(bool)
  if valid.ndim != 1:
    raise ValueError(
      f"valid must be 1-D [n] (use select_batch for [B, n]), got shape {valid.shape}"
    )
  if scores is not None:
    scores = jnp.asarray(scores).astype(jnp.float32)
    if scores.shape != valid.shape:
      raise ValueError(f"scores {scores.shape} and valid {valid.shape} must have the same shape")
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  check_k(k, valid.shape[0])
  return scores, valid


def _sorted_with_fill(indices, chosen, n: int):
  """Sorts the chosen indices ascending and puts -1 where nothing was chosen, at the end."""
  keyed = jnp.sort(jnp.where(chosen, indices, n))  # n sorts after every real index
  return jnp.where(keyed < n, keyed, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="k")
def uniform(valid, k: int):
  """k candidates spread evenly over the valid ones: the valid candidate at the
  centre of each of k equal runs of valid candidates.

  Returns int32[k], ascending; all valid ones then -1 when fewer than k are valid.
  """
  _, valid = _check_inputs(None, valid, k)
  n = valid.shape[0]
  n_valid = valid.sum()
  valid_first = jnp.argsort(jnp.where(valid, 0, 1), stable=True)  # valid indices, ascending, first
  j = jnp.arange(k)
  # With n_valid >= k the ranks floor((j + 1/2) * n_valid / k) step by >= 1, so they are unique.
  rank = jnp.where(n_valid >= k, (2 * j + 1) * n_valid // (2 * k), j)
  chosen = rank < n_valid
  return _sorted_with_fill(valid_first[jnp.minimum(rank, n - 1)], chosen, n)


@functools.partial(jax.jit, static_argnames="k")
def top_k(scores, valid, k: int):
  """The k valid candidates with the highest scores (ties: lowest index).

  Returns int32[k], ascending; all valid ones then -1 when fewer than k are valid.
  """
  scores, valid = _check_inputs(scores, valid, k)
  n = valid.shape[0]
  # Sort by (valid first, score descending, index ascending): a valid frame with
  # score -inf still beats padding, which top_k on masked scores would not ensure.
  order = jnp.lexsort((jnp.arange(n), -scores, ~valid))
  best = order[:k]
  return _sorted_with_fill(best, valid[best], n)


@functools.partial(jax.jit, static_argnames="k")
def nms_greedy(scores, valid, k: int):
  """Greedy temporal NMS (the paper's selection).

  Repeats k times: take the highest-scoring remaining valid candidate (ties:
  lowest index), then suppress every candidate within distance `gap` of it
  (indices i-gap .. i+gap), with gap = n_valid // (4k). With all candidates
  valid this is the paper's n // (4k); counting only valid ones keeps the
  radius proportional to the real frames of a short, padded video, and means
  suppression never runs out of candidates before k picks when n_valid >= k.
  Picks are therefore more than `gap` apart.

  Returns int32[k], ascending; all valid ones then -1 when fewer than k are valid.
  """
  scores, valid = _check_inputs(scores, valid, k)
  n = valid.shape[0]
  gap = valid.sum() // (4 * k)
  positions = jnp.arange(n, dtype=jnp.int32)

  def pick_one(t, carry):
    available, picks = carry
    best_score = jnp.max(jnp.where(available, scores, -jnp.inf))
    # Compare against the best score among available frames instead of an
    # argmax over masked scores, so a valid frame scored -inf is still found.
    is_best = available & (scores == best_score)
    # The lowest index among ties (a min-reduction: about 1.5x faster than
    # argmax on CPU). It is n only when nothing is left.
    i = jnp.min(jnp.where(is_best, positions, n))
    picks = picks.at[t].set(jnp.where(i < n, i, -1))
    available = available & (jnp.abs(positions - i) > gap)
    return available, picks

  # k is static and small: unrolling lets XLA fuse across picks (about 1.5x on CPU).
  _, picks = jax.lax.fori_loop(0, k, pick_one, (valid, jnp.full((k,), -1, jnp.int32)), unroll=True)
  return _sorted_with_fill(picks, picks >= 0, n)


@functools.partial(jax.jit, static_argnames="k")
def random_k(valid, k: int, key):
  """k valid candidates drawn uniformly without replacement (a jax PRNG key decides which).

  Returns int32[k], ascending; all valid ones then -1 when fewer than k are valid. With
  valid [B, n], one draw per row (keys split from `key`)."""
  valid = jnp.asarray(valid).astype(bool)
  if valid.ndim == 2:
    keys = jax.random.split(key, valid.shape[0])
    return jax.vmap(lambda v, kk: random_k(v, k, kk))(valid, keys)
  return top_k(jax.random.uniform(key, valid.shape), valid, k)


def frame_difference_scores(frames, valid) -> np.ndarray:
  """float32[n]: each valid candidate's mean absolute pixel difference from the valid
  candidate before it (the first valid one scores as much as the largest, so a video's
  opening is kept), -inf on padding. Question-blind: top_k of it keeps the frames where the
  video changes most, as redundancy pruning does (ViLaMP, VideoLLaMA3)."""
  frames = np.asarray(frames)
  valid = np.asarray(valid, bool)
  scores = np.full(len(valid), -np.inf, np.float32)
  order = np.flatnonzero(valid)
  if len(order) == 0:
    return scores
  pixels = frames[order].astype(np.float32).reshape(len(order), -1)
  change = np.abs(np.diff(pixels, axis=0)).mean(axis=1) if len(order) > 1 else np.zeros(0)
  scores[order[1:]] = change
  scores[order[0]] = change.max() if len(change) else 0.0
  return scores


_STRATEGY_FNS = {"uniform": uniform, "top_k": top_k, "nms_greedy": nms_greedy}


def _strategy_fn(strategy: str):
  if strategy not in _STRATEGY_FNS:
    raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
  return _STRATEGY_FNS[strategy]


def _select_one(strategy: str, scores, valid, k: int):
  fn = _strategy_fn(strategy)
  return fn(valid, k) if strategy == "uniform" else fn(scores, valid, k)


@functools.partial(jax.jit, static_argnames=("strategy", "k"))
def select(strategy: str, scores, valid, k: int):
  """Selects k of n candidates with the named strategy ("uniform", "top_k", "nms_greedy").

  scores float[n] (ignored by "uniform", may be None there), valid bool[n].
  Returns int32[k]: ascending, unique, valid; -1 fill when fewer than k are valid.
  Raises ValueError for an unknown strategy, k < 1 or k > n.
  """
  return _select_one(strategy, scores, valid, k)


@functools.partial(jax.jit, static_argnames=("strategy", "k"))
def select_batch(strategy: str, scores, valid, k: int):
  """`select` vmapped over a batch: scores float[B, n], valid bool[B, n] -> int32[B, k]."""
  _strategy_fn(strategy)  # fail on a bad name before tracing the batch
  valid = jnp.asarray(valid)
  if valid.ndim != 2:
    raise ValueError(f"valid must be 2-D [B, n], got shape {valid.shape}")
  if strategy == "uniform":
    return jax.vmap(lambda v: uniform(v, k))(valid)
  return jax.vmap(lambda s, v: _select_one(strategy, s, v, k))(scores, valid)


# --- How good a selection is ---


def _chosen_relevant(chosen, relevant):
  """chosen int[..., k] (-1 fill), relevant bool[..., n] -> (relevant chosen, relevant count)."""
  chosen = jnp.asarray(chosen)
  relevant = jnp.asarray(relevant).astype(bool)
  index = jnp.clip(chosen, 0, relevant.shape[-1] - 1)
  picked = jnp.take_along_axis(relevant, index, axis=-1) & (chosen >= 0)
  return jnp.sum(picked, -1), jnp.sum(relevant, -1)


def recall_at_k(chosen, relevant):
  """|chosen and relevant| / min(|relevant|, k): 1 when the k picks hold as many relevant
  candidates as they can. chosen int[..., k] (-1 fill), relevant bool[..., n]. Rows without
  a relevant candidate give NaN: exclude them (see `has_relevant`), never count them as 0."""
  hits, count = _chosen_relevant(chosen, relevant)
  k = jnp.asarray(chosen).shape[-1]
  return jnp.where(count > 0, hits / jnp.maximum(jnp.minimum(count, k), 1), jnp.nan)


def hit_at_k(chosen, relevant):
  """1.0 when at least one chosen candidate is relevant, else 0.0 (NaN without relevant ones)."""
  hits, count = _chosen_relevant(chosen, relevant)
  return jnp.where(count > 0, (hits > 0).astype(jnp.float32), jnp.nan)


def has_relevant(relevant):
  return jnp.any(jnp.asarray(relevant).astype(bool), -1)


def nms_greedy_reference(scores, valid, k: int) -> np.ndarray:
  """The paper's greedy NMS loop in plain Python/numpy (valid-aware, same gap rule).

  Scores are compared in float32, as in the JAX version, so ties match. The
  slow reference for tests and benchmarks; use `nms_greedy` for real work.
  """
  scores = np.asarray(scores, np.float32).copy()
  valid = np.asarray(valid, bool)
  check_k(k, len(valid))
  scores[np.isnan(scores)] = -np.inf
  available = valid.copy()
  gap = int(valid.sum()) // (4 * k)
  selected = []
  for _ in range(k):
    remaining = np.flatnonzero(available)
    if len(remaining) == 0:
      break
    i = int(remaining[np.argmax(scores[remaining])])  # np.argmax: first of ties
    selected.append(i)
    available[max(0, i - gap) : i + gap + 1] = False
  return np.array(sorted(selected) + [-1] * (k - len(selected)), np.int32)
