"""The needle benchmark's pixel-only reader (eval/needle_reader.py) on real written videos."""

import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image

from eval.needle_reader import NeedleReader
from frameselect_jax import synthetic, video, videoqa

SETTINGS = {
  "64px": synthetic.NeedleSettings(duration_s=4.0, fps=8, size=64),
  "96px-alike": synthetic.NeedleSettings(
    duration_s=4.0, fps=8, size=96, distractor_alike=1.0, seed=1
  ),
  "64px-greyish": synthetic.NeedleSettings(
    duration_s=4.0, fps=8, size=64, distractor_alike=0.4, seed=2
  ),
}
ANSWER = re.compile(r"^The answer is \(([A-D])\)\.$")


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
  """{name: items} for each setting, 6 videos (18 questions) each."""
  out = {}
  for name, settings in SETTINGS.items():
    root = str(tmp_path_factory.mktemp(f"needle-{name}"))
    synthetic.write_needle_benchmark(root, {"test": 6}, settings, progress=False)
    out[name] = videoqa.load("needle", root, "test")
  return out


def letter(text: str) -> int:
  match = ANSWER.match(text)
  assert match, f"not a model-like answer: {text!r}"
  return ord(match.group(1)) - ord("A")


def jpeg(frames: np.ndarray, quality: int = 75) -> np.ndarray:
  def one(frame):
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))

  return np.stack([one(f) for f in frames])


def split_candidates(item, size):
  """Decoded candidates and the positions of those that show / do not show the needle."""
  cands = video.decode_candidates(item.video, n=32, size=size)
  relevance = synthetic.candidate_relevance(item.extra, cands.frame_indices)
  return cands, np.flatnonzero(relevance > 0), np.flatnonzero(relevance == 0)


@pytest.mark.parametrize("size", [64, 128, 384])
def test_reads_the_card_when_a_frame_shows_it(benchmarks, size):
  reader = NeedleReader()
  rng = np.random.default_rng(size)
  results = {}
  for name, items in benchmarks.items():
    if size == 384 and name != "64px":  # the largest upscale (6x) is enough, and slow to decode
      continue
    for item in items:
      cands, shown, hidden = split_candidates(item, size)
      assert len(shown) > 0, item.qid
      others = rng.choice(hidden, 3, replace=False)
      cases = {
        "needle+3": np.sort(np.concatenate([shown, others])),
        "one needle frame": shown[len(shown) // 2 : len(shown) // 2 + 1],
        "all 32": np.arange(32),
      }
      for case, picked in cases.items():
        for compressed in (False, True) if case != "all 32" else (False,):
          frames = cands.frames[picked]
          frames = jpeg(frames) if compressed else frames
          got = letter(reader.answer(frames, item.question, item.options, cands.timestamps[picked]))
          results[(name, item.qid, case, compressed)] = (
            got == item.answer_index and reader.last_found
          )
  accuracy = float(np.mean(list(results.values())))
  print(f"size {size}: accuracy {accuracy:.3f} over {len(results)} answers with the needle shown")
  assert accuracy == 1.0, [key for key, ok in results.items() if not ok]


def test_guesses_when_no_frame_shows_the_card(benchmarks):
  reader = NeedleReader(seed=0)
  guesses = []
  for items in benchmarks.values():
    for item in items:
      cands, _, hidden = split_candidates(item, 64)
      frames = cands.frames[hidden]  # other needles and distractors may show, this one never
      first = reader.answer(frames, item.question, item.options)
      assert not reader.last_found, item.qid
      assert NeedleReader(seed=0).answer(frames[::-1], item.question, item.options) == first
      guesses.append(letter(first))
  # Many questions, no card: the guesses spread over the options (and over symbols).
  blank = np.full((2, 64, 64, 3), 100, np.uint8)
  letters, symbols = [], []
  rng = np.random.default_rng(0)
  for color, _ in itertools.product(synthetic.NEEDLE_COLORS, range(50)):
    options = [str(s) for s in rng.permutation(synthetic.SYMBOLS)]
    choice = letter(reader.answer(blank, f"Which symbol is on the {color} card?", options))
    assert not reader.last_found
    letters.append(choice)
    symbols.append(options[choice])
  for values, names in ((letters, range(4)), (symbols, synthetic.SYMBOLS)):
    counts = [values.count(v) for v in names]
    assert min(counts) >= 0.15 * len(values), counts  # uniform would be 25% each
  assert len(set(guesses)) > 1
  # The seed changes the guesses, not their determinism.
  other = NeedleReader(seed=1)
  question, options = "Which symbol is on the red card?", list(synthetic.SYMBOLS)
  seeded = [letter(NeedleReader(seed=s).answer(blank, question, options)) for s in range(20)]
  assert len(set(seeded)) > 1
  assert other.answer(blank, question, options) == other.answer(blank, question, options)
  # No colour named at all: a guess too.
  reader.answer(blank, "Which symbol is on the card?", options)
  assert not reader.last_found


def test_answers_from_pixels_only(benchmarks):
  reader = NeedleReader()
  rng = np.random.default_rng(0)
  for item in benchmarks["96px-alike"]:
    cands, shown, hidden = split_candidates(item, 128)
    for picked in (np.sort(np.concatenate([shown, hidden[:4]])), hidden[:6]):
      frames, timestamps = cands.frames[picked], cands.timestamps[picked]
      expected = reader.answer(frames, item.question, item.options, timestamps)
      found = reader.last_found
      for other_times in (None, rng.permutation(timestamps), np.zeros_like(timestamps) - 5.0):
        assert reader.answer(frames, item.question, item.options, other_times) == expected
        assert reader.last_found == found
    # Paint the card out of the needle frames: the same frames, timestamps and question, but
    # nothing of that colour left to see, so the reader has to guess.
    painted = cands.frames[shown].copy()
    top, left, bottom, right = (round(v * 128 / 96) for v in item.extra["needle"]["box"])
    painted[:, max(top - 2, 0) : bottom + 2, max(left - 2, 0) : right + 2] = 110
    reader.answer(painted, item.question, item.options, cands.timestamps[shown])
    assert not reader.last_found, item.qid
