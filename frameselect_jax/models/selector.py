"""The frame selector: SigLIP, 3x3 pooling, projector, Qwen2.5 (+LoRA), score query, scores.

Two separable passes:
  encode_frames(frames)               question-independent pooled visual tokens (cacheable)
  score(visual_tokens, question_ids)  one LLM pass per question -> n candidate logits
Sequence layout per example: [n * g*g visual tokens | question tokens | score query | padding].
The query's hidden state is read after the penultimate block, so the last block never runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from frameselect_jax.models.layers import (
  Dense,
  RMSNorm,
  gelu_exact,
  normal_init,
  param,
  remat_policy_name,
)
from frameselect_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from frameselect_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel, adaptive_avg_pool

SCORE_HEADS = ("query_mlp", "frame_query", "token_query")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class SelectorConfig:
  vision: SiglipVisionConfig = SiglipVisionConfig()
  llm: Qwen2Config = Qwen2Config()
  num_candidates: int = 128  # n: frames scored per question
  pool_grid: int = 3  # g: each frame becomes g*g visual tokens
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat: str = "none"  # activation checkpointing of each block (layers.REMAT_POLICIES)
  # "query_mlp": the paper's head (the query's hidden state -> MLP -> n logits);
  # "frame_query": each frame's own hidden state scored against the query's, which reads
  # the question alone (see Selector.score); "token_query": the same head matching each of
  # a frame's g*g token states, the frame's match its best token's (a small object is then
  # not averaged away with the rest of the frame; FrameQueryHead).
  score_head: str = "query_mlp"

  @property
  def tokens_per_frame(self):
    return self.pool_grid**2

  @property
  def num_visual_tokens(self):
    return self.num_candidates * self.tokens_per_frame

  def validate(self):
    self.vision.validate()
    self.llm.validate()
    if self.pool_grid < 1 or self.pool_grid > self.vision.grid_size:
      raise ValueError(
        f"pool_grid {self.pool_grid} must be in [1, patch grid "
        f"{self.vision.grid_size}] (image {self.vision.image_size}, "
        f"patch {self.vision.patch_size})"
      )
    if self.num_candidates < 1:
      raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
    if self.llm.num_hidden_layers < 2:
      raise ValueError("the LLM needs at least 2 layers: scores are read after the penultimate one")
    remat_policy_name(self.remat)  # raises on an unknown policy
    if self.score_head not in SCORE_HEADS:
      raise ValueError(f"score_head {self.score_head!r} not in {SCORE_HEADS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
    return self


class Projector(nnx.Module):
  """g_a: two-layer MLP with GELU from the vision width to the LLM width."""

  def __init__(self, in_features, out_features, *, dtype, rngs):
    self.linear_1 = Dense(
      in_features, out_features, axes=("vision_embed", "embed"), dtype=dtype, rngs=rngs
    )
    self.linear_2 = Dense(
      out_features, out_features, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.linear_2(gelu_exact(self.linear_1(x)))


class ScoreHead(nnx.Module):
  """g_s: RMSNorm then a two-layer MLP from the query's hidden state to n logits.

  The norm is ours, not the paper's: penultimate Qwen hidden states are unnormalised and
  carry large outlier channels, so normalising keeps initial logits in a sane range.
  """

  def __init__(self, features, num_candidates, *, eps, dtype, rngs):
    self.norm = RMSNorm(features, eps=eps, dtype=dtype)
    self.linear_1 = Dense(features, features, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.linear_2 = Dense(features, num_candidates, axes=("embed", None), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(gelu_exact(self.linear_1(self.norm(x)))).astype(jnp.float32)


def _rms_normalize(x, eps):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class FrameQueryHead(nnx.Module):
  """Scores each frame's own hidden state against the query's: a scaled dot product of
  their projections, plus what the frame alone says (a linear term: how likely any frame
  like it is to matter), plus a bias.

  The query is centred first: its mean over the training questions is subtracted (the
  batch mean while training, a running mean of it at inference, as batch normalisation
  does), then RMS-normalised. Why: the query's state is mostly what every question shares
  (the score query itself, the prompt's template words); the part that tells questions
  apart can be a few percent of it. Left in, that shared part dominates the gradient of
  the query projection and the head learns to score frames without reading the question
  (measured: benchmarks/results_learning.md). Centred, the question's own content is all
  the projection sees.
  """

  def __init__(self, features, *, eps, dtype, rngs, momentum: float = 0.99):
    self.eps, self.momentum = eps, momentum
    self.frame_norm = RMSNorm(features, eps=eps, dtype=dtype)
    self.query_norm = RMSNorm(features, eps=eps, dtype=dtype)
    self.frame_proj = Dense(features, features, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.query_proj = Dense(features, features, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.frame_prior = param(normal_init(rngs, (features,)), ("embed",))
    self.bias = param(jnp.zeros(()), ())
    self.query_mean = param(jnp.zeros((features,)), ("embed",), kind=nnx.BatchStat)
    # nnx's Module.train() / .eval() switch this: batch statistics while training.
    self.use_running_average = True

  def __call__(self, frames, query):
    """frames (b, n, d): each frame's mean hidden state, or (b, n, t, d): each of its
    tokens' states; query (b, d) -> logits (b, n).

    With tokens, the match is each token's, and the frame takes its best token's: where in
    the frame the asked thing is. The frame-alone term reads the frame's mean state and
    stays outside that maximum, so it can put a frame below others whatever its tokens
    are (a card no question asks for below the background; inside the maximum a frame
    could not go below its own background tokens)."""
    q = _rms_normalize(query, self.eps)
    if self.use_running_average:
      mean = self.query_mean[...]
    else:
      mean = jnp.mean(q, axis=0)
      self.query_mean[...] = self.momentum * self.query_mean[...] + (
        1 - self.momentum
      ) * jax.lax.stop_gradient(mean)
    q = self.query_proj(self.query_norm(q - mean)).astype(jnp.float32)
    normed = self.frame_norm(frames)
    f = self.frame_proj(normed).astype(jnp.float32)
    match = jnp.einsum("b...d,bd->b...", f, q) / jnp.sqrt(f.shape[-1])
    if frames.ndim == 4:  # (b, n, t, d): the best token's match, the mean token's prior
      match = jnp.max(match, axis=2)
      normed = jnp.mean(normed, axis=2)
    prior = normed.astype(jnp.float32) @ self.frame_prior[...]
    return match + prior + self.bias[...]


class Selector(nnx.Module):
  def __init__(self, cfg: SelectorConfig, *, rngs: nnx.Rngs):
    self.config = cfg.validate()
    dtype = DTYPES[cfg.dtype]
    self.vision_tower = SiglipVisionModel(cfg.vision, dtype=dtype, remat=cfg.remat, rngs=rngs)
    self.projector = Projector(cfg.vision.hidden_size, cfg.llm.hidden_size, dtype=dtype, rngs=rngs)
    self.llm = Qwen2ForCausalLM(cfg.llm, dtype=dtype, remat=cfg.remat, rngs=rngs)
    self.score_query = param(normal_init(rngs, (cfg.llm.hidden_size,)), ("embed",))
    if cfg.score_head == "query_mlp":
      self.score_head = ScoreHead(
        cfg.llm.hidden_size, cfg.num_candidates, eps=cfg.llm.rms_norm_eps, dtype=dtype, rngs=rngs
      )
    else:
      self.score_head = FrameQueryHead(
        cfg.llm.hidden_size, eps=cfg.llm.rms_norm_eps, dtype=dtype, rngs=rngs
      )

  def encode_frames(self, frames):
    """frames (b, n, H, W, 3) normalised to [-1, 1] -> pooled tokens (b, n, g*g, vision width).

    Frames are folded into the batch for the ViT and unfolded after. The result depends
    only on the video: cache it and reuse it across questions and epochs.
    """
    b, n = frames.shape[:2]
    patches = self.vision_tower(frames.reshape((b * n,) + frames.shape[2:]))
    pooled = adaptive_avg_pool(patches, self.config.vision.grid_size, self.config.pool_grid)
    return pooled.reshape(b, n, self.config.tokens_per_frame, -1)

  def _visual_embeds(self, visual_tokens):
    b, n, t, _ = visual_tokens.shape
    if (n, t) != (self.config.num_candidates, self.config.tokens_per_frame):
      raise ValueError(
        f"expected visual tokens (batch, {self.config.num_candidates}, "
        f"{self.config.tokens_per_frame}, width), got {visual_tokens.shape}"
      )
    return self.projector(visual_tokens).reshape(b, n * t, -1)

  def score(self, visual_tokens, question_ids, question_mask, valid=None, attention=None):
    """Importance logits (b, n) of every candidate frame for each question.

    question_ids/question_mask (b, L) are right-padded (mask 1 on the question tokens, then
    0). valid (b, n) hides padding frames of short videos: their tokens are masked out of
    attention and their logits are -inf. Each example's scores do not depend on the
    padding of others in the batch. `attention` is the LLM's causal attention kernel (None:
    XLA's; see `models.attention`).
    """
    b, n = visual_tokens.shape[:2]
    valid = jnp.ones((b, n), bool) if valid is None else valid.astype(bool)
    visual = self._visual_embeds(visual_tokens)
    question = self.llm.embed(question_ids)
    num_visual = visual.shape[1]
    seq = jnp.concatenate(
      [visual, question.astype(visual.dtype), jnp.zeros((b, 1, visual.shape[-1]), visual.dtype)],
      axis=1,
    )
    query_pos = num_visual + jnp.sum(question_mask.astype(jnp.int32), axis=1)  # (b,)
    positions = jnp.arange(seq.shape[1])
    is_query = positions[None, :] == query_pos[:, None]
    seq = jnp.where(is_query[..., None], self.score_query[...].astype(seq.dtype), seq)
    visual_keep = jnp.repeat(valid, self.config.tokens_per_frame, axis=1)
    text_keep = positions[None, num_visual:] <= query_pos[:, None]
    attention_mask = jnp.concatenate([visual_keep, text_keep], axis=1)
    num_layers = self.config.llm.num_hidden_layers - 1
    if self.config.score_head == "query_mlp":
      # Only the query's hidden state is read: the last block computes its row alone.
      hidden, _ = self.llm.model(
        seq,
        attention_mask=attention_mask,
        num_layers=num_layers,
        output_rows=query_pos,
        attention=attention,
      )
      logits = self.score_head(hidden[:, 0])
    else:
      # The frames' states come from the visual tokens alone (causal: they never see the
      # text), the query's from the question alone: the query row does not attend to the
      # visual tokens. So the two are separate passes over the same positions as one
      # sequence would have, and the visual one does not depend on the question.
      frames, _ = self.llm.model(
        visual, attention_mask=visual_keep, num_layers=num_layers, attention=attention
      )
      text = seq[:, num_visual:]
      text_positions = jnp.broadcast_to(positions[num_visual:], (b, text.shape[1]))
      query, _ = self.llm.model(
        text,
        attention_mask=text_keep,
        position_ids=text_positions,
        num_layers=num_layers,
        output_rows=query_pos - num_visual,
        attention=attention,
      )
      frames = frames.reshape(b, n, self.config.tokens_per_frame, -1).astype(jnp.float32)
      if self.config.score_head == "frame_query":
        frames = jnp.mean(frames, axis=2)
      logits = self.score_head(frames, query[:, 0])
    return jnp.where(valid, logits, -jnp.inf)

  def instruction_logits(
    self, visual_tokens, input_ids, attention_mask, valid=None, attention=None
  ):
    """Stage-1 visual instruction following: next-token logits (b, L, vocab) over the text
    positions of [visual tokens | text], through every block and the language-model head."""
    b, n = visual_tokens.shape[:2]
    valid = jnp.ones((b, n), bool) if valid is None else valid.astype(bool)
    visual = self._visual_embeds(visual_tokens)
    text = self.llm.embed(input_ids).astype(visual.dtype)
    mask = jnp.concatenate(
      [jnp.repeat(valid, self.config.tokens_per_frame, axis=1), attention_mask.astype(bool)], axis=1
    )
    hidden, _ = self.llm.model(
      jnp.concatenate([visual, text], axis=1), attention_mask=mask, attention=attention
    )
    return self.llm.logits(hidden[:, visual.shape[1] :]).astype(jnp.float32)

  def __call__(self, frames, question_ids, question_mask, valid=None):
    return self.score(self.encode_frames(frames), question_ids, question_mask, valid)
