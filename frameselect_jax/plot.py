"""A picture of one selection: the score curve over time, the chosen frames marked on it,
and a strip of thumbnails of the chosen frames with their timestamps.

Matplotlib renders with Agg (no display needed); `plot_selection` writes a PNG.
"""

from __future__ import annotations

import math
import os

import numpy as np

THUMB_HEIGHT = 120  # pixels of the thumbnails read back from the video


def load_thumbnails(path: str, frame_indices, height: int = THUMB_HEIGHT) -> list[np.ndarray]:
  """The given source frames of a video (`video.decode_frames`), resized to `height` with
  their aspect ratio kept; uint8 [height, width, 3] arrays in the order given."""
  from PIL import Image

  from frameselect_jax import video

  out = []
  for frame in video.decode_frames(path, [int(i) for i in frame_indices]):
    image = Image.fromarray(frame)
    width = max(1, round(image.width * height / image.height))
    out.append(np.asarray(image.resize((width, height), Image.BILINEAR)))
  return out


def plot_selection(
  result,
  out_path: str,
  thumbnails=None,
  *,
  title: str | None = None,
  logits: bool = False,
  note: str | None = None,
  spans=(),
):
  """Writes a PNG of one `api.Selection`.

  Top: sigmoid(score) (or the raw logits with logits=True) of every valid candidate against
  its time in seconds, the chosen frames marked in red, the time the valid candidates
  cover shaded. Bottom: the chosen frames' thumbnails (from `load_thumbnails`) with their
  timestamps, 8 to a row. `note` goes under the title (e.g. "untrained: scores are
  random"); `spans` are (start_s, stop_s, label) intervals to highlight (e.g. ground truth).
  """
  # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
  from matplotlib.figure import Figure

  valid = np.asarray(result.valid, bool)
  times = np.asarray(result.candidate_timestamps, np.float64)
  values = np.asarray(result.scores, np.float64) if logits else result.probabilities
  chosen = np.asarray(result.indices)
  k = len(chosen)

  width_in, curve_in, per_row = 11.0, 2.8, 8
  has_thumbs = thumbnails is not None and len(thumbnails) == k and k > 0
  thumb_rows = math.ceil(k / per_row) if has_thumbs else 0
  if has_thumbs:  # rows as tall as the thumbnails drawn at the width of one column
    aspect = max(t.shape[0] / t.shape[1] for t in thumbnails)
    thumb_in = 0.8 * width_in / per_row * aspect + 0.3
  figure = Figure(
    figsize=(width_in, curve_in + 0.9 + thumb_rows * (thumb_in if has_thumbs else 0)),
    dpi=100,
    layout="constrained",
  )
  grid = figure.add_gridspec(
    1 + thumb_rows,
    per_row,
    height_ratios=[curve_in] + [thumb_in] * thumb_rows if has_thumbs else [curve_in],
  )
  curve = figure.add_subplot(grid[0, :])
  duration = max(float(result.duration), float(times[valid].max()) if valid.any() else 0.0)
  if valid.any():
    curve.axvspan(
      times[valid].min(),
      times[valid].max(),
      color="#e8eef7",
      zorder=0,
      label=f"valid candidates ({valid.sum()} of {len(valid)})",
    )
  for start, stop, label in spans:
    curve.axvspan(start, stop, color="#f2c14e", alpha=0.45, zorder=0, label=label)
  curve.plot(
    times[valid],
    values[valid],
    "-",
    color="#3b6ea8",
    lw=1.3,
    marker=".",
    ms=3,
    label="logit" if logits else "sigmoid(score) = P(frame helps)",
  )
  for t in result.timestamps:
    curve.axvline(t, color="#d04040", lw=0.8, alpha=0.4, zorder=1)
  curve.plot(
    result.timestamps,
    values[chosen],
    "o",
    color="#d04040",
    ms=6,
    zorder=3,
    label=f"chosen ({result.strategy}, k={result.k})",
  )
  curve.set_xlim(0, duration if duration > 0 else 1)
  curve.set_xlabel("time (s)")
  curve.set_ylabel("logit" if logits else "sigmoid(score)")
  curve.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  curve.grid(alpha=0.3)
  curve.set_title(title or result.question, fontsize=10, loc="left")
  if note:
    curve.text(
      1.0,
      1.02,
      note,
      transform=curve.transAxes,
      ha="right",
      va="bottom",
      fontsize=8,
      color="#a03030",
    )

  for j in range(k if has_thumbs else 0):
    ax = figure.add_subplot(grid[1 + j // per_row, j % per_row])
    ax.imshow(thumbnails[j])
    ax.set_title(f"#{int(chosen[j])}  {result.timestamps[j]:.2f} s", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  return save_figure(figure, out_path)


def save_figure(figure, out_path: str) -> str:
  """Writes the figure as a PNG, whole or not at all (a temporary file, then a rename)."""
  tmp = f"{out_path}.tmp-{os.getpid()}"
  try:
    figure.savefig(tmp, format="png")
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_path
