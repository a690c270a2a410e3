"""SigLIP question-frame similarity: the score the training-free peers (BOLT, AKS, top-k of
similarity) select from.

`SiglipScorer(directory)` loads a Hugging Face SiglipModel directory (both towers, the
pooling head, logit_scale and logit_bias; `hf.load_siglip_model`) and its tokenizer. For a
set of candidates and a query it gives each valid candidate SigLIP's logit
(exp(logit_scale) * cos(image, text) + logit_bias), -inf on padding. A video's frame
embeddings are computed once per set of candidates and kept (an LRU keyed by the caller's
key and the frames' shape), like the selector's visual tokens: every further question about
the same candidates costs one text-tower pass.
"""

from __future__ import annotations

import collections
import hashlib

import jax
import numpy as np
from flax import nnx

from frameselect_jax import hf, video


class SiglipScorer:
  def __init__(self, directory: str, *, batch_size: int = 32, cache_size: int = 64):
    self.model = hf.load_siglip_model(directory)
    self.tokenizer = hf.load_tokenizer(directory)
    self.graphdef, self.state = nnx.split(self.model)
    config = hf.siglip_model_config(directory)
    self.image_size = config.vision.image_size
    self.max_length = config.text.max_position_embeddings
    self.width = config.text.projection_size
    self.batch_size, self.cache_size = batch_size, cache_size
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self.image_calls = 0

    @jax.jit
    def images(state, pixels):
      return nnx.merge(self.graphdef, state).image_embeds(pixels)

    @jax.jit
    def texts(state, ids):
      return nnx.merge(self.graphdef, state).text_embeds(ids)

    @jax.jit
    def logits(state, image_embeds, text_embeds):
      return nnx.merge(self.graphdef, state).logits(image_embeds, text_embeds)

    self._images, self._texts, self._logits = images, texts, logits

  def frame_embeddings(self, frames, valid, key=None) -> np.ndarray:
    """float32[n, D] image embeddings of the candidates (zeros on padding), cached by key (a
    hash of the frames when None)."""
    frames = np.asarray(frames, np.uint8)
    if key is None:
      key = hashlib.sha256(frames.tobytes()).hexdigest()
    key = (key, frames.shape)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    resized = _resize(frames, self.image_size)
    out = np.zeros((len(frames), self.width), np.float32)
    chosen = np.flatnonzero(np.asarray(valid, bool))
    for start in range(0, len(chosen), self.batch_size):
      rows = chosen[start : start + self.batch_size]
      batch = resized[rows]
      if len(rows) < self.batch_size:  # one compiled shape: pad the last batch
        batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_size - len(rows), 0)])
      embeds = self._images(self.state, video.normalize(batch))
      out[rows] = np.asarray(embeds)[: len(rows)]
    self.image_calls += 1
    self._cache[key] = out
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    return out

  def scores(self, frames, valid, query: str, key=None) -> np.ndarray:
    """float32[n]: SigLIP's logit of each valid candidate against the query; -inf on padding."""
    valid = np.asarray(valid, bool)
    images = self.frame_embeddings(frames, valid, key)
    ids = hf.siglip_text_ids(self.tokenizer, [query], self.max_length)
    text = self._texts(self.state, ids)
    logits = np.asarray(self._logits(self.state, images, text))[:, 0]
    return np.where(valid, logits, -np.inf).astype(np.float32)


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
  """uint8[n, H, W, 3] -> uint8[n, size, size, 3] (bicubic, SigLIP's processor squashes too)."""
  if frames.shape[1:3] == (size, size):
    return frames
  from PIL import Image

  return np.stack(
    [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames]
  )
