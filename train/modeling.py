"""The Selector of a training config, split into trainable and frozen parameter dicts.

Stage 1 trains the projector, the score query and the score head; stage 2 adds LoRA
adapters to the LLM and trains them too. The split uses NNX filters; the parts leave this
module as plain nested dicts of arrays placed on their mesh shardings (frozen ones cast to
`model.frozen_dtype`), ready for the pure train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frameselect_jax import sharding as shd
from frameselect_jax.experiment import (
  abstract_model,
  build_model,
  frozen_dtype,
  selector_config,
  trainable_filter,
)
from frameselect_jax.models.selector import Selector


def split(model: Selector, config):
  """(graphdef, trainable state, frozen state) as NNX States (Variables keep axis names)."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(config), ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"no trainable parameters: train.trainable={tuple(config.train.trainable)}")
  return graphdef, params, frozen


# Model-defining fields -> split(abstract_model(config)): see `abstract_split`.
_ABSTRACT_SPLITS = {}


def abstract_split(config):
  """split(abstract_model(config)), built once per process for each model: tracing the
  initialisation of a real-size model takes about 30 s (each update of flax's RNG counter
  makes jax build an error message that walks the whole trace so far), and the planner
  prepares many points (meshes, batches) of one model. The states are shared between
  callers: read them, do not modify them."""
  key = (
    selector_config(config.model),
    config.seed,
    config.stage,
    config.lora.to_json(),
    tuple(config.train.trainable),
  )
  if key not in _ABSTRACT_SPLITS:
    _ABSTRACT_SPLITS[key] = split(abstract_model(config), config)
  return _ABSTRACT_SPLITS[key]


def shardings_of(state, mesh, rules):
  return nnx.to_pure_dict(shd.state_shardings(state, mesh, rules))


def abstract_of(pure, shardings, dtype_of=lambda x: x.dtype):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype_of(x), sharding=s), pure, shardings
  )


def place(pure, shardings, dtype_fn=lambda x: x.dtype):
  """Puts every array of a nested dict on its sharding (each process supplies only the
  slices its devices hold), cast with dtype_fn."""

  def put(x, sharding):
    dtype = dtype_fn(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)(x)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(
      host.shape, sharding, lambda index: np.asarray(host[index]).astype(dtype)
    )

  return jax.tree.map(put, pure, shardings)


def _param_dtype(x):
  return jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype


def prepare(config, mesh, rules):
  """Builds the model and returns graphdef, params, frozen (placed dicts) and their shardings."""
  if not config.model.llm_dir:
    # Random init inside one jit: every array is created directly on its sharding, and one
    # compilation replaces one per parameter.
    graphdef, params_abs, frozen_abs = abstract_split(config)
    param_shardings = shardings_of(params_abs, mesh, rules)
    frozen_shardings = shardings_of(frozen_abs, mesh, rules)
    cast_frozen = frozen_dtype(config.model.frozen_dtype)

    def init():
      _, params_state, frozen_state = split(build_model(config), config)
      params = jax.tree.map(lambda x: x.astype(_param_dtype(x)), nnx.to_pure_dict(params_state))
      frozen = jax.tree.map(lambda x: x.astype(cast_frozen(x)), nnx.to_pure_dict(frozen_state))
      return params, frozen

    params, frozen = jax.jit(init, out_shardings=(param_shardings, frozen_shardings))()
    return graphdef, params, frozen, param_shardings, frozen_shardings
  model = build_model(config, mesh)
  graphdef, params_state, frozen_state = split(model, config)
  param_shardings = shardings_of(params_state, mesh, rules)
  frozen_shardings = shardings_of(frozen_state, mesh, rules)
  params = place(nnx.to_pure_dict(params_state), param_shardings, _param_dtype)
  frozen = place(
    nnx.to_pure_dict(frozen_state), frozen_shardings, frozen_dtype(config.model.frozen_dtype)
  )
  return graphdef, params, frozen, param_shardings, frozen_shardings


def prepare_abstract(config, mesh, rules):
  """The same as `prepare`, as ShapeDtypeStructs with shardings (no weights)."""
  graphdef, params_state, frozen_state = abstract_split(config)
  param_shardings = shardings_of(params_state, mesh, rules)
  frozen_shardings = shardings_of(frozen_state, mesh, rules)
  params = abstract_of(nnx.to_pure_dict(params_state), param_shardings, lambda x: jnp.float32)
  frozen = abstract_of(
    nnx.to_pure_dict(frozen_state), frozen_shardings, frozen_dtype(config.model.frozen_dtype)
  )
  return graphdef, params, frozen, param_shardings, frozen_shardings


def count_params(pure) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(pure)))
