"""Pseudo-labels of one item's candidates: spatial, temporal, combined, and an oracle.

- spatial: a multimodal LLM sees one candidate and the question (with its options), reasons,
  then answers True or False; the label is P(True) / (P(True) + P(False)) at the answer.
- temporal: a multimodal LLM captions every candidate (captions depend on the video only, so
  they are cached per set of candidates and shared by its questions); a text LLM gets the
  numbered captions and the question and lists the most helpful frames: 1 for a listed
  frame, 0 for the others. Its answer is parsed robustly (a JSON list, ranges such as
  "3-5", prose with numbers); an answer out of range or without numbers is asked again once
  with a corrective message, then the item fails with that reason.
- combined: (w_s * spatial + w_t * temporal) / (w_s + w_t); all three are kept.
- oracle (the needle benchmark): the ground truth, optionally noised like pseudo-labels.

Prompts are templates (config `label.prompts`; the paper's defaults: configs/label.py).
"""

from __future__ import annotations

import json
import os
import re
import threading

import numpy as np

from configs.label import PROMPTS
from frameselect_jax import jsonl, synthetic
from frameselect_jax.text import question_with_options


class LabelError(RuntimeError):
  """An item that could not be labelled; the message is the reason the summary reports."""


# --- Reading frame indices out of a text LLM's answer ---


def parse_frame_indices(text: str, n: int) -> list[int]:
  """Sorted unique frame indices from an answer: the last JSON list in it, else ranges
  ("3-5", "3 to 5") and single numbers anywhere. Raises ValueError (the problem, in words)
  when no index is found or one is outside [0, n)."""
  found = None
  for match in reversed(re.findall(r"\[[^\[\]]*\]", text)):
    try:
      values = json.loads(match)
    except json.JSONDecodeError:
      continue
    if isinstance(values, list) and all(isinstance(v, (int, float)) for v in values):
      if values and all(float(v).is_integer() for v in values):
        found = [int(v) for v in values]
        break
  if found is None:
    found = []
    ranges = r"(\d+)\s*(?:-|–|to)\s*(\d+)"
    for a, b in re.findall(ranges, text):
      a, b = int(a), int(b)
      found += list(range(min(a, b), max(a, b) + 1))
    rest = re.sub(ranges, " ", text)
    found += [int(v) for v in re.findall(r"(?<![\d.])\d+(?![\d.])", rest)]
  if not found:
    raise ValueError("no frame index in it")
  outside = sorted({i for i in found if not 0 <= i < n})
  if outside:
    raise ValueError(f"indices {outside[:8]} are outside 0..{n - 1}")
  return sorted(set(found))


# --- The labellers ---


def question_text(item) -> str:
  return question_with_options(item.question, item.options)


class SpatialLabeler:
  def __init__(self, backend, prompt: str = PROMPTS["spatial"], max_tokens: int = 256):
    self.backend, self.prompt, self.max_tokens = backend, prompt, max_tokens

  def __call__(self, item, candidates, deadline=None) -> dict:
    valid = np.flatnonzero(candidates.valid)
    prompt = self.prompt.format(question=question_text(item))
    scores = np.zeros(len(candidates.valid), np.float32)
    scores[valid] = self.backend.true_probabilities(
      [candidates.frames[i] for i in valid], prompt, max_tokens=self.max_tokens, deadline=deadline
    )
    return {"spatial": scores}


class CaptionCache:
  """Captions per set of candidates (video, span, n), in a JSONL file next to the labels:
  shared by every question about those candidates, and by later runs."""

  def __init__(self, path: str | None):
    self.path, self.lock, self.captions = path, threading.Lock(), {}
    if path and os.path.exists(path):
      jsonl.drop_partial_line(path)
      for line in jsonl.read(path):
        self.captions[line["key"]] = line["captions"]

  def get(self, key):
    return self.captions.get(key)

  def put(self, key, captions):
    with self.lock:
      self.captions[key] = captions
      if self.path:
        jsonl.append(self.path, [{"key": key, "captions": captions}])


