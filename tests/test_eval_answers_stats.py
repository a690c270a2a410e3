"""eval.answers (reading multiple-choice and judge replies) and eval.stats (bootstrap intervals,
McNemar) against hand-computed cases."""

import itertools
import math

import numpy as np
import pytest

from eval import answers, stats

OPTIONS = ["a red car", "a blue car", "a dog", "nothing"]


@pytest.mark.parametrize(
  "text, expected",
  [
    ("B", 1),
    ("(B)", 1),
    ("B.", 1),
    ("B)", 1),
    ("B:", 1),
    ("[B]", 1),
    ("  D.  ", 3),
    ("Answer: B", 1),
    ("answer: (d)", 3),
    ("The answer is B.", 1),
    ("The answer is b.", 1),
    ("The correct answer is (C) a red car", 2),
    ("The best option is C", 2),
    ("Option (D)", 3),
    ("**B**", 1),
    ("**Answer:** C", 2),
    ("B. a blue car", 1),
    ("B) a blue car", 1),
    ("B a blue car", 1),
    ("B - a blue car", 1),
    ("b a blue car", 1),
    ("b)", 1),
    ("(b)", 1),
    ("b", 1),
    ("It is a red car (C)", 2),
    ("I think B is right.", 1),
    ("Let me think. A is wrong. The answer is C.", 2),
  ],
)
def test_parse_choice_letter_forms(text, expected):
  assert answers.parse_choice(text, OPTIONS) == expected


@pytest.mark.parametrize(
  "text",
  ["A", "A.", "A)", "A:", "(A)", "[a]", "a", "a)", "A) a red car", "Answer: A", "The answer is A"],
)
def test_parse_choice_unambiguous_a(text):
  assert answers.parse_choice(text, OPTIONS) == 0


@pytest.mark.parametrize(
  "text, expected",
  [
    ("A man is running", None),
    ("A car drives by.", None),
    ("a person waves", None),
    ("A.I. made this video", None),
    ("The answer is a dog", 2),  # the article after "answer is", then the option text
    ("A dog.", 2),  # the whole answer is option C's text
    ("a dog", 2),
    ("A blue car, clearly", 1),
  ],
)
def test_parse_choice_article_trap(text, expected):
  assert answers.parse_choice(text, OPTIONS) == expected


def test_parse_choice_article_matches_an_option_text():
  assert answers.parse_choice("A man is running", ["a man is running", "a woman"]) == 0
  assert answers.parse_choice("A man is running", ["a woman", "a man is running"]) == 1
  assert answers.parse_choice("A man is running", ["a woman", "man is running"]) == 1
  assert answers.parse_choice("A man is running", ["man is running", "a woman"]) == 0
  assert answers.parse_choice("a a red car", OPTIONS) == 0


@pytest.mark.parametrize("text", ["E", "(F)", "e)", "Answer: E", "The answer is (Z).", "Z"])
def test_parse_choice_letters_out_of_range(text):
  assert answers.parse_choice(text, OPTIONS) is None


@pytest.mark.parametrize(
  "text, expected",
  [
    ("a blue car", 1),
    ("A Blue   Car", 1),
    ("It is a blue car.", 1),
    ("nothing", 3),
    ("Nothing.", 3),
    ("I see nothing", 3),
    ("a red car or a blue car", None),  # two options named: unreadable
    ("not a dog but nothing", None),
  ],
)
def test_parse_choice_option_text(text, expected):
  assert answers.parse_choice(text, OPTIONS) == expected


def test_parse_choice_longest_and_exact_option_text_win():
  options = ["dog", "a dog running", "cat"]
  assert answers.parse_choice("I saw a dog running away", options) == 1
  assert answers.parse_choice("the dog", options) == 0
  assert answers.parse_choice("doghouse", options) is None  # whole words only
  assert answers.parse_choice("a dog running, not a cat", options) is None
  assert answers.parse_choice("a dog running, like the other dog", options) is None
  # An answer equal to an option text wins over reading it as a letter.
  assert answers.parse_choice("A", ["yes", "no", "A", "B"]) == 2
  assert answers.parse_choice("b", ["yes", "no", "A", "B"]) == 3


@pytest.mark.parametrize("text", ["", "   ", "???", "I don't know", "zzz", "**", None])
def test_parse_choice_unreadable(text):
  assert answers.parse_choice(text, OPTIONS) is None


def test_parse_choice_no_options():
  assert answers.parse_choice("A", []) is None


