"""Downstream models: what answers a question from the selected frames.

- `ModelDownstream` over a `frameselect_jax.mllm` backend: an OpenAI-compatible server
  (vLLM, SGLang, a hosted API) or a local transformers Qwen2-VL. The frames go in temporal
  order, each after a line with its timestamp ("Frame 3 at 12.5 s:"), or, to a local
  Qwen2-VL with `as_video`, as one video input with the timestamps in the text; with `number_frames`
  the index and time are also drawn onto the frame ("Number it", for models that ignore text
  timestamps). The prompt is the benchmark's template.
- `NeedleDownstream`: the synthetic benchmark's pixel reader (eval/needle_reader.py).

Answers are cached on disk (`ResponseCache`), keyed by the model, the prompt and the frames'
content, so a rerun asks nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from frameselect_jax import errors
from frameselect_jax.text import OPTION_LETTERS


def options_text(options) -> str:
  return "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))


def render_prompt(template: str, question: str, options) -> str:
  """The benchmark's template with {question} and {options} (lettered, one per line)."""
  return template.format(question=question.strip(), options=options_text(options)).strip()


def number_frame(frame: np.ndarray, index: int, seconds: float) -> np.ndarray:
  """The frame with '#index t s' drawn in its top-left corner, white on black."""
  from PIL import Image, ImageDraw

  image = Image.fromarray(np.asarray(frame, np.uint8))
  draw = ImageDraw.Draw(image)
  label = f"#{index} {seconds:.1f}s"
  box = draw.textbbox((2, 2), label)
  draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
  draw.text((2, 2), label, fill=(255, 255, 255))
  return np.asarray(image)


class ResponseCache:
  """Answers on disk, one small JSON file per (model, prompt, frames) key, written whole."""

  def __init__(self, directory: str | None):
    self.directory = directory
    if directory:
      os.makedirs(directory, exist_ok=True)
    self.hits = 0

  @staticmethod
  def key(model: str, prompt: str, frames, timestamps) -> str:
    digest = hashlib.sha256(
      json.dumps([model, prompt, [round(float(t), 3) for t in timestamps]]).encode()
    )
    for frame in frames:
      digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()[:40]

  def get(self, key):
    if not self.directory:
      return None
    path = os.path.join(self.directory, key + ".json")
    try:
      with open(path) as f:
        value = json.load(f)
    except (OSError, json.JSONDecodeError):  # absent, or a half-written file: ask again
      return None
    self.hits += 1
    return value

  def put(self, key, value: dict):
    if self.directory:
      errors.write_atomically(os.path.join(self.directory, key + ".json"), json.dumps(value))


class ModelDownstream:
  """A multimodal LLM behind a `frameselect_jax.mllm` backend."""

  def __init__(
    self,
    backend,
    name,
    template,
    open_template,
    *,
    number_frames=False,
    max_tokens=32,
    as_video=False,
  ):
    self.backend, self.name = backend, name
    self.templates = {True: template, False: open_template}  # by: has options
    self.number_frames, self.max_tokens = number_frames, max_tokens
    # A local Qwen2-VL takes the frames as one video (its video input), timestamps in the text.
    self.as_video = as_video and hasattr(backend, "ask_video")
    # What the cache key says of how the model is asked.
    self.template = f"{template}|{open_template}|numbered={number_frames}|video={self.as_video}"

  def answer(self, frames, timestamps, question, options) -> dict:
    """{"text", "prompt_tokens", "completion_tokens"} for frames in temporal order."""
    before = self.backend.usage.as_dict()
    shown = [
      number_frame(f, i + 1, t) if self.number_frames else f
      for i, (f, t) in enumerate(zip(frames, timestamps))
    ]
    prompt = render_prompt(self.templates[bool(options)], question, options)
    if self.as_video:
      text = self.backend.ask_video(shown, timestamps, prompt, max_tokens=self.max_tokens)
    else:
      parts = []
      for i, (frame, t) in enumerate(zip(shown, timestamps)):
        parts += [f"Frame {i + 1} at {t:.1f} s:", frame]
      text = self.backend.ask([*parts, prompt], max_tokens=self.max_tokens)
    after = self.backend.usage.as_dict()
    return {
      "text": text,
      "prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"],
      "completion_tokens": after["completion_tokens"] - before["completion_tokens"],
    }


class NeedleDownstream:
  """The needle benchmark's reader: it answers from the pixels alone."""

  def __init__(self, seed: int = 0):
    from eval.needle_reader import NeedleReader

    self.reader = NeedleReader(seed=seed)
    self.name = f"needle-reader(seed={seed})"
    self.template = "pixels"

  def answer(self, frames, timestamps, question, options) -> dict:
    text = self.reader.answer(np.asarray(frames), question, options, timestamps)
    return {"text": text, "prompt_tokens": 0, "completion_tokens": 0}
