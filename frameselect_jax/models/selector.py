"""The frame selector: SigLIP -> 3x3 pooling -> projector -> Qwen2.5 (+LoRA) -> score query -> scores.

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

from frameselect_jax.models.layers import Dense, RMSNorm, gelu_exact, normal_init, param, take_rows
from frameselect_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from frameselect_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel, adaptive_avg_pool

SCORE_HEADS = ("query_mlp", "frame_query")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class SelectorConfig:
  vision: SiglipVisionConfig = SiglipVisionConfig()
  llm: Qwen2Config = Qwen2Config()
  num_candidates: int = 128   # n: frames scored per question
  pool_grid: int = 3          # g: each frame becomes g*g visual tokens
  dtype: str = "float32"      # compute dtype; parameters are always float32
  remat: bool = False         # jax.checkpoint each transformer block
  # "query_mlp": the paper's head (the query's hidden state -> MLP -> n logits);
  # "frame_query": each frame's own hidden state scored against the query's.
  score_head: str = "query_mlp"

  @property
  def tokens_per_frame(self):
    return self.pool_grid ** 2

  @property
  def num_visual_tokens(self):
    return self.num_candidates * self.tokens_per_frame

  def validate(self):
    self.vision.validate()
    self.llm.validate()
    if self.pool_grid < 1 or self.pool_grid > self.vision.grid_size:
      raise ValueError(f"pool_grid {self.pool_grid} must be in [1, patch grid "
                       f"{self.vision.grid_size}] (image {self.vision.image_size}, "
                       f"patch {self.vision.patch_size})")
    if self.num_candidates < 1:
      raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
    if self.llm.num_hidden_layers < 2:
      raise ValueError("the LLM needs at least 2 layers: scores are read after the penultimate one")
    if self.score_head not in SCORE_HEADS:
      raise ValueError(f"score_head {self.score_head!r} not in {SCORE_HEADS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
    return self


class Projector(nnx.Module):
  """g_a: two-layer MLP with GELU from the vision width to the LLM width."""

  def __init__(self, in_features, out_features, *, dtype, rngs):
    self.linear_1 = Dense(in_features, out_features, axes=("vision_embed", "embed"),
                          dtype=dtype, rngs=rngs)
    self.linear_2 = Dense(out_features, out_features, axes=("embed", "embed_out"),
                          dtype=dtype, rngs=rngs)

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


class FrameQueryHead(nnx.Module):
  """Scores each frame's own hidden state against the query's (scaled dot product)."""

  def __init__(self, features, *, eps, dtype, rngs):
    self.norm = RMSNorm(features, eps=eps, dtype=dtype)
    self.frame_proj = Dense(features, features, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.query_proj = Dense(features, features, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.bias = param(jnp.zeros(()), ())

  def __call__(self, frames, query):
    """frames (b, n, d): mean hidden state of each frame's tokens; query (b, d)."""
    f = self.frame_proj(self.norm(frames)).astype(jnp.float32)
    q = self.query_proj(self.norm(query)).astype(jnp.float32)
    return jnp.einsum("bnd,bd->bn", f, q) / jnp.sqrt(f.shape[-1]) + self.bias[...]


class Selector(nnx.Module):

  def __init__(self, cfg: SelectorConfig, *, rngs: nnx.Rngs):
    self.config = cfg.validate()
    dtype = DTYPES[cfg.dtype]
    self.vision_tower = SiglipVisionModel(cfg.vision, dtype=dtype, remat=cfg.remat, rngs=rngs)
    self.projector = Projector(cfg.vision.hidden_size, cfg.llm.hidden_size, dtype=dtype, rngs=rngs)
    self.llm = Qwen2ForCausalLM(cfg.llm, dtype=dtype, remat=cfg.remat, rngs=rngs)
    self.score_query = param(normal_init(rngs, (cfg.llm.hidden_size,)), ("embed",))
    if cfg.score_head == "query_mlp":
      self.score_head = ScoreHead(cfg.llm.hidden_size, cfg.num_candidates,
                                  eps=cfg.llm.rms_norm_eps, dtype=dtype, rngs=rngs)
    else:
      self.score_head = FrameQueryHead(cfg.llm.hidden_size, eps=cfg.llm.rms_norm_eps,
                                       dtype=dtype, rngs=rngs)

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
      raise ValueError(f"expected visual tokens (batch, {self.config.num_candidates}, "
                       f"{self.config.tokens_per_frame}, width), got {visual_tokens.shape}")
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
    num_visual, length = visual.shape[1], question.shape[1]
    seq = jnp.concatenate([visual, question.astype(visual.dtype),
                           jnp.zeros((b, 1, visual.shape[-1]), visual.dtype)], axis=1)
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
      hidden, _ = self.llm.model(seq, attention_mask=attention_mask, num_layers=num_layers,
                                 output_rows=query_pos, attention=attention)
      logits = self.score_head(hidden[:, 0])
    else:
      hidden, _ = self.llm.model(seq, attention_mask=attention_mask, num_layers=num_layers,
                                 attention=attention)
      frames = hidden[:, :num_visual].reshape(b, n, self.config.tokens_per_frame, -1)
      query = take_rows(hidden, query_pos)[:, 0]
      logits = self.score_head(jnp.mean(frames.astype(jnp.float32), axis=2), query)
    return jnp.where(valid, logits, -jnp.inf)

  def instruction_logits(self, visual_tokens, input_ids, attention_mask, valid=None,
                         attention=None):
    """Stage-1 visual instruction following: next-token logits (b, L, vocab) over the text
    positions of [visual tokens | text], through every block and the language-model head."""
    b, n = visual_tokens.shape[:2]
    valid = jnp.ones((b, n), bool) if valid is None else valid.astype(bool)
    visual = self._visual_embeds(visual_tokens)
    text = self.llm.embed(input_ids).astype(visual.dtype)
    mask = jnp.concatenate([jnp.repeat(valid, self.config.tokens_per_frame, axis=1),
                            attention_mask.astype(bool)], axis=1)
    hidden, _ = self.llm.model(jnp.concatenate([visual, text], axis=1), attention_mask=mask,
                               attention=attention)
    return self.llm.logits(hidden[:, visual.shape[1]:]).astype(jnp.float32)

  def __call__(self, frames, question_ids, question_mask, valid=None):
    return self.score(self.encode_frames(frames), question_ids, question_mask, valid)