def test_letters():
  assert answers.LETTERS == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def test_judge_messages_standard_wording():
  messages = answers.judge_messages("what is he doing", "running", "he runs")
  assert [m["role"] for m in messages] == ["system", "user"]
  system, user = messages[0]["content"], messages[1]["content"]
  assert "evaluating the correctness of generative outputs for question-answer pairs" in system
  assert "compare the predicted answer with the correct answer" in system
  assert "Please evaluate the following video-based question-answer pair" in user
  assert "Question: what is he doing\nCorrect Answer: running\nPredicted Answer: he runs\n" in user
  assert (
    "Provide your evaluation only as a yes/no and score where the score is an integer value "
    "between 0 and 5, with 5 indicating the highest meaningful match." in user
  )
  assert "{'pred': 'yes', 'score': 4.8}" in user
  # Braces in the inputs are passed through, not formatted.
  assert "Predicted Answer: {x}" in answers.judge_messages("q", "a", "{x}")[1]["content"]


@pytest.mark.parametrize(
  "text, expected",
  [
    ("{'pred': 'yes', 'score': 4}", (True, 4)),
    ('{"pred": "no", "score": 1}', (False, 1)),
    ("```python\n{'pred': 'yes', 'score': 5}\n```", (True, 5)),
    ('```json\n{"pred": "no", "score": 0}\n```', (False, 0)),
    ("Here is my evaluation: {'pred': 'no', 'score': 2}. Hope it helps.", (False, 2)),
    ("{'pred': 'Yes', 'score': 4.0}", (True, 4)),
    ("{pred: yes, score: 3}", (True, 3)),  # not a literal: read loosely
    ("yes, 4", (True, 4)),
    ("No, 0", (False, 0)),
    ("pred: no score: 1", (False, 1)),
    ("Pred: Yes\nScore: 3", (True, 3)),
    ("'pred': 'yes', 'score': 5", (True, 5)),
    ("{'pred': 'yes', 'score': 4.8}", (True, 4.8)),  # the protocol's own example reply
    ("pred: yes score: 4.5", (True, 4.5)),
  ],
)
def test_parse_judgement(text, expected):
  assert answers.parse_judgement(text) == expected


@pytest.mark.parametrize(
  "text",
  [
    "{'pred': 'yes', 'score': 7}",
    "{'pred': 'yes', 'score': -1}",
    "{'pred': 'maybe', 'score': 3}",
    "{'pred': 'yes', 'score': True}",
    "yes, 7",
    "yes, -1",
    "yes or no, 3",
    "yes",
    "I cannot judge this.",
    "",
    None,
  ],
)
def test_parse_judgement_unreadable(text):
  assert answers.parse_judgement(text) is None


def _exact_bootstrap_quantiles(values, tail):
  """Percentile interval of the exact bootstrap distribution, by listing all n^n resamples."""
  means = sorted(np.mean(r) for r in itertools.product(values, repeat=len(values)))
  cdf = np.arange(1, len(means) + 1) / len(means)
  return means[int(np.searchsorted(cdf, tail))], means[int(np.searchsorted(cdf, 1 - tail))]


def test_bootstrap_mean_exact_and_interval_contains_it():
  values = [1, 0, 1, 1, 0, 1, 1, 1]
  mean, low, high = stats.bootstrap_interval(values)
  assert mean == 0.75
  assert low <= mean <= high
  assert 0.0 <= low < high <= 1.0


def test_bootstrap_all_ones_and_all_zeros():
  assert stats.bootstrap_interval(np.ones(50)) == (1.0, 1.0, 1.0)
  assert stats.bootstrap_interval([0, 0, 0]) == (0.0, 0.0, 0.0)
  assert stats.bootstrap_interval([True, True]) == (1.0, 1.0, 1.0)


def test_bootstrap_deterministic_for_a_seed():
  values = np.random.default_rng(1).normal(size=200)
  assert stats.bootstrap_interval(values, seed=3) == stats.bootstrap_interval(values, seed=3)
  assert stats.bootstrap_interval(values, seed=3) != stats.bootstrap_interval(values, seed=4)


def test_bootstrap_narrows_with_more_data():
  small = np.array([1, 0, 1, 1, 0] * 10)  # n = 50, p = 0.6
  large = np.tile(small, 100)  # n = 5000, same mean
  _, low_s, high_s = stats.bootstrap_interval(small)
  mean, low_l, high_l = stats.bootstrap_interval(large)
  assert mean == pytest.approx(0.6)
  assert high_l - low_l < (high_s - low_s) / 5  # ~10x narrower (sqrt(100))


@pytest.mark.parametrize(
  "values, level",
  [
    ([1, 0, 1], 0.9),  # 27 resamples; exact interval (1/3, 1)
    ([1, 0, 1], 0.95),  # exact interval (0, 1)
    ([1, 0, 1, 1, 0], 0.95),  # 3125 resamples; exact interval (0.2, 1)
    ([0.0, 0.5, 2.0, 3.0], 0.8),  # real values, 256 resamples
  ],
)
def test_bootstrap_matches_exact_bootstrap(values, level):
  exact_low, exact_high = _exact_bootstrap_quantiles(values, (1 - level) / 2)
  _, low, high = stats.bootstrap_interval(values, resamples=20000, level=level, seed=5)
  assert low == pytest.approx(exact_low, abs=1e-9)
  assert high == pytest.approx(exact_high, abs=1e-9)


