"""Inference: load a selector, then pick the k frames of a video that help answer a question.

  selector = FrameSelector.from_checkpoint("workdirs/stage2-1.5b-9tok")   # trained
  selector = FrameSelector.from_hf(llm_dir, vision_dir)                 # untrained head
  selector = FrameSelector.random()                                     # tiny, random, anywhere
  result = selector.select("video.mp4", "What does the man pick up?", k=8)
  result.indices, result.timestamps, result.scores                     # k, k, n

One video goes through decode -> SigLIP -> 3x3 pooling once; those pooled visual tokens sit
in an LRU cache keyed by what they are computed from: the file (path, mtime, size), n, the
span of a bounded question, the image size and the decoder; so every further question about
the same candidates costs one LLM pass only. `select_many` batches the
questions and groups them by video, so each video is encoded once per call whatever the
cache size.

The model runs as `jax.jit` functions over the split NNX state (graphdef static): they
compile once per input shape and are shared by every FrameSelector with the same graphdef.
Question prompts are padded to a multiple of QUESTION_BUCKET tokens so few shapes occur.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from frameselect_jax import errors, experiment, hf, selection, text, video
from frameselect_jax.models.selector import Selector, SelectorConfig

# Prompts are right-padded to a multiple of this many tokens (fewer compiled shapes).
QUESTION_BUCKET = 64
# Videos whose pooled visual tokens are kept (128 x 9 x 1152 floats: about 5 MB each).
DEFAULT_CACHE_SIZE = 64


# --- jitted passes, shared by all selectors with the same graphdef ---


def _encode_impl(graphdef, state, frames_uint8):
  model = nnx.merge(graphdef, state)
  return model.encode_frames(video.normalize(frames_uint8))


def _score_impl(graphdef, state, visual_tokens, question_ids, question_mask, valid):
  model = nnx.merge(graphdef, state)
  return model.score(visual_tokens, question_ids, question_mask, valid)


_encode = jax.jit(_encode_impl, static_argnums=0)
_score = jax.jit(_score_impl, static_argnums=0)


# --- results ---


@dataclasses.dataclass(frozen=True)
class Selection:
  """The frames chosen for one (video, question).

  indices:      int[k'] chosen candidate indices, ascending and unique (k' = k unless the
                video has fewer than k decodable candidates).
  timestamps:   float[k'] their times in seconds.
  frame_indices int[k'] their source frame numbers in the video file.
  scores:       float32[n] importance logits of all candidates (-inf on padding).
  valid:        bool[n] False on padding candidates of a short video.
  candidate_timestamps: float32[n] times of all candidates (-1 on padding).
  candidate_frame_indices: int[n] source frame numbers of all candidates (-1 on padding).
  """

  video: str
  question: str
  options: tuple[str, ...]
  strategy: str
  k: int
  n: int
  indices: np.ndarray
  timestamps: np.ndarray
  frame_indices: np.ndarray
  scores: np.ndarray
  valid: np.ndarray
  candidate_timestamps: np.ndarray
  candidate_frame_indices: np.ndarray
  duration: float

  @property
  def probabilities(self) -> np.ndarray:
    """sigmoid(scores): the model's P(frame helps answer), 0 on padding."""
    with np.errstate(over="ignore"):
      return np.where(self.valid, 1.0 / (1.0 + np.exp(-self.scores.astype(np.float64))), 0.0)

  def to_json(self, qid: str | None = None, video_id: str | None = None) -> dict:
    """The selection-file record (`frameselect_jax.selection_file` documents the schema);
    scores are null on padding candidates, so the line is strict JSON.

    video_id defaults to the file name without extension; qid to video_id plus a short
    hash of the question and options.
    """
    video_id = video_id or os.path.splitext(os.path.basename(self.video))[0]
    if qid is None:
      digest = hashlib.sha1(json.dumps([self.question, list(self.options)]).encode())
      qid = f"{video_id}:{digest.hexdigest()[:10]}"
    return {
      "qid": qid,
      "video_id": video_id,
      "strategy": self.strategy,
      "n": self.n,
      "k": self.k,
      "indices": [int(i) for i in self.indices],
      "timestamps": [round(float(t), 6) for t in self.timestamps],
      "scores": [
        float(s) if ok and math.isfinite(s) else None
        for s, ok in zip(self.scores.tolist(), self.valid.tolist())
      ],
    }


# --- the selector ---


class VideoTokens(
  collections.namedtuple("VideoTokens", "tokens timestamps valid frame_indices duration")
):
  """A cache entry: pooled visual tokens (1, n, g*g, D) and the candidates' metadata."""


class FrameSelector:
  """A Selector ready for inference: model, tokenizer, candidate geometry, token cache.

  Usually built by `random`, `from_hf` or `from_checkpoint`; directly, it takes any
  Selector and a tokenizer (`encode(text, add_special_tokens=False) -> ids`). description
  and trained say where the weights come from (printed by the command). backend picks the
  video decoder; cache_size is how many videos' visual tokens are kept.
  """

  def __init__(
    self,
    model: Selector,
    tokenizer,
    *,
    description: str,
    trained: bool,
    backend: str = "auto",
    cache_size: int = DEFAULT_CACHE_SIZE,
  ):
    self.config: SelectorConfig = model.config
    self.graphdef, self.state = nnx.split(model)
    self.tokenizer = tokenizer
    self.description = description
    self.trained = trained
    self.backend = backend
    self.cache_size = cache_size
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self.encode_calls = 0  # how many videos went through the vision tower

  @property
  def num_candidates(self) -> int:
    return self.config.num_candidates

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  def __repr__(self):
    return (
      f"FrameSelector({self.description}, n={self.num_candidates}, "
      f"image_size={self.image_size}, trained={self.trained})"
    )

  # --- constructors ---

  @classmethod
  def random(
    cls,
    llm: str = "tiny",
    vision: str = "tiny",
    *,
    num_candidates: int = 128,
    pool_grid: int = 3,
    dtype: str = "float32",
    seed: int = 0,
    **kwargs,
  ):
    """Random weights from preset names (`models.presets`), with the byte
    tokenizer. The scores mean nothing: for demos, tests and benchmarks."""
    cfg = experiment.selector_config(
      dict(llm=llm, vision=vision, num_candidates=num_candidates, pool_grid=pool_grid, dtype=dtype)
    )
    model = Selector(cfg, rngs=nnx.Rngs(seed))
    return cls(
      model,
      text.ByteTokenizer(),
      description=f"random {llm}/{vision} preset (untrained: scores are random)",
      trained=False,
      **kwargs,
    )

  @classmethod
  def from_hf(
    cls,
    llm_dir: str,
    vision_dir: str,
    *,
    num_candidates: int = 128,
    pool_grid: int = 3,
    dtype: str = "float32",
    tokenizer=None,
    seed: int = 0,
    **kwargs,
  ):
    """Qwen2.5 and SigLIP from local Hugging Face directories; the projector, score query
    and score head are freshly initialised, so the scores are untrained.

    tokenizer: None loads it from llm_dir; "byte" uses the byte tokenizer; another string
    is a tokenizer directory; anything else is used as the tokenizer.
    """
    cfg = experiment.selector_config(
      dict(
        llm_dir=llm_dir,
        vision_dir=vision_dir,
        num_candidates=num_candidates,
        pool_grid=pool_grid,
        dtype=dtype,
      )
    )
    model = hf.selector_from_hf(cfg, llm_dir, vision_dir, seed=seed)
    return cls(
      model,
      _tokenizer(tokenizer, llm_dir),
      description=f"Hugging Face {llm_dir} + {vision_dir} (untrained head: scores are random)",
      trained=False,
      **kwargs,
    )

  @classmethod
  def from_checkpoint(
    cls,
    directory: str,
    *,
    step: int | None = None,
    llm_dir: str | None = None,
    vision_dir: str | None = None,
    tokenizer=None,
    dtype: str | None = None,
    **kwargs,
  ):
    """A trained selector from a training run's orbax checkpoint.

    directory: the run's workdir or its checkpoints/ folder. The checkpoint's meta holds
    the training config, which rebuilds the model: the frozen backbone comes from the Hugging
    Face directories it names (llm_dir/vision_dir override them, e.g. on another machine)
    or, for random presets, from the same seed; the trained parameters (heads, LoRA) come
    from the checkpoint. dtype overrides the compute dtype (e.g. "float32" on CPU).

    Raises FileNotFoundError (no such directory, no checkpoint in it, backbone directory
    missing) or ValueError (not a frameselect checkpoint, or one that does not match the
    model its config describes), naming the directory.
    """
    from frameselect_jax import checkpoint as ckpt  # orbax only when needed

    ckpt_dir, step = _find_checkpoint(directory, step)
    try:
      meta = ckpt.read_meta(ckpt_dir, step)
    except Exception as error:
      raise ValueError(
        f"{ckpt_dir}: step {step} has no readable meta item, so it is not a "
        f"frameselect training checkpoint ({errors.one_line(error, 300)})"
      ) from error
    config = ml_collections.ConfigDict(_config_from_meta(meta, ckpt_dir))
    m = config.model
    m.llm_dir = llm_dir or m.get("llm_dir") or ""
    m.vision_dir = vision_dir or m.get("vision_dir") or ""
    m.dtype = dtype or m.dtype
    if bool(m.llm_dir) != bool(m.vision_dir):
      raise ValueError(f"{ckpt_dir}: the config names only one of llm_dir/vision_dir")
    try:
      model = experiment.build_model(config)
    except FileNotFoundError as error:
      raise FileNotFoundError(
        f"{ckpt_dir}: its frozen backbone comes from {m.llm_dir} and {m.vision_dir}, which "
        f"cannot be read here ({error}); pass llm_dir=/vision_dir= (--llm/--vision) to "
        "say where they are on this machine"
      ) from error
    source = (
      f"{m.llm_dir} + {m.vision_dir}"
      if m.llm_dir
      else f"random {m.llm}/{m.vision} backbone, seed {config.seed}"
    )
    # The trained part, as the trainer split it: the named top-level modules, plus LoRA.
    graphdef, params, frozen = nnx.split(model, experiment.trainable_filter(config), ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(params)
    )
    try:
      restored, _ = ckpt.restore_params(ckpt_dir, abstract, step)
    except ckpt.DamagedCheckpointError:
      raise
    except Exception as error:
      raise ValueError(
        f"{ckpt_dir}: step {step} does not match the model its config "
        f"describes ({errors.one_line(error, 300)})"
      ) from error
    params = nnx.State(restored)
    # Training kept the frozen backbone in model.frozen_dtype: use the same weights.
    cast = experiment.frozen_dtype(m.get("frozen_dtype", "float32"))
    frozen = nnx.to_pure_dict(jax.tree.map(lambda x: x.astype(cast(x)), frozen))
    # A backbone stage 1 trained from scratch, frozen in stage 2, travels in `inherited`.
    inherited = ckpt.saved_tree(ckpt_dir, step, "inherited")
    if inherited:
      wanted = {k: frozen[k] for k in inherited if k in frozen}
      abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), wanted
      )
      restored_frozen, _ = ckpt.restore_params(ckpt_dir, abstract, step, item="inherited")
      frozen = {**frozen, **restored_frozen}
    model = nnx.merge(graphdef, params, nnx.State(frozen))
    return cls(
      model,
      _tokenizer(tokenizer or _config_tokenizer(config), m.llm_dir or None),
      description=f"checkpoint {ckpt_dir} step {step} (stage {config['stage']}, {source})",
      trained=True,
      **kwargs,
    )

  # --- the two passes ---

  def clear_cache(self):
    """Forgets every cached video (the next question about each re-encodes it)."""
    self._cache.clear()

  def visual_tokens(
    self, path: str, n: int | None = None, span=None, frame_rate: float | None = None
  ) -> VideoTokens:
    """Decoded, encoded and pooled candidates of a video (of the frames shown in span =
    (start_s, end_s), when given), from the cache when they were computed from the same
    candidates: the same file unchanged (path, mtime and size), n, span, image size and
    decoder. The model's weights never change under a FrameSelector, so they are not in the
    key. frame_rate: for a folder of frames (`video.decode_candidates`)."""
    n = self._check_n(n)
    span = video.check_span(span)
    path = os.path.abspath(os.fspath(path))
    try:
      stat = os.stat(path)
    except FileNotFoundError:
      raise video.VideoError(f"{path}: no such file") from None
    key = (path, stat.st_mtime_ns, stat.st_size, n, span, frame_rate, self.image_size, self.backend)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    candidates = video.decode_candidates(
      path, n=n, size=self.image_size, backend=self.backend, span=span, frame_rate=frame_rate
    )
    tokens = _encode(self.graphdef, self.state, candidates.frames[None])
    self.encode_calls += 1
    entry = VideoTokens(
      tokens, candidates.timestamps, candidates.valid, candidates.frame_indices, candidates.duration
    )
    self._cache[key] = entry
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    return entry

  def score(self, entries: Sequence[VideoTokens], prompts: Sequence[str]) -> np.ndarray:
    """Logits float32[len(prompts), n]; -inf on padding candidates."""
    lengths = [len(self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    max_length = QUESTION_BUCKET * max(1, math.ceil(max(lengths) / QUESTION_BUCKET))
    ids, mask = text.tokenize_questions(
      self.tokenizer, prompts, max_length, vocab_size=self.config.llm.vocab_size
    )
    tokens = jnp.concatenate([e.tokens for e in entries], axis=0)
    valid = np.stack([e.valid for e in entries])
    return np.asarray(_score(self.graphdef, self.state, tokens, ids, mask, valid))

  # --- selection ---

  def select(
    self,
    video_path: str,
    question: str,
    k: int = 8,
    n: int | None = None,
    strategy: str = "nms_greedy",
    options: Sequence[str] = (),
    span: tuple[float, float] | None = None,
  ) -> Selection:
    """The k frames of a video that best help answer the question.

    n is the number of candidates (None: the model's; another value is an error, since
    the score head has one output per candidate). span = (start_s, end_s) bounds the
    question to the frames shown in [start_s, end_s): the candidates are spread over it.
    """
    return self.select_many(
      [(video_path, question, options, span)], k=k, n=n, strategy=strategy, batch_size=1
    )[0]

  def select_many(
    self,
    pairs: Iterable[Sequence],
    k: int = 8,
    n: int | None = None,
    strategy: str = "nms_greedy",
    batch_size: int = 8,
    progress: bool = False,
  ) -> list[Selection]:
    """`select` for many (video, question), (video, question, options) or
    (video, question, options, span) tuples.

    Questions are scored batch_size at a time (the last batch is padded, so one compiled
    shape serves all). Pairs are processed grouped by video, so each video is decoded and
    encoded once in this call (and not at all when still cached). Results come back in
    the order of `pairs`.
    """
    n = self._check_n(n)
    if strategy not in selection.STRATEGIES:
      raise ValueError(f"unknown strategy {strategy!r}; choose one of {selection.STRATEGIES}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
      raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = [_pair(p) for p in pairs]
    if not items:
      return []
    # Group by video (in order of first appearance) so each is encoded once.
    first_seen = {}  # (video, span) -> rank
    for path, _, _, span in items:
      first_seen.setdefault((path, span), len(first_seen))
    order = sorted(range(len(items)), key=lambda i: first_seen[items[i][0], items[i][3]])
    results: list[Selection | None] = [None] * len(items)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
      from tqdm import tqdm

      batches = tqdm(batches, desc="selecting", unit="batch")
    for batch in batches:
      entries = [self.visual_tokens(items[i][0], n, span=items[i][3]) for i in batch]
      prompts = [text.question_prompt(items[i][1], items[i][2]) for i in batch]
      padding = batch_size - len(batch)  # repeat the first row: one shape for every batch
      scores = self.score(entries + [entries[0]] * padding, prompts + [prompts[0]] * padding)
      valid = np.stack([e.valid for e in entries] + [entries[0].valid] * padding)
      picks = np.asarray(selection.select_batch(strategy, scores, valid, k))
      for row, i in enumerate(batch):
        entry, chosen = entries[row], picks[row][picks[row] >= 0]
        path, question, options, _ = items[i]
        results[i] = Selection(
          video=path,
          question=question,
          options=tuple(options),
          strategy=strategy,
          k=k,
          n=n,
          indices=chosen,
          timestamps=entry.timestamps[chosen].astype(np.float64),
          frame_indices=entry.frame_indices[chosen],
          scores=scores[row],
          valid=entry.valid,
          candidate_timestamps=entry.timestamps,
          candidate_frame_indices=entry.frame_indices,
          duration=entry.duration,
        )
    return results

  def _check_n(self, n):
    if n is None:
      return self.num_candidates
    if n != self.num_candidates:
      raise ValueError(
        f"this selector scores n={self.num_candidates} candidates per video "
        f"(its score head has one output each), not n={n}"
      )
    return n


# --- helpers ---


def _pair(item) -> tuple[str, str, tuple[str, ...], tuple[float, float] | None]:
  if isinstance(item, str) or not 2 <= len(item) <= 4:
    raise ValueError(
      f"expected (video, question), (video, question, options) or "
      f"(video, question, options, span), got {item!r}"
    )
  path, question = os.path.abspath(os.fspath(item[0])), item[1]
  options = tuple(item[2]) if len(item) >= 3 and item[2] else ()
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"empty question for {path}")
  span = video.check_span(item[3]) if len(item) == 4 else None
  return path, question, options, span


def _tokenizer(spec, llm_dir: str | None):
  builtin = text.builtin_tokenizer(spec) if isinstance(spec, str) else None
  if builtin is not None:
    return builtin
  if spec is None or isinstance(spec, str):
    directory = spec or llm_dir
    if not directory:
      raise ValueError("no tokenizer: pass tokenizer='byte' or a tokenizer directory")
    try:
      tokenizer = hf.load_tokenizer(directory)
    except FileNotFoundError:
      raise
    except Exception as error:
      raise ValueError(
        f"cannot load a tokenizer from {directory!r} ({errors.one_line(error, 300)}); pass "
        "tokenizer=<directory> (or 'byte' for random tiny models)"
      ) from error
    return tokenizer
  return spec


def _config_tokenizer(config: dict):
  return config.get("data", {}).get("tokenizer") or None


def _find_checkpoint(directory: str, step: int | None) -> tuple[str, int]:
  """(folder holding the numbered steps, step) for a workdir or its checkpoints/ folder."""
  from frameselect_jax import checkpoint as ckpt

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  for candidate in (directory, os.path.join(directory, "checkpoints")):
    latest = ckpt.latest_step(candidate)
    if latest is not None:
      if step is None:
        return os.path.abspath(candidate), latest
      if os.path.isdir(os.path.join(candidate, str(step))):
        return os.path.abspath(candidate), step
      raise FileNotFoundError(
        f"{candidate!r} has no checkpoint for step {step} (latest is {latest})"
      )
  raise FileNotFoundError(
    f"{directory!r} holds no checkpoint: expected numbered step "
    "folders in it or in its checkpoints/ subfolder (a training run's "
    "workdir)"
  )


def _config_from_meta(meta, where: str) -> dict:
  config = meta.get("config") if isinstance(meta, dict) else None
  if isinstance(config, str):
    try:
      config = json.loads(config)
    except json.JSONDecodeError as error:
      raise ValueError(f"{where}: the checkpoint's config is not valid JSON ({error})") from error
  if not isinstance(config, dict):
    raise ValueError(
      f"{where}: the checkpoint's meta has no training config, so the model "
      "cannot be rebuilt from it"
    )
  missing = [key for key in ("model", "stage", "seed", "train") if key not in config]
  model_keys = ("llm", "vision", "num_candidates", "pool_grid", "dtype")
  missing += [f"model.{key}" for key in model_keys if key not in config.get("model", {})]
  if config.get("stage") == 2 and "lora" not in config:
    missing.append("lora")
  if missing:
    raise ValueError(
      f"{where}: the checkpoint's config lacks {missing}; it was not written "
      "by this project's trainer, or by an incompatible version"
    )
  return config