class TemporalLabeler:
  def __init__(
    self,
    captioner,
    text_llm,
    cache: CaptionCache,
    prompts: dict = PROMPTS,
    caption_tokens: int = 96,
    answer_tokens: int = 256,
  ):
    self.captioner, self.text_llm, self.cache, self.prompts = captioner, text_llm, cache, prompts
    self.caption_tokens, self.answer_tokens = caption_tokens, answer_tokens
    self.corrected = 0  # answers asked again

  def captions(self, item, candidates, deadline=None) -> list[str]:
    key = f"{item.video}|{item.span}|{len(candidates.valid)}"
    captions = self.cache.get(key)
    if captions is None:
      valid = np.flatnonzero(candidates.valid)
      texts = self.captioner.describe(
        [candidates.frames[i] for i in valid],
        self.prompts["caption"],
        max_tokens=self.caption_tokens,
        deadline=deadline,
      )
      captions = [""] * len(candidates.valid)
      for i, t in zip(valid, texts):
        captions[int(i)] = " ".join(t.split())
      self.cache.put(key, captions)
    return captions

  def __call__(self, item, candidates, deadline=None) -> dict:
    captions = self.captions(item, candidates, deadline)
    n = len(candidates.valid)
    listed = "\n".join(f"[{i}] {c}" for i, c in enumerate(captions) if candidates.valid[i])
    messages = [
      {
        "role": "user",
        "content": self.prompts["temporal"].format(
          n=int(candidates.valid.sum()), captions=listed, question=question_text(item)
        ),
      }
    ]
    answer = self.text_llm.chat(messages, max_tokens=self.answer_tokens, deadline=deadline)
    try:
      indices = parse_frame_indices(answer, n)
    except ValueError as problem:
      self.corrected += 1
      messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": self.prompts["corrective"].format(last=n - 1, problem=problem)},
      ]
      answer = self.text_llm.chat(messages, max_tokens=self.answer_tokens, deadline=deadline)
      try:
        indices = parse_frame_indices(answer, n)
      except ValueError as again:
        raise LabelError(f"temporal: the text LLM's answer, asked twice: {again}") from None
    temporal = np.zeros(n, np.float32)
    temporal[indices] = 1.0
    return {"temporal": temporal * candidates.valid, "temporal_indices": indices}


class OracleLabeler:
  """The needle benchmark's ground truth through the same interface: spatial is the truth
  plus Gaussian noise of std `spatial_noise` (clipped to [0, 1]), temporal the truth with
  each candidate flipped with probability `temporal_flip`. Seeded per item: reruns agree."""

  def __init__(self, spatial_noise: float = 0.0, temporal_flip: float = 0.0, seed: int = 0):
    self.spatial_noise, self.temporal_flip, self.seed = spatial_noise, temporal_flip, seed

  def __call__(self, item, candidates, deadline=None) -> dict:
    del deadline
    if "needle" not in item.extra:
      raise LabelError("oracle: the item has no ground truth (the needle benchmark has)")
    truth = synthetic.candidate_relevance(item.extra, candidates.frame_indices)
    rng = np.random.default_rng([self.seed, *item.qid.encode()])
    spatial = np.clip(truth + rng.normal(0, self.spatial_noise, truth.shape), 0, 1)
    flips = rng.random(truth.shape) < self.temporal_flip
    temporal = np.where(flips, 1 - truth, truth)
    valid = candidates.valid
    return {
      "spatial": (spatial * valid).astype(np.float32),
      "temporal": (temporal * valid).astype(np.float32),
    }


def combine(parts: dict, spatial_weight: float, temporal_weight: float) -> np.ndarray:
  """The combined label from whichever of spatial and temporal are present."""
  pairs = (("spatial", spatial_weight), ("temporal", temporal_weight))
  weighted = [(parts.get(k), w) for k, w in pairs]
  weighted = [(v, w) for v, w in weighted if v is not None and w > 0]
  total = sum(w for _, w in weighted)
  return (sum(v * w for v, w in weighted) / total).astype(np.float32)