def test_bootstrap_exact_case_by_hand():
  # [1, 0, 1]: the mean of a resample is k/3, k ~ Bin(3, 2/3): P = 1, 6, 12, 8 (/27).
  # CDF 1/27 = 0.037 > 0.025 and 19/27 = 0.70 < 0.975: the 95% interval is (0, 1); the 90%
  # interval starts at 1/3 (0.037 < 0.05 <= 7/27).
  assert _exact_bootstrap_quantiles([1, 0, 1], 0.025) == (0.0, 1.0)
  assert _exact_bootstrap_quantiles([1, 0, 1], 0.05) == (pytest.approx(1 / 3), 1.0)


def test_bootstrap_large_input_matches_normal_approximation():
  values = np.zeros(5000)
  values[::2] = 1  # p = 0.5
  mean, low, high = stats.bootstrap_interval(values, resamples=10000)
  half = 1.959964 * math.sqrt(0.25 / 5000)
  assert mean == 0.5
  assert (high - low) / 2 == pytest.approx(half, rel=0.1)
  assert (low + high) / 2 == pytest.approx(0.5, abs=0.002)


def test_bootstrap_bad_input():
  with pytest.raises(ValueError):
    stats.bootstrap_interval([])
  with pytest.raises(ValueError):
    stats.bootstrap_interval([[1, 0], [0, 1]])
  with pytest.raises(ValueError):
    stats.bootstrap_interval([1, 0], level=1.5)
  with pytest.raises(ValueError):
    stats.bootstrap_interval([1, 0], resamples=0)


def test_paired_bootstrap():
  a = np.random.default_rng(2).integers(0, 2, size=300)
  assert stats.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
  shift = stats.paired_bootstrap(a + 0.25, a)
  assert shift == (0.25, 0.25, 0.25)
  shift = stats.paired_bootstrap(a + 0.1, a)
  assert shift == pytest.approx((0.1, 0.1, 0.1))
  # Paired: the interval of a difference is that of the bootstrap of a - b.
  b = np.random.default_rng(3).integers(0, 2, size=300)
  assert stats.paired_bootstrap(a, b, seed=7) == stats.bootstrap_interval(a - b, seed=7)
  mean, low, high = stats.paired_bootstrap(a, b)
  assert mean == pytest.approx(a.mean() - b.mean())
  assert low <= mean <= high
  with pytest.raises(ValueError):
    stats.paired_bootstrap([1, 0, 1], [1, 0])
  with pytest.raises(ValueError):
    stats.paired_bootstrap([], [])


def _pairs(a_only, b_only, both=0, neither=0):
  """Correctness arrays with the given discordant and concordant counts."""
  a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
  b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
  return np.array(a), np.array(b)


def test_mcnemar_exact_by_hand():
  # n = 7 discordant, k = 1: P[X <= 1] = (C(7,0) + C(7,1)) / 2^7 = 8/128; p = 2 * 8/128.
  result = stats.mcnemar(*_pairs(1, 6, both=30, neither=5))
  assert result["a_only"] == 1 and result["b_only"] == 6
  assert result["exact"] is True
  assert result["p_value"] == pytest.approx(0.125)
  assert result["statistic"] == 1.0
  # Symmetric in a and b; balanced counts give p = 1 (capped).
  assert stats.mcnemar(*_pairs(6, 1))["p_value"] == pytest.approx(0.125)
  assert stats.mcnemar(*_pairs(3, 3))["p_value"] == 1.0
  # n = 24 is still exact: k = 5, sum C(24, 0..5) = 55455.
  result = stats.mcnemar(*_pairs(5, 19))
  assert result["exact"] is True
  assert result["p_value"] == pytest.approx(2 * 55455 / 2**24)


def test_mcnemar_chi_square():
  result = stats.mcnemar(*_pairs(40, 20, both=100, neither=10))
  assert result["a_only"] == 40 and result["b_only"] == 20
  assert result["exact"] is False
  assert result["statistic"] == pytest.approx(19**2 / 60)  # 6.0167
  assert result["p_value"] == pytest.approx(0.0141714, rel=1e-4)
  # n = 25 switches to the chi-square form: (|13 - 12| - 1)^2 / 25 = 0, p = 1.
  result = stats.mcnemar(*_pairs(13, 12))
  assert result["exact"] is False
  assert result["statistic"] == 0.0 and result["p_value"] == 1.0


def test_mcnemar_no_discordant_pairs():
  result = stats.mcnemar(*_pairs(0, 0, both=10, neither=4))
  assert result == {"a_only": 0, "b_only": 0, "statistic": 0.0, "p_value": 1.0, "exact": True}
  assert stats.mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_mcnemar_bad_input():
  with pytest.raises(ValueError):
    stats.mcnemar([1, 0, 1], [1, 0])
  with pytest.raises(ValueError):
    stats.mcnemar([1, 2], [1, 0])
