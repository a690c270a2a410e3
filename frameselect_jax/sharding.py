"""Device mesh (data, fsdp, tensor) and the one table mapping logical axis names to mesh axes.

Every parameter records logical axis names (see models/layers.py `param`); this module turns
them into NamedShardings. A dimension whose size the mesh axes do not divide is replicated
(tiny test models), never padded.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
# KV heads stay replicated: Qwen2.5-1.5B has 2 of them, so a tensor axis wider than 2
# could not split them; data + FSDP is the intended scaling path.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("embed_out", "tensor"),
  ("vocab", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", None),
  ("mlp", "tensor"),
  ("vision_embed", "fsdp"),
  ("vision_heads", "tensor"),
  ("vision_mlp", "tensor"),
  ("lora_rank", None),
  ("norm", None),
)


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(
      f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise ValueError(
      f"mesh sizes data={data} fsdp={fsdp} tensor={tensor} do not divide the "
      f"{len(devices)} available devices"
    )
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
      f"but {len(devices)} are available"
    )
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes, shape, mesh: Mesh, rules=LOGICAL_RULES) -> P:
  """PartitionSpec for one array from its logical axis names."""
  table = dict(rules)
  spec, used = [], set()
  for name, size in zip(axes, shape):
    target = table.get(name) if name is not None else None
    names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    names = tuple(a for a in names if a in mesh.shape and a not in used)
    if not names or size % math.prod(mesh.shape[a] for a in names):
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def variable_axes(variable: nnx.Variable) -> tuple:
  return variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
  """Same tree as `state` (concrete or abstract), each value a NamedSharding."""

  def to_sharding(variable):
    spec = logical_to_spec(variable_axes(variable), variable.get_value().shape, mesh, rules)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1, leading: tuple = ()) -> NamedSharding:
  """Batch dimension (the first after `leading` ones) split over data and fsdp, the rest
  replicated."""
  return NamedSharding(mesh, P(*leading, ("data", "fsdp"), *([None] * (ndim - 1))))


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh | None, rules=LOGICAL_RULES):
  """Builds a module with every parameter created directly on its sharding (no host copy)."""
  if mesh is None:
    return make_model()
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.Module:
  """Moves an existing module's parameters onto their shardings (in place) and returns it."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
  return module
