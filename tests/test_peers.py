"""Peer selectors (BOLT, AKS) and GenS's answer parser: properties, hand-worked examples,
AKS against a plain transcription of its repository's loop, and the parser's failure cases."""

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import check_well_formed

from frameselect_jax import peers, selection

SETTINGS = settings(max_examples=80, deadline=None)
SELECTORS = {"bolt": peers.bolt, "aks": peers.aks}


@st.composite
def problems(draw):
  """(scores, valid, k): real, tied, spiky or partly non-finite scores; valid all, a padded
  prefix (a short video) or an arbitrary mask."""
  n = draw(st.sampled_from((1, 6, 64, 200)))
  k = draw(st.sampled_from([k for k in (1, 2, 3, 8, 32) if k <= n]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  kind = draw(st.sampled_from(["normal", "ties", "spiky", "constant", "nonfinite"]))
  if kind == "normal":
    scores = rng.normal(size=n)
  elif kind == "ties":
    scores = rng.integers(0, 3, size=n).astype(float)
  elif kind == "spiky":
    scores = np.where(rng.random(n) < 0.05, 1.0, 0.0) + 0.01 * rng.random(n)
  elif kind == "constant":
    scores = np.full(n, 0.3)
  else:
    scores = rng.normal(size=n)
    scores[rng.random(n) < 0.3] = rng.choice([np.nan, np.inf, -np.inf])
  mask = draw(st.sampled_from(["all", "prefix", "random"]))
  if mask == "all":
    valid = np.ones(n, bool)
  elif mask == "prefix":
    valid = np.arange(n) < rng.integers(0, n + 1)
  else:
    valid = rng.random(n) < rng.uniform(0.0, 1.0)
  return scores.astype(np.float32), valid, k


# --- properties shared by BOLT and AKS ---


@SETTINGS
@given(problems(), st.sampled_from(sorted(SELECTORS)))
def test_sorted_unique_valid_and_deterministic(problem, name):
  scores, valid, k = problem
  picks = SELECTORS[name](scores, valid, k)
  check_well_formed(picks, valid, k)
  np.testing.assert_array_equal(picks, SELECTORS[name](scores.copy(), valid.copy(), k))


@SETTINGS
@given(problems(), st.sampled_from(sorted(SELECTORS)))
def test_all_valid_returned_when_k_covers_them(problem, name):
  scores, valid, k = problem
  valid = valid.copy()
  valid[np.flatnonzero(valid)[k:]] = False  # at most k valid
  picks = SELECTORS[name](scores, valid, k)
  assert picks[picks >= 0].tolist() == np.flatnonzero(valid).tolist()
  assert np.all(picks[int(valid.sum()) :] == -1)


@SETTINGS
@given(problems(), st.sampled_from(sorted(SELECTORS)))
def test_padding_scores_do_not_matter(problem, name):
  scores, valid, k = problem
  other = scores.copy()
  other[~valid] = 1e6  # huge scores on padding change nothing
  np.testing.assert_array_equal(SELECTORS[name](scores, valid, k), SELECTORS[name](other, valid, k))


@SETTINGS
@given(problems(), st.sampled_from([0.0, 1.0, 2.5, 3.0, 8.0]))
def test_bolt_any_power_is_well_formed(problem, power):
  scores, valid, k = problem
  check_well_formed(peers.bolt(scores, valid, k, power=power), valid, k)


@SETTINGS
@given(problems())
def test_bolt_constant_scores_equal_uniform(problem):
  _, valid, k = problem
  picks = peers.bolt(np.full(len(valid), 2.0), valid, k)
  np.testing.assert_array_equal(picks, selection.uniform(valid, k))


# --- BOLT, worked by hand ---


def test_bolt_peaked_scores_crowd_around_the_peak():
  # scores 0 1 2 3 4 3 2 1 0, power 3: normalised s/4, cubed -> masses (x 1/64)
  #   0 1 8 27 64 27 8 1 0, total 136; CDF C_j (x 1/64): 0 1 9 36 100 127 135 136 136.
  # k=4 quantiles (i + 1/2)/4 * 136 = 17, 51, 85, 119; candidate j holds [C_{j-1}, C_j):
  #   17 -> 3 (9 <= 17 < 36), 51 -> 4, 85 -> 4, 119 -> 5 (100 <= 119 < 127).
  # Collisions, in quantile order: 3, 4 free; the second 4 is taken -> nearest free is 5
  # (3 is taken); then 5 is taken -> nearest free is 6 (4 is taken). Picks 3 4 5 6.
  scores = np.array([0, 1, 2, 3, 4, 3, 2, 1, 0], np.float32)
  valid = np.ones(9, bool)
  assert peers.bolt(scores, valid, 4).tolist() == [3, 4, 5, 6]
  assert selection.uniform(valid, 4).tolist() == [1, 3, 5, 7]  # what ignoring scores gives


def test_bolt_collision_goes_to_the_heavier_neighbour_then_the_earlier():
  # power 1, masses = (s - 0) / 10: 0 1 2 10 3 1 0 (x 1/10), CDF (x 1/10) 0 1 3 13 16 17 17.
  # k=2 quantiles 1/4 * 17 = 4.25 and 3/4 * 17 = 12.75 both fall in candidate 3 [3, 13).
  # The second moves one step: 2 (mass 2) or 4 (mass 3) -> 4, the heavier.
  valid = np.ones(7, bool)
  assert peers.bolt(np.array([0, 1, 2, 10, 3, 1, 0.0]), valid, 2, power=1).tolist() == [3, 4]
  # Mirrored: 2 is now the heavier (CDF 0 1 4 14 16 17 17, both quantiles in 3).
  assert peers.bolt(np.array([0, 1, 3, 10, 2, 1, 0.0]), valid, 2, power=1).tolist() == [2, 3]
  # Equal neighbours (CDF 0 1 3 13 15 16 16, quantiles 4 and 12): the earlier index.
  assert peers.bolt(np.array([0, 1, 2, 10, 2, 1, 0.0]), valid, 2, power=1).tolist() == [2, 3]


def test_bolt_collision_skips_padding_and_measures_index_distance():
  # One overwhelming peak at 2 draws all 3 quantiles. 1 is padding, so 3 is the nearest free
  # (distance 1), then 0 and 4 tie at distance 2 with mass 0 each -> 0, the earlier.
  scores = np.array([0, 9, 10, 0, 0, 0], np.float32)
  valid = np.array([True, False, True, True, True, True])
  assert peers.bolt(scores, valid, 3, power=3).tolist() == [0, 2, 3]


def test_bolt_without_collisions_is_plain_inverse_transform_sampling():
  # Smooth scores and k small against n: no two quantiles share a candidate, so the picks are
  # searchsorted(CDF, (i + 1/2)/k, side="right"), computed here directly.
  rng = np.random.default_rng(0)
  scores = np.convolve(rng.random(300), np.ones(25) / 25, mode="same")
  x = (scores - scores.min()) / (scores.max() - scores.min())
  cdf = np.cumsum(x**3) / np.sum(x**3)
  expected = np.searchsorted(cdf, (np.arange(8) + 0.5) / 8, side="right")
  assert len(set(expected.tolist())) == 8
  assert peers.bolt(scores, np.ones(300, bool), 8).tolist() == sorted(expected.tolist())


def test_bolt_rejects_bad_power():
  with pytest.raises(ValueError, match="power"):
    peers.bolt(np.zeros(4), np.ones(4, bool), 2, power=-1)
  with pytest.raises(ValueError, match="power"):
    peers.bolt(np.zeros(4), np.ones(4, bool), 2, power=float("nan"))


# --- AKS ---


def aks_repository_loop(scores, k, threshold=0.8, depth=5):
  """The repository's frame_select.py algorithm written out plainly, over all frames: the
  recursive mean-of-top-k split, then int(k / 2**level) best frames from each kept segment
  (so it can return fewer than k). For comparison with peers.aks where it returns k."""
  unit = (scores - scores.min()) / (scores.max() - scores.min())
  kept, todo = [], [(np.arange(len(scores)), 0)]
  while todo:
    frames, level = todo.pop(0)
    seg = unit[frames]
    top = heapq.nlargest(k, range(len(seg)), seg.__getitem__)
    if len(seg) and np.mean(seg[top]) - np.mean(seg) > threshold:
      kept.append((frames, level))
    elif level < depth:
      todo += [(frames[: len(seg) // 2], level + 1), (frames[len(seg) // 2 :], level + 1)]
    else:
      kept.append((frames, level))
  out = []
  for frames, level in kept:
    seg = unit[frames]
    out += [
      int(frames[t]) for t in heapq.nlargest(int(k / 2**level), range(len(seg)), seg.__getitem__)
    ]
  return sorted(out)


@settings(max_examples=60, deadline=None)
@given(
  st.integers(0, 2**32 - 1),
  st.sampled_from([8, 16, 32]),
  st.sampled_from([0.8, 0.5, 0.3, 0.1, 0.02]),
  st.integers(0, 3),
  st.sampled_from(["spiky", "normal", "bumps"]),
)
def test_aks_matches_repository_loop_when_it_returns_k(seed, k, threshold, depth, kind):
  # With k divisible by 2**depth every quota k / 2**level is whole and every segment holds
  # at least its quota (n = 400 >= k * 2**depth), so the repository returns exactly k.
  rng = np.random.default_rng(seed)
  n = 400
  if kind == "spiky":
    scores = np.where(rng.random(n) < 0.03, rng.uniform(0.5, 1, n), 0.0) + 0.001 * rng.random(n)
  elif kind == "normal":
    scores = rng.normal(size=n)
  else:
    scores = np.convolve(rng.random(n) ** 8, np.ones(9), mode="same") + 0.001 * rng.random(n)
  expected = aks_repository_loop(scores, k, threshold, depth)
  assert len(expected) == k
  assert peers.aks(scores, np.ones(n, bool), k, threshold, depth).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([8, 16]), st.integers(2, 3), st.booleans())
def test_aks_matches_repository_loop_with_segments_kept_at_different_levels(seed, k, depth, flip):
  # A flat half (0.5-0.6) next to a spiky one: the whole video does not stand out, the
  # spiky half does (kept at level 1, k/2 frames), the flat half splits to the depth limit.
  rng = np.random.default_rng(seed)
  n = 400
  flat = 0.5 + 0.1 * rng.random(n)
  spiky = np.where(rng.random(n) < 0.1, rng.uniform(0.8, 1, n), 0.0) + 0.001 * rng.random(n)
  scores = np.where(np.arange(n) < n // 2, flat, spiky)
  if flip:
    scores = scores[::-1].copy()
  leaves = peers._aks_leaves(peers._unit_range(scores)[0], k, 0.8, depth)
  levels = {level for _, _, level in leaves}
  expected = aks_repository_loop(scores, k, 0.8, depth)
  assert len(expected) == k
  assert peers.aks(scores, np.ones(n, bool), k, 0.8, depth).tolist() == expected
  if levels == {1, depth}:  # the usual case (not when the spikes are too few to stand out)
    spiky_half = np.arange(n // 2) if flip else np.arange(n // 2, n)
    assert len(set(expected) & set(spiky_half.tolist())) == k // 2


def test_aks_defaults_match_repository_at_its_frame_budget():
  # The repository's own setting: k=32 (or 64) frames, t1=0.8, depth 5 -> 32 leaves.
  rng = np.random.default_rng(7)
  for trial in range(10):
    scores = rng.normal(size=600) if trial % 2 else np.where(rng.random(600) < 0.02, 1.0, 0.0)
    scores = scores + 1e-3 * rng.random(600)
    for k in (32, 64):
      expected = aks_repository_loop(scores, k)
      assert len(expected) == k
      assert peers.aks(scores, np.ones(600, bool), k).tolist() == expected


def test_aks_whole_video_stands_out_gives_top_k():
  # 4 spikes among 64 zeros: top-4 mean 1 minus mean 4/64 = 0.94 > 0.8, so the root is kept
  # at level 0 and its quota 4 / 2**0 = 4 goes to the four highest scores.
  scores = np.zeros(64)
  scores[[5, 20, 21, 50]] = [1.0, 0.9, 0.95, 0.99]
  assert peers.aks(scores, np.ones(64, bool), 4).tolist() == [5, 20, 21, 50]


def test_aks_one_half_stands_out_at_the_first_level():
  # n=80, k=4. Frames 0..39 all 0.5; frames 40..79 zero but for spikes at 45, 55, 65, 75.
  # Root: top-4 mean (1 + .95 + .9 + .85)/4 = .925 minus mean (20 + 3.7)/80 = .296 -> .63,
  #   not above 0.8 -> split.
  # Second half (level 1): .925 - 3.7/40 = .8325 > 0.8 -> kept; quota 4/2 = 2: its two best,
  #   45 and 55.
  # First half: constant, never stands out -> split to level 5, 16 leaves of 2-3 frames
  #   ([0,2) [2,5) [5,7) [7,10) [10,12) ... [27,30) ... [37,40)), each worth 4/32 = 1/8.
  #   The repository gives each int(1/8) = 0 frames (it returns only 45 and 55). Cumulative
  #   rounding: running totals 1/8, 2/8, ... reach 1/2 at leaf 3 = [7,10) and 3/2 at leaf 11
  #   = [27,30), one frame each, the lowest index of equal scores: 7 and 27.
  scores = np.zeros(80)
  scores[:40] = 0.5
  scores[[45, 55, 65, 75]] = [1.0, 0.95, 0.9, 0.85]
  assert aks_repository_loop(scores, 4) == [45, 55]
  assert peers.aks(scores, np.ones(80, bool), 4).tolist() == [7, 27, 45, 55]


def test_aks_nothing_stands_out_splits_down_to_depth():
  # n=64, k=32: a segment of <= 32 frames never stands out and the root's top-32 mean minus
  # its mean is at most 1/2, so everything splits to level 5: 32 leaves of 2 frames
  # ([0,2), [2,4), ...), 32/32 = 1 frame each, the better of each pair.
  rng = np.random.default_rng(3)
  scores = rng.random(64)
  expected = [2 * i + int(scores[2 * i + 1] > scores[2 * i]) for i in range(32)]
  assert peers.aks(scores, np.ones(64, bool), 32).tolist() == expected
  assert aks_repository_loop(scores, 32) == expected


def test_aks_constant_scores_spread_over_the_video():
  # Constant -> nothing stands out -> 32 leaves of 2 at level 5, each worth 8/32 = 1/4;
  # running totals reach 1/2, 3/2, ... at leaves 1, 5, 9, ...: their first frames 2, 10, ...
  assert peers.aks(np.zeros(64), np.ones(64, bool), 8).tolist() == list(range(2, 64, 8))


def test_aks_padding_is_dropped_before_the_split():
  # The same video padded at the end, or with padding interleaved, picks the same frames.
  rng = np.random.default_rng(5)
  scores = rng.random(100)
  base = peers.aks(scores, np.ones(100, bool), 8)
  padded = peers.aks(np.concatenate([scores, np.ones(28)]), np.arange(128) < 100, 8)
  assert padded.tolist() == base.tolist()
  spread = np.zeros(200)
  spread[::2] = scores
  interleaved = peers.aks(spread, np.arange(200) % 2 == 0, 8)
  assert (interleaved // 2).tolist() == base.tolist()


def test_aks_rejects_bad_depth():
  with pytest.raises(ValueError, match="depth"):
    peers.aks(np.zeros(8), np.ones(8, bool), 2, depth=-1)


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize(
  "k, error, match",
  [
    (0, ValueError, "k must be >= 1"),
    (9, ValueError, "larger than the number of candidates n=8"),
    (2.0, TypeError, "k must be a Python int"),
    (True, TypeError, "k must be a Python int"),
  ],
)
def test_selector_k_errors(name, k, error, match):
  with pytest.raises(error, match=match):
    SELECTORS[name](np.zeros(8), np.ones(8, bool), k)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_selector_shape_errors(name):
  with pytest.raises(ValueError, match="same shape"):
    SELECTORS[name](np.zeros(7), np.ones(8, bool), 2)
  with pytest.raises(ValueError, match="1-D"):
    SELECTORS[name](np.zeros((2, 8)), np.ones((2, 8), bool), 2)


# --- GenS ---

EXPECTED = {15: 5.0, 16: 4.0, 45: 3.0, 46: 3.0}


@pytest.mark.parametrize(
  "text",
  [
    '{"15": 5, "16": 4, "45-46": 3}',  # plain
    '```json\n{"15": 5, "16": 4, "45-46": 3}\n```',  # fenced
    '```\n{"15": 5, "16": 4, "45-46": 3}\n```',  # fenced, no language
    'Here are the relevant frames:\n{"15": 5, "16": 4, "45-46": 3}\nHope this helps!',  # prose
    'Sure.\n```json\n{"15": 5, "16": 4, "45-46": 3}\n```\nFrames 15-16 show it.',
    "{'15': 5, '16': 4, '45-46': 3}",  # single quotes
    "{'15': '5', '16': '4', '45-46': '3',}",  # single-quoted string scores, trailing comma
    '{"15": "5", "16": "4.0", "45 - 46": 3}',  # string scores, spaced range
    "{15: 5, 16: 4, '45-46': 3}",  # integer keys
    '{"45-46": 3, "16": 4, "15": 5}',  # order of the answer does not matter
    'I see {no json} here, but: {"15": 5, "16": 4, "45\u201346": 3}',  # skips a non-object
  ],
)
def test_parse_gens_forms(text):
  parsed = peers.parse_gens(text, 50)
  assert parsed == EXPECTED
  assert list(parsed) == sorted(parsed)


def test_parse_gens_readme_example_and_overlaps():
  # GenS's README example; frames named twice keep their highest relevance.
  text = '{"11-12": 5, "16-21": 4, "28-30": 4, "46-49": 4, "22-27": 3, "33": 2}'
  parsed = peers.parse_gens(text, 50)
  assert parsed[11] == parsed[12] == 5 and parsed[33] == 2
  assert sorted(parsed) == [11, 12, *range(16, 31), 33, 46, 47, 48, 49]
  assert peers.parse_gens('{"14-16": 3, "15": 5, "16": 1.5}', 20) == {14: 3.0, 15: 5.0, 16: 3.0}
  assert peers.parse_gens("{}", 5) == {}
  assert peers.parse_gens('{"0": 1, "4": 2}', 5) == {0: 1.0, 4: 2.0}  # both ends of [0, n)


@pytest.mark.parametrize(
  "text, match",
  [
    ("", "no readable JSON"),
    ("The most relevant frames are 15 and 16.", "no readable JSON"),
    ('```json\n{"15": 5, "16": \n```', "no readable JSON"),  # cut off
    ("{frame 15: five}", "no readable JSON"),
    ('["15", "16"]', "no readable JSON"),  # not an object
    ('{"15": 5, "50": 4}', "outside \\[0, 50\\): 50"),
    ('{"48-52": 3, "60": 1, "2": 5}', "outside \\[0, 50\\): 48-52, 60"),
    ('{"a-b": 3}', "malformed frame key 'a-b'"),
    ('{"46-45": 3}', "runs backwards"),
    ('{"-3": 3}', "malformed frame key '-3'"),
    ('{"15.5": 3}', "malformed frame key"),
    ('{"15": "high"}', "not a number"),
    ('{"15": true}', "not a number"),
    ('{"15": null}', "not a number"),
    ('{"15": [5]}', "not a number"),
    ('{"15": NaN}', "not finite"),
  ],
)
def test_parse_gens_failures(text, match):
  with pytest.raises(ValueError, match=match):
    peers.parse_gens(text, 50)


def test_parse_gens_argument_errors():
  with pytest.raises(TypeError):
    peers.parse_gens(None, 5)
  with pytest.raises(ValueError, match="n must be"):
    peers.parse_gens("{}", 0)


def test_gens_scores_feed_selection():
  relevance = peers.parse_gens('```json\n{"3": 5, "10-11": 4, "7": 2}\n```', 16)
  scores = peers.gens_scores(relevance, 16)
  assert scores.dtype == np.float32 and scores.shape == (16,)
  assert scores.tolist() == [0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 4, 4, 0, 0, 0, 0]
  valid = np.ones(16, bool)
  assert selection.top_k(scores, valid, 3).tolist() == [3, 10, 11]
  assert selection.top_k(scores, valid, 5).tolist() == [0, 3, 7, 10, 11]  # 0: unnamed, lowest
  with pytest.raises(ValueError, match="outside"):
    peers.gens_scores({16: 1.0}, 16)
  with pytest.raises(ValueError, match="outside"):
    peers.gens_scores({-1: 1.0}, 16)


def test_gens_instruction_asks_for_the_json_answer():
  text = peers.GENS_INSTRUCTION
  assert "relevance score" in text and "1 to 5" in text
  assert '{"timestamp": score, ...}' in text
  assert "  " not in text and "\n" not in text
