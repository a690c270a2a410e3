"""From an experiment config to the Selector it trains: the one way, for the trainer, the AOT
compiler and the inference API (which rebuilds a trained model from the config stored in its
checkpoint).

`config` is the ml_collections ConfigDict of configs/ (or one made from the dict a checkpoint
stores): model.{llm, vision, llm_dir, vision_dir, num_candidates, pool_grid, dtype,
frozen_dtype, remat, score_head}, stage, seed, lora.{pattern, rank, alpha}, train.trainable.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from frameselect_jax import hf
from frameselect_jax.models import presets
from frameselect_jax.models.layers import add_lora, remat_policy_name
from frameselect_jax.models.selector import DTYPES, Selector, SelectorConfig

TOP_LEVEL = ("vision_tower", "projector", "llm", "score_query", "score_head")
MODEL_DEFAULTS = {
  "llm": "tiny",
  "vision": "tiny",
  "llm_dir": "",
  "vision_dir": "",
  "num_candidates": 128,
  "pool_grid": 3,
  "dtype": "float32",
  "remat": "none",
  "score_head": "query_mlp",
}
# Also in the model section, used elsewhere (storage of the frozen weights, the kernel).
MODEL_OTHER = ("frozen_dtype", "attention")


def selector_config(model) -> SelectorConfig:
  """The SelectorConfig of a config's `model` section (a ConfigDict or a plain dict; missing
  keys take MODEL_DEFAULTS): the backbones' shapes come from the Hugging Face directories'
  config.json when model.llm_dir/vision_dir are set, else from the named presets."""
  unknown = sorted(set(model) - set(MODEL_DEFAULTS) - set(MODEL_OTHER))
  if unknown:
    raise ValueError(f"unknown model fields {unknown}; known: {sorted(MODEL_DEFAULTS)}")
  m = {**MODEL_DEFAULTS, **{k: model[k] for k in model if k in MODEL_DEFAULTS}}
  if m["llm_dir"] or m["vision_dir"]:
    if not (m["llm_dir"] and m["vision_dir"]):
      raise ValueError("set both model.llm_dir and model.vision_dir, or neither")
    llm, vision = hf.qwen2_config(m["llm_dir"]), hf.siglip_config(m["vision_dir"])
  else:
    llm = presets.preset(presets.QWEN2, m["llm"])
    vision = presets.preset(presets.SIGLIP, m["vision"])
  return SelectorConfig(
    vision=vision,
    llm=llm,
    num_candidates=m["num_candidates"],
    pool_grid=m["pool_grid"],
    dtype=m["dtype"],
    remat=remat_policy_name(m["remat"]),
    score_head=m["score_head"],
  ).validate()


def frozen_dtype(name: str):
  """x -> the dtype a frozen array is stored in: floating arrays take `name`
  (model.frozen_dtype), others keep theirs. Training and inference use the same weights."""
  target = DTYPES[name]
  return lambda x: target if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype


def trainable_filter(config):
  """What the trainer trains (and checkpoints as `params`): the parameters of the top-level
  modules train.trainable names, with their running statistics (the frame head's query
  mean), and in stage 2 the LoRA adapters."""
  unknown = sorted(set(config.train.trainable) - set(TOP_LEVEL))
  if unknown:
    raise ValueError(f"train.trainable names unknown modules {unknown}; known: {TOP_LEVEL}")
  heads = tuple(config.train.trainable)
  is_head = lambda path, _: path[0] in heads
  only_heads = nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), is_head)
  return nnx.Any(only_heads, nnx.LoRAParam) if config.stage == 2 else only_heads


def add_adapters(model: Selector, config) -> Selector:
  if config.stage == 2:
    add_lora(
      model.llm,
      config.lora.pattern,
      rank=config.lora.rank,
      alpha=config.lora.alpha,
      rngs=nnx.Rngs(config.seed + 1),
    )
  return model


def build_model(config, mesh=None) -> Selector:
  """A concrete Selector: Hugging Face weights when model.llm_dir/vision_dir are set, else a
  random init from the presets (identical on every process: same seed)."""
  m = config.model
  cfg = selector_config(m)
  if m.llm_dir:
    model = hf.selector_from_hf(cfg, m.llm_dir, m.vision_dir, mesh=mesh, seed=config.seed)
  else:
    model = Selector(cfg, rngs=nnx.Rngs(config.seed))
  return add_adapters(model, config)


def abstract_model(config) -> Selector:
  """Shapes only (no memory): for ahead-of-time compilation."""
  cfg = selector_config(config.model)
  return nnx.eval_shape(lambda: add_adapters(Selector(cfg, rngs=nnx.Rngs(config.seed)), config))
