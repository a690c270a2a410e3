"""Frame selection: properties of every strategy, NMS against the plain loop, batching, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frameselect_jax import selection

# Few distinct (n, k) shapes keep the number of XLA compilations, and the test time, small.
# Varying how many candidates are valid still covers every gap size.
N_CHOICES = (6, 64)
K_CHOICES = (1, 2, 3, 8)
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw, batch=None):
  """(scores, valid, k): scores real-valued or from a small integer set (many ties),
  valid either a padded prefix (a short video) or an arbitrary mask."""
  n = draw(st.sampled_from(N_CHOICES))
  k = draw(st.sampled_from([k for k in K_CHOICES if k <= n]))
  rows = 1 if batch is None else batch
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  if draw(st.booleans()):
    scores = rng.integers(0, 3, size=(rows, n)).astype(np.float32)  # ties everywhere
  else:
    scores = rng.normal(size=(rows, n)).astype(np.float32)
  mask_kind = draw(st.sampled_from(["all", "prefix", "random"]))
  if mask_kind == "all":
    valid = np.ones((rows, n), bool)
  elif mask_kind == "prefix":
    lengths = rng.integers(0, n + 1, size=(rows, 1))
    valid = np.arange(n)[None, :] < lengths
  else:
    valid = rng.random((rows, n)) < rng.uniform(0.0, 1.0)
  if batch is None:
    return scores[0], valid[0], k
  return scores, valid, k


def check_well_formed(picks, valid, k):
  """Ascending, unique, valid picks first, then -1 fill; as many picks as possible."""
  picks = np.asarray(picks)
  assert picks.shape == (k,) and picks.dtype == np.int32
  expected_count = min(k, int(valid.sum()))
  chosen = picks[:expected_count]
  assert np.all(picks[expected_count:] == -1)
  assert np.all(chosen >= 0)
  assert np.all(np.diff(chosen) > 0)  # sorted and unique
  assert np.all(valid[chosen])
  return chosen


@SETTINGS
@given(problems(), st.sampled_from(selection.STRATEGIES))
def test_every_strategy_returns_sorted_unique_valid_indices(problem, strategy):
  scores, valid, k = problem
  check_well_formed(selection.select(strategy, scores, valid, k), valid, k)


@SETTINGS
@given(problems(), st.sampled_from(selection.STRATEGIES))
def test_all_valid_returned_when_k_covers_them(problem, strategy):
  scores, valid, k = problem
  if valid.sum() > k:
    valid = valid.copy()
    valid[np.flatnonzero(valid)[k:]] = False  # keep only the first k valid
  picks = np.asarray(selection.select(strategy, scores, valid, k))
  assert sorted(picks[picks >= 0].tolist()) == np.flatnonzero(valid).tolist()


@SETTINGS
@given(problems())
def test_nms_matches_reference_loop(problem):
  scores, valid, k = problem
  np.testing.assert_array_equal(
    selection.nms_greedy(scores, valid, k), selection.nms_greedy_reference(scores, valid, k)
  )


@SETTINGS
@given(problems())
def test_nms_picks_are_more_than_gap_apart(problem):
  scores, valid, k = problem
  chosen = check_well_formed(selection.nms_greedy(scores, valid, k), valid, k)
  gap = int(valid.sum()) // (4 * k)
  assert np.all(np.diff(chosen) > gap)


@SETTINGS
@given(problems())
def test_top_k_takes_highest_scores_lowest_index_first(problem):
  scores, valid, k = problem
  order = np.lexsort((np.arange(len(scores)), -scores, ~valid))  # valid, score desc, index asc
  expected = sorted(i for i in order[:k] if valid[i])
  picks = np.asarray(selection.top_k(scores, valid, k))
  assert picks[picks >= 0].tolist() == expected


@SETTINGS
@given(problems())
def test_uniform_spreads_picks_evenly_over_valid(problem):
  _, valid, k = problem
  chosen = check_well_formed(selection.uniform(valid, k), valid, k)
  n_valid = int(valid.sum())
  if n_valid >= k:
    ranks = np.searchsorted(np.flatnonzero(valid), chosen)  # position among valid frames
    steps = np.diff(np.concatenate([ranks, [ranks[0] + n_valid]]))  # wrap: every step
    assert steps.max() - steps.min() <= 1


@settings(max_examples=25, deadline=None)
@given(problems(batch=3), st.sampled_from(selection.STRATEGIES))
def test_batch_equals_per_row(problem, strategy):
  scores, valid, k = problem
  batch = np.asarray(selection.select_batch(strategy, scores, valid, k))
  assert batch.shape == (3, k)
  for row in range(3):
    np.testing.assert_array_equal(
      batch[row], selection.select(strategy, scores[row], valid[row], k)
    )


@pytest.mark.parametrize("k", [8, 32])
def test_nms_matches_reference_at_paper_size(k):
  # n = 128 as in the paper; random lengths (short padded videos) and tied scores.
  rng = np.random.default_rng(k)
  for trial in range(20):
    scores = rng.integers(0, 4, 128).astype(np.float32) if trial % 2 else rng.normal(size=128)
    valid = np.arange(128) < rng.integers(1, 129)
    np.testing.assert_array_equal(
      selection.nms_greedy(scores, valid, k), selection.nms_greedy_reference(scores, valid, k)
    )


def test_paper_loop_example_with_ties():
  # n=16, k=2: gap = 16 // 8 = 2. All scores equal: pick 0, suppress 0..2, then pick 3.
  scores, valid = np.zeros(16), np.ones(16, bool)
  assert selection.nms_greedy(scores, valid, 2).tolist() == [0, 3]
  assert selection.top_k(scores, valid, 2).tolist() == [0, 1]
  # Two adjacent peaks: top-k takes both, NMS spreads to the next best outside the gap.
  scores = np.array([0, 0, 0, 0, 9, 8, 7, 0, 0, 0, 0, 0, 0, 5, 0, 0], np.float32)
  assert selection.top_k(scores, valid, 2).tolist() == [4, 5]
  assert selection.nms_greedy(scores, valid, 2).tolist() == [4, 13]


def test_uniform_all_valid_takes_segment_centres():
  valid = np.ones(128, bool)
  assert selection.uniform(valid, 8).tolist() == [8, 24, 40, 56, 72, 88, 104, 120]


def test_minus_inf_and_nan_scores_still_pick_valid_frames():
  valid = np.array([False, True, True, True, False, False])
  scores = np.array([5.0, -np.inf, np.nan, -np.inf, 9.0, 9.0], np.float32)
  for strategy in ("top_k", "nms_greedy"):
    picks = selection.select(strategy, scores, valid, 3)
    assert picks.tolist() == [1, 2, 3], strategy
  np.testing.assert_array_equal(
    selection.nms_greedy(scores, valid, 2), selection.nms_greedy_reference(scores, valid, 2)
  )


def test_no_valid_candidates_gives_all_fill():
  for strategy in selection.STRATEGIES:
    assert selection.select(strategy, np.zeros(5), np.zeros(5, bool), 3).tolist() == [-1] * 3


def test_jit_and_vmap_with_static_k():
  scores = jax.random.normal(jax.random.PRNGKey(0), (4, 32))
  valid = jnp.ones((4, 32), bool)

  @jax.jit
  def pick_after_softmax(logits):  # traced scores flow straight into the selection
    return jax.vmap(lambda s, v: selection.nms_greedy(s, v, 4))(jax.nn.softmax(logits), valid)

  expected = np.stack(
    [selection.nms_greedy_reference(s, v, 4) for s, v in zip(np.asarray(scores), valid)]
  )
  np.testing.assert_array_equal(pick_after_softmax(scores), expected)
  rejit = jax.jit(selection.nms_greedy, static_argnames="k")
  assert rejit(scores[0], valid[0], k=3).shape == (3,)
  assert rejit(scores[0], valid[0], k=5).shape == (5,)


@pytest.mark.parametrize(
  "strategy, k, error, match",
  [
    ("nope", 2, ValueError, "unknown selection strategy 'nope'"),
    ("nms_greedy", 0, ValueError, "k must be >= 1"),
    ("top_k", -3, ValueError, "k must be >= 1"),
    ("uniform", 9, ValueError, "larger than the number of candidates n=8"),
    ("nms_greedy", 2.0, TypeError, "k must be a Python int"),
  ],
)
def test_select_errors(strategy, k, error, match):
  with pytest.raises(error, match=match):
    selection.select(strategy, np.zeros(8), np.ones(8, bool), k)


def test_shape_errors():
  with pytest.raises(ValueError, match="same shape"):
    selection.nms_greedy(np.zeros(8), np.ones(7, bool), 2)
  with pytest.raises(ValueError, match="1-D"):
    selection.select("top_k", np.zeros((2, 8)), np.ones((2, 8), bool), 2)
  with pytest.raises(ValueError, match="2-D"):
    selection.select_batch("top_k", np.zeros(8), np.ones(8, bool), 2)
  with pytest.raises(ValueError, match="unknown selection strategy"):
    selection.select_batch("best", np.zeros((2, 8)), np.ones((2, 8), bool), 2)
  with pytest.raises(ValueError, match="larger than the number of candidates"):
    selection.nms_greedy_reference(np.zeros(3), np.ones(3, bool), 4)


def test_recall_and_hit_on_hand_worked_cases():
  relevant = np.zeros((4, 10), bool)
  relevant[0, [2, 3]] = True  # two relevant, both chosen
  relevant[1, [2, 3, 7]] = True  # three relevant, k=2 picks can hold two; one chosen
  relevant[2, [9]] = True  # one relevant, missed
  chosen = np.array([[2, 3], [3, 5], [0, 1], [4, -1]], np.int32)
  recall = np.asarray(selection.recall_at_k(chosen, relevant))
  hit = np.asarray(selection.hit_at_k(chosen, relevant))
  np.testing.assert_allclose(recall[:3], [1.0, 0.5, 0.0])
  np.testing.assert_allclose(hit[:3], [1.0, 1.0, 0.0])
  # No relevant candidate: NaN (left out of averages), never a miss; the -1 fill never hits.
  assert np.isnan(recall[3]) and np.isnan(hit[3])
  assert list(np.asarray(selection.has_relevant(relevant))) == [True, True, True, False]
  relevant[3, 0] = True  # index 0 must not match the -1 fill (clipped to 0 for the lookup)
  assert float(selection.hit_at_k(chosen, relevant)[3]) == 0.0


def test_random_k_is_seeded_sorted_unique_and_valid():
  valid = np.ones((3, 20), bool)
  valid[1, 12:] = False
  valid[2, 3:] = False
  a = np.asarray(selection.random_k(valid, 5, jax.random.key(0)))
  b = np.asarray(selection.random_k(valid, 5, jax.random.key(0)))
  c = np.asarray(selection.random_k(valid, 5, jax.random.key(1)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for row, v in zip(a, valid):
    check_well_formed(row, v, 5)
  assert list(a[2]) == [0, 1, 2, -1, -1]


def test_frame_difference_scores_by_hand():
  frames = np.zeros((5, 2, 2, 3), np.uint8)
  frames[1] = 10  # +10 from frame 0
  frames[2] = 10  # no change
  frames[3] = 40  # +30
  valid = np.array([True, True, True, True, False])
  scores = selection.frame_difference_scores(frames, valid)
  np.testing.assert_allclose(scores[:4], [30, 10, 0, 30])  # the first scores as the largest
  assert scores[4] == -np.inf
  picks = np.asarray(selection.top_k(scores, valid, 2))
  assert picks.tolist() == [0, 3]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12), st.integers(0, 2**31 - 1))
def test_pixel_difference_keyframes_follow_the_conventions(n, k_seed, seed):
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  valid = rng.random(n) < 0.8
  k = 1 + k_seed % n
  picks = np.asarray(selection.top_k(selection.frame_difference_scores(frames, valid), valid, k))
  chosen = picks[picks >= 0]
  assert len(chosen) == min(k, int(valid.sum()))
  assert np.all(np.diff(chosen) > 0) and np.all(valid[chosen])
  again = selection.top_k(selection.frame_difference_scores(frames, valid), valid, k)
  np.testing.assert_array_equal(picks, np.asarray(again))
