"""The synthetic needle benchmark's downstream "model": it answers from pixels alone.

A question of the needle benchmark (`frameselect_jax.synthetic.write_needle_benchmark`) asks
"Which symbol is on the <colour> card?". `NeedleReader.answer` reads the colour name from the
question, looks for pixels of that colour in the frames it is given (close to the colour in
RGB and far from the muted grey backgrounds, so white cards count and grey ones do not), takes
the frame where that colour's card is largest, and matches the dark pixels inside the card's
box against each option's symbol drawn at the box's size (`synthetic.symbol_mask`; the best
correlation wins, each symbol trying the box and the boxes a pixel off). It never looks at
timestamps or at the ground truth, so, as with a real model, it can only answer right when the
frames chosen for it show the card: accuracy then measures the frame selection. When no frame
shows the colour it guesses, deterministically, from (seed, question, options).
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import Sequence

import numpy as np
from PIL import Image

from frameselect_jax import synthetic

_COLOR_WORDS = re.compile(r"\b(" + "|".join(synthetic.NEEDLE_COLORS) + r")\b", re.IGNORECASE)
# Background greys of synthetic.muted_background are levels 70 to 130 with a +-10 tint.
_GREY_BAND = (60.0, 145.0)


class NeedleReader:
  """Answers needle questions from the pixels of the given frames.

  Args:
    seed: varies the guesses made when no frame shows the asked colour.
    color_tolerance: a pixel is of the asked colour when its RGB distance to it is below this
      (needle colours are >= 190 apart, backgrounds >= 140 from every needle colour).
    min_area_fraction: the fewest pixels of that colour, as a fraction of the frame, for a
      frame to show the card (about 1/9 at the default card_fraction 0.34; keep it under a
      card's share, e.g. 0.01 for card_fraction >= 0.15).
  """

  def __init__(self, seed: int = 0, color_tolerance: float = 80.0, min_area_fraction: float = 0.01):
    self.seed = seed
    self.color_tolerance = float(color_tolerance)
    self.min_area_fraction = float(min_area_fraction)
    self.last_found = False

  def answer(self, frames, question: str, options: Sequence[str], timestamps=None) -> str:
    """A model-like text answer, "The answer is (B).", for frames uint8 [k, H, W, 3]."""
    del timestamps  # pixels only: the time a frame was taken says nothing about its content
    options = list(options)
    if not options:
      raise ValueError("the needle reader needs the options (symbol names)")
    match = _COLOR_WORDS.search(question)
    choice = None
    if match is not None:
      choice = self._read(np.asarray(frames), match.group(1).lower(), options)
    self.last_found = choice is not None
    if choice is None:
      key = f"{self.seed}\x00{question}\x00" + "\x00".join(options)
      choice = zlib.crc32(key.encode()) % len(options)
    return f"The answer is ({chr(ord('A') + choice)})."

  def color_mask(self, frame: np.ndarray, color: str) -> np.ndarray:
    """bool [H, W]: pixels of the named needle colour (not background grey)."""
    pixels = frame.astype(np.float32)
    near = np.square(pixels - np.float32(synthetic.NEEDLE_COLORS[color])).sum(axis=-1)
    grey = np.clip(pixels.mean(axis=-1, keepdims=True), *_GREY_BAND)
    from_grey = np.square(pixels - grey).sum(axis=-1)
    return (near < self.color_tolerance**2) & (from_grey > self.color_tolerance**2)

  def _read(self, frames: np.ndarray, color: str, options: list[str]) -> int | None:
    """Index of the option whose symbol is on the largest card of `color`, None if no card."""
    if frames.ndim == 3:
      frames = frames[None]
    if len(frames) == 0:
      return None
    # Counting on every few pixels of a large frame finds the same frame, faster.
    step = max(1, min(frames.shape[1:3]) // 64)
    counts = [self.color_mask(frame[::step, ::step], color).mean() for frame in frames]
    if max(counts) < self.min_area_fraction:
      return None
    frame = frames[int(np.argmax(counts))]
    box = _box(self.color_mask(frame, color))
    if box is None:
      return None
    top, left, bottom, right = box
    # The symbol is black: darkness against the card's own level (its colour pixels' median).
    crop = frame[top:bottom, left:right]
    level = max(float(np.median(crop.max(axis=-1)[self.color_mask(crop, color)])), 1.0)
    dark = np.clip(1.0 - frame.astype(np.float32).max(axis=-1) / level, 0.0, 1.0)
    # A blurred edge may put the box a pixel off: each symbol gets its best of the nearby boxes.
    height, width = dark.shape
    shifts = (-1, 0, 1) if min(bottom - top, right - left) < 40 else (0,)  # a pixel matters
    boxes = {
      (max(top + t, 0), max(left + l, 0), min(bottom + b, height), min(right + r, width))
      for t in shifts
      for l in shifts
      for b in shifts
      for r in shifts
    }
    scores = [
      max(_match(dark[t:b, l:r], name) for t, l, b, r in boxes)
      if name in synthetic.SYMBOLS
      else -2.0
      for name in (option.strip().lower() for option in options)
    ]
    return int(np.argmax(scores)) if max(scores) > -2.0 else None


def _match(dark: np.ndarray, symbol: str) -> float:
  """Correlation of a darkness map with the symbol drawn at its size (antialiased)."""
  a = dark.ravel() - dark.mean()
  return float(a @ _template(symbol, *dark.shape) / (np.linalg.norm(a) + 1e-6))


@functools.lru_cache(maxsize=4096)
def _template(symbol: str, height: int, width: int) -> np.ndarray:
  """The symbol drawn large and resized to height x width: centred, unit norm, flat."""
  large = Image.fromarray(synthetic.symbol_mask(symbol, 96).astype(np.float32))
  template = np.asarray(large.resize((width, height), Image.BOX)).ravel()
  template = template - template.mean()
  return template / (np.linalg.norm(template) + 1e-6)


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """(top, left, bottom, right) of the card in a colour mask: the rows and columns holding a
  fair share of its pixels, cut to the square (the card's shape) holding the most of them, so
  that a sliver of colour at another card's edge does not widen it."""
  if not mask.any():
    return None
  rows = np.flatnonzero(mask.sum(axis=1) >= 0.25 * mask.sum(axis=1).max())
  cols = np.flatnonzero(mask.sum(axis=0) >= 0.25 * mask.sum(axis=0).max())
  (top, bottom), (left, right) = (rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1)
  height, width = bottom - top, right - left
  if min(height, width) < 3:
    return None
  if max(height, width) <= 1.15 * min(height, width):  # square enough: blur, not a sliver
    return int(top), int(left), int(bottom), int(right)
  side = min(height, width)
  region = np.pad(mask[top:bottom, left:right], ((1, 0), (1, 0))).cumsum(0).cumsum(1)
  counts = (
    region[side:, side:] - region[:-side, side:] - region[side:, :-side] + region[:-side, :-side]
  )
  dy, dx = np.unravel_index(np.argmax(counts), counts.shape)
  return int(top + dy), int(left + dx), int(top + dy + side), int(left + dx + side)
