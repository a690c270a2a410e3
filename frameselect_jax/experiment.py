"""From an experiment config to the Selector it trains: one place for the trainer and the
inference API (which rebuilds a trained model from the config stored in its checkpoint).

`config` is the ml_collections ConfigDict of configs/ (or a ConfigDict made from the dict a
checkpoint stores): model.{llm, vision, llm_dir, vision_dir, num_candidates, pool_grid, dtype,
remat}, stage, seed, lora.{pattern, rank, alpha}, train.trainable.
"""
from __future__ import annotations

from flax import nnx

from frameselect_jax import hf
from frameselect_jax.models.layers import add_lora
from frameselect_jax.models.selector import Selector, SelectorConfig

TOP_LEVEL = ("vision_tower", "projector", "llm", "score_query", "score_head")


def selector_config(config) -> SelectorConfig:
  """From presets, or from the Hugging Face directories' config.json when given."""
  m = config.model
  if m.llm_dir or m.vision_dir:
    if not (m.llm_dir and m.vision_dir):
      raise ValueError("set both model.llm_dir and model.vision_dir, or neither")
    llm = hf.config_or_preset(m.llm_dir, None, hf.QWEN2_PRESETS, hf.qwen2_config_from_hf)
    vision = hf.config_or_preset(m.vision_dir, None, hf.SIGLIP_PRESETS,
                                  hf.siglip_config_from_hf)
    return SelectorConfig(vision=vision, llm=llm, num_candidates=m.num_candidates,
                          pool_grid=m.pool_grid, dtype=m.dtype, remat=m.remat).validate()
  return hf.selector_config(llm=m.llm, vision=m.vision, num_candidates=m.num_candidates,
                            pool_grid=m.pool_grid, dtype=m.dtype, remat=m.remat)


def trainable_filter(config):
  unknown = sorted(set(config.train.trainable) - set(TOP_LEVEL))
  if unknown:
    raise ValueError(f"train.trainable names unknown modules {unknown}; known: {TOP_LEVEL}")
  heads = tuple(config.train.trainable)
  is_head = lambda path, _: path[0] in heads
  only_heads = nnx.All(nnx.Param, is_head)
  return nnx.Any(only_heads, nnx.LoRAParam) if config.stage == 2 else only_heads


def add_adapters(model: Selector, config) -> Selector:
  if config.stage == 2:
    add_lora(model.llm, config.lora.pattern, rank=config.lora.rank, alpha=config.lora.alpha,
             rngs=nnx.Rngs(config.seed + 1))
  return model


def build_model(config, mesh=None) -> Selector:
  """A concrete Selector: Hugging Face weights when model.llm_dir/vision_dir are set, else a
  random init from the presets (identical on every process: same seed)."""
  m = config.model
  if m.llm_dir:
    model = hf.selector_from_hf(m.llm_dir, m.vision_dir, num_candidates=m.num_candidates,
                                pool_grid=m.pool_grid, dtype=m.dtype, remat=m.remat,
                                mesh=mesh, seed=config.seed)
  else:
    model = Selector(selector_config(config), rngs=nnx.Rngs(config.seed))
  return add_adapters(model, config)


def abstract_model(config) -> Selector:
  """Shapes only (no memory): for ahead-of-time compilation."""
  cfg = selector_config(config)
  return nnx.eval_shape(lambda: add_adapters(Selector(cfg, rngs=nnx.Rngs(config.seed)), config))
