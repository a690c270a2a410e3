"""Hugging Face checkpoints <-> NNX state, without torch.

Reads config.json and safetensors (one file or shards with an index) from a local
directory. Safetensors files are memory-mapped and each tensor is placed straight onto its
target sharding with `jax.make_array_from_callback`, so each device reads only its slice and
a checkpoint never needs two full copies in host memory. One regex table per model maps
Hugging Face names to our parameter paths (which keep Hugging Face names); the only
transforms are transposes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from frameselect_jax import sharding as shd
from frameselect_jax.models import presets as presets_lib
from frameselect_jax.models.layers import iter_dense, lora_delta
from frameselect_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from frameselect_jax.models.selector import Selector, SelectorConfig
from frameselect_jax.models.siglip import (
  SiglipConfig,
  SiglipModel,
  SiglipTextConfig,
  SiglipVisionConfig,
  SiglipVisionModel,
  SiglipVisionModelWithHead,
)

# --- config.json ---

QWEN2_ARCHITECTURES = {"Qwen2ForCausalLM", "Qwen2Model"}
SIGLIP_MODEL_TYPES = {"siglip", "siglip_vision_model"}


def read_config_json(directory: str) -> dict:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory!r} has no config.json")
  with open(path) as f:
    return json.load(f)


def _pick_fields(cls, values: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def qwen2_config_from_hf(hf: dict) -> Qwen2Config:
  archs = set(hf.get("architectures") or [])
  if hf.get("model_type") != "qwen2" or (archs and not archs & QWEN2_ARCHITECTURES):
    raise ValueError(
      f"unsupported LLM architecture: model_type={hf.get('model_type')!r}, "
      f"architectures={sorted(archs)}; expected qwen2 / Qwen2ForCausalLM"
    )
  values = dict(hf)
  rope = hf.get("rope_parameters") or {}
  if "rope_theta" not in values and "rope_theta" in rope:
    values["rope_theta"] = rope["rope_theta"]
  if rope.get("rope_type", "default") != "default" or (hf.get("rope_scaling") or {}):
    raise ValueError(
      f"unsupported rope scaling {rope or hf.get('rope_scaling')}; only default RoPE"
    )
  return _pick_fields(Qwen2Config, values).validate()


def siglip_config_from_hf(hf: dict) -> SiglipVisionConfig:
  if hf.get("model_type") not in SIGLIP_MODEL_TYPES:
    raise ValueError(
      f"unsupported vision architecture: model_type={hf.get('model_type')!r}; "
      f"expected one of {sorted(SIGLIP_MODEL_TYPES)}"
    )
  values = hf.get("vision_config", hf) if hf["model_type"] == "siglip" else hf
  return _pick_fields(SiglipVisionConfig, values).validate()


def siglip_model_config_from_hf(hf: dict) -> SiglipConfig:
  """A whole SiglipModel's config.json (vision_config and text_config)."""
  if hf.get("model_type") != "siglip" or not hf.get("text_config") or not hf.get("vision_config"):
    raise ValueError(
      f"unsupported image-text architecture: model_type={hf.get('model_type')!r}, "
      f"text_config {'present' if hf.get('text_config') else 'absent'}; expected a SiglipModel "
      "(model_type 'siglip' with vision_config and text_config)"
    )
  if hf["vision_config"].get("vision_use_head") is False:
    raise ValueError("vision_config.vision_use_head is false: the image embeddings need the head")
  vision = _pick_fields(SiglipVisionConfig, hf["vision_config"])
  return SiglipConfig(vision=vision, text=_pick_fields(SiglipTextConfig, hf["text_config"]))


def qwen2_config_to_hf(cfg: Qwen2Config) -> dict:
  return {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads,
    "num_key_value_heads": cfg.num_key_value_heads,
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "max_position_embeddings": cfg.max_position_embeddings,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "use_sliding_window": False,
  }


# --- safetensors, memory-mapped (no torch; bfloat16 through ml_dtypes) ---

SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """Tensor name -> read-only memory-mapped array (nothing is read until sliced)."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    tensors[name] = (
      np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + start, shape=shape)
      if end > start
      else np.zeros(shape, dtype)
    )
  return tensors


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory: model.safetensors, or shards listed in the index."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(single):
    files = ["model.safetensors"]
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(
        f"{directory!r} has no model.safetensors, no "
        "model.safetensors.index.json and no *.safetensors shards"
      )
  tensors = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"shard {name} listed in the index is missing from {directory!r}")
    tensors.update(_read_safetensors_file(path))
  return tensors


# --- name tables: (Hugging Face regex, our dotted path template, transform) ---


def _transpose(x):
  return x.T


def _conv_to_hwio(x):  # torch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
  return x.transpose(2, 3, 1, 0)


QWEN2_RULES: list[tuple[str, str, Callable | None]] = [
  (r"model\.embed_tokens\.weight", r"model.embed_tokens.embedding", None),
  (r"(model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj)\.weight", r"\1.kernel", _transpose),
  (r"(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.bias", r"\1.bias", None),
  (r"(model\.layers\.\d+\.\w+_layernorm)\.weight", r"\1.weight", None),
  (r"model\.norm\.weight", r"model.norm.weight", None),
  (r"lm_head\.weight", r"lm_head.kernel", _transpose),
]
SIGLIP_RULES: list[tuple[str, str, Callable | None]] = [
  (
    r"(?:vision_model\.)?embeddings\.patch_embedding\.weight",
    r"embeddings.patch_embedding.kernel",
    _conv_to_hwio,
  ),
  (
    r"(?:vision_model\.)?embeddings\.patch_embedding\.bias",
    r"embeddings.patch_embedding.bias",
    None,
  ),
  (
    r"(?:vision_model\.)?embeddings\.position_embedding\.weight",
    r"embeddings.position_embedding.embedding",
    None,
  ),
  (
    r"(?:vision_model\.)?(encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d))\.weight",
    r"\1.kernel",
    _transpose,
  ),
  (
    r"(?:vision_model\.)?(encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d))\.bias",
    r"\1.bias",
    None,
  ),
  (
    r"(?:vision_model\.)?(encoder\.layers\.\d+\.layer_norm\d|post_layernorm)\.(weight|bias)",
    r"\1.\2",
    None,
  ),
]
# SiglipModel checkpoints prefix the tower with "vision_model."; transformers 5 saves a
# SiglipVisionModel without it. Both load.
# Present in real checkpoints, not used by the selector: SigLIP's attention-pooling head and
# text tower; position_ids buffers.
SIGLIP_IGNORED = r"(?:vision_model\.)?head\..*|text_model\..*|logit_(scale|bias)|.*position_ids"
# The vision tower's attention-pooling head (SiglipVisionModelWithHead). torch's
# MultiheadAttention packs q, k, v into in_proj_weight / in_proj_bias: our Dense in_proj.
SIGLIP_HEAD_RULES: list[tuple[str, str, Callable | None]] = [
  (r"(?:vision_model\.)?head\.probe", r"head.probe", None),
  (
    r"(?:vision_model\.)?head\.attention\.in_proj_weight",
    r"head.attention.in_proj.kernel",
    _transpose,
  ),
  (r"(?:vision_model\.)?head\.attention\.in_proj_bias", r"head.attention.in_proj.bias", None),
  (r"(?:vision_model\.)?(head\.(attention\.out_proj|mlp\.fc\d))\.weight", r"\1.kernel", _transpose),
  (r"(?:vision_model\.)?(head\.(attention\.out_proj|mlp\.fc\d))\.bias", r"\1.bias", None),
  (r"(?:vision_model\.)?head\.layernorm\.(weight|bias)", r"head.layernorm.\1", None),
]
SIGLIP_HEAD_IGNORED = r"text_model\..*|logit_(scale|bias)|.*position_ids"
SIGLIP_TEXT_RULES: list[tuple[str, str, Callable | None]] = [
  (
    r"(?:text_model\.)?(embeddings\.(token|position)_embedding)\.weight",
    r"\1.embedding",
    None,
  ),
  (
    r"(?:text_model\.)?(encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)|head)\.weight",
    r"\1.kernel",
    _transpose,
  ),
  (
    r"(?:text_model\.)?(encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)|head)\.bias",
    r"\1.bias",
    None,
  ),
  (
    r"(?:text_model\.)?(encoder\.layers\.\d+\.layer_norm\d|final_layer_norm)\.(weight|bias)",
    r"\1.\2",
    None,
  ),
]


def _nested(prefix: str, rules):
  r"""The rules of a tower that sits under `prefix.` both in the checkpoint and in our tree
  (each pattern starts with the optional group `(?:prefix\.)?`, which becomes required)."""
  optional = f"(?:{prefix}\\.)?"
  nested = []
  for pattern, template, transform in rules:
    assert pattern.startswith(optional), (prefix, pattern)
    nested.append((f"{prefix}\\." + pattern[len(optional) :], f"{prefix}.{template}", transform))
  return nested


# A whole SiglipModel: our tree keeps its vision_model. / text_model. prefixes.
SIGLIP_MODEL_RULES: list[tuple[str, str, Callable | None]] = [
  *_nested("vision_model", SIGLIP_RULES + SIGLIP_HEAD_RULES),
  *_nested("text_model", SIGLIP_TEXT_RULES),
  (r"logit_(scale|bias)", r"logit_\1", None),
]
SIGLIP_MODEL_IGNORED = r".*position_ids"
QWEN2_IGNORED = r".*rotary_emb\.inv_freq"


def _path_key(path) -> str:
  return ".".join(str(p) for p in path)


def _load_into(
  abstract_state,
  tensors: dict[str, np.ndarray],
  rules,
  ignored: str,
  mesh: Mesh | None,
  source: str,
  tied: bool = False,
):
  """Fills an abstract NNX state from checkpoint tensors, each placed on its sharding."""
  targets = {_path_key(p): v for p, v in nnx.to_flat_state(abstract_state)}
  found: dict[str, tuple[str, Callable | None]] = {}
  unexpected = []
  for name in tensors:
    for pattern, template, transform in rules:
      if re.fullmatch(pattern, name):
        found[re.sub(pattern, template, name)] = (name, transform)
        break
    else:
      if not re.fullmatch(ignored, name) and not (tied and name == "lm_head.weight"):
        unexpected.append(name)
  missing = sorted(t for t in targets if t not in found)
  extra = sorted(unexpected + [found[t][0] for t in found if t not in targets])
  if missing or extra:
    raise ValueError(
      f"checkpoint {source!r} does not match the model:\n"
      f"  missing tensors for: {missing}\n  unexpected tensors: {extra}"
    )
  device = NamedSharding(shd.make_mesh(1, 1, 1, jax.devices()[:1]), P())
  filled = []
  for key, variable in targets.items():
    name, transform = found[key]
    array = tensors[name] if transform is None else transform(tensors[name])
    expected = tuple(variable.get_value().shape)
    if tuple(array.shape) != expected:
      raise ValueError(
        f"{source!r}: tensor {name} has shape {tuple(array.shape)} after "
        f"conversion, expected {expected} for {key}"
      )
    if mesh is None:
      sharding = device
    else:
      sharding = NamedSharding(
        mesh, shd.logical_to_spec(shd.variable_axes(variable), expected, mesh)
      )
    dtype = variable.get_value().dtype
    value = jax.make_array_from_callback(
      expected, sharding, lambda index, a=array, dtype=dtype: np.asarray(a[index], dtype=dtype)
    )
    filled.append(
      (tuple(int(p) if p.isdigit() else p for p in key.split(".")), variable.replace(value))
    )
  return nnx.from_flat_state(filled)


def load_qwen2(
  directory: str, *, preset_name: str | None = None, dtype=jnp.float32, mesh: Mesh | None = None
) -> Qwen2ForCausalLM:
  """Qwen2ForCausalLM (Qwen2 / Qwen2.5) from a local Hugging Face directory."""
  cfg = config_or_preset(directory, preset_name, presets_lib.QWEN2, qwen2_config_from_hf)
  return _load_model(
    directory,
    lambda: Qwen2ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
    QWEN2_RULES,
    QWEN2_IGNORED,
    mesh,
    tied=cfg.tie_word_embeddings,
  )


def load_siglip(
  directory: str,
  *,
  preset_name: str | None = None,
  dtype=jnp.float32,
  mesh: Mesh | None = None,
  with_head: bool = False,
) -> SiglipVisionModel:
  """The vision tower of SiglipVisionModel or SiglipModel from a local directory: without its
  pooling head (what the selector uses), or with it (SiglipVisionModelWithHead)."""
  cfg = config_or_preset(directory, preset_name, presets_lib.SIGLIP, siglip_config_from_hf)
  if with_head:
    make, rules, ignored = (
      SiglipVisionModelWithHead,
      SIGLIP_RULES + SIGLIP_HEAD_RULES,
      SIGLIP_HEAD_IGNORED,
    )
  else:
    make, rules, ignored = SiglipVisionModel, SIGLIP_RULES, SIGLIP_IGNORED
  return _load_model(
    directory, lambda: make(cfg, dtype=dtype, rngs=nnx.Rngs(0)), rules, ignored, mesh
  )


def load_siglip_model(
  directory: str, *, dtype=jnp.float32, mesh: Mesh | None = None
) -> SiglipModel:
  """A whole SiglipModel (both towers, logit_scale, logit_bias) from a local directory with its
  config.json. Its tokenizer, when the directory has one: `load_tokenizer(directory)` (SigLIP's
  own SiglipTokenizer needs the sentencepiece package), then `siglip_text_ids`."""
  cfg = siglip_model_config(directory)
  return _load_model(
    directory,
    lambda: SiglipModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
    SIGLIP_MODEL_RULES,
    SIGLIP_MODEL_IGNORED,
    mesh,
  )


def _load_model(directory, make_model, rules, ignored, mesh, tied=False):
  """Builds the module abstractly (no memory) and fills it from the directory's tensors."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  state = _load_into(
    abstract, read_safetensors(directory), rules, ignored, mesh, directory, tied=tied
  )
  return nnx.merge(graphdef, state)


def config_or_preset(directory, preset_name, presets, from_hf):
  """The directory's config.json, or the named preset when it has none."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  if os.path.isfile(os.path.join(directory, "config.json")):
    return from_hf(read_config_json(directory))
  if preset_name is None:
    raise FileNotFoundError(
      f"{directory!r} has no config.json and no preset was given (known presets: {sorted(presets)})"
    )
  return presets_lib.preset(presets, preset_name)


def qwen2_config(directory: str) -> Qwen2Config:
  return config_or_preset(directory, None, presets_lib.QWEN2, qwen2_config_from_hf)


def siglip_config(directory: str) -> SiglipVisionConfig:
  return config_or_preset(directory, None, presets_lib.SIGLIP, siglip_config_from_hf)


def siglip_model_config(directory: str) -> SiglipConfig:
  """A SiglipModel directory's config (its config.json is required: there are no presets)."""
  return siglip_model_config_from_hf(read_config_json(directory)).validate()


def selector_from_hf(
  cfg: SelectorConfig, llm_dir: str, vision_dir: str, *, mesh: Mesh | None = None, seed: int = 0
) -> Selector:
  """A Selector of `cfg` (`experiment.selector_config` reads it from the same directories)
  whose LLM and vision tower come from Hugging Face directories; the projector, score query
  and score head are freshly initialised (untrained)."""
  llm = load_qwen2(llm_dir, mesh=mesh)
  vision = load_siglip(vision_dir, mesh=mesh)
  if (llm.config, vision.config) != (cfg.llm, cfg.vision):
    raise ValueError(f"{llm_dir} / {vision_dir} do not hold the backbone of this selector config")
  make = lambda: Selector(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  is_backbone = lambda path, _: path[0] in ("llm", "vision_tower")
  head_abstract = nnx.filter_state(abstract, nnx.Not(is_backbone))
  shardings = shd.state_shardings(head_abstract, mesh) if mesh is not None else None
  # Only the head is returned, so XLA drops the backbone's random init.
  head = jax.jit(
    lambda: nnx.filter_state(nnx.state(make()), nnx.Not(is_backbone)), out_shardings=shardings
  )()
  state = nnx.merge_state(
    head, nnx.State({"llm": nnx.state(llm), "vision_tower": nnx.state(vision)})
  )
  return nnx.merge(graphdef, state)


def load_tokenizer(directory: str):
  """transformers AutoTokenizer from a local directory (never downloads)."""
  from transformers import AutoTokenizer

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
  tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
  # transformers 5 builds an empty tokenizer (every text -> no tokens) from a directory
  # without tokenizer files instead of failing; training on empty questions would be silent.
  if not tokenizer.encode("Which frames help?", add_special_tokens=False):
    raise FileNotFoundError(
      f"{directory!r} has no usable tokenizer: no tokenizer files "
      "(tokenizer.json, or vocab.json + merges.txt)?"
    )
  return tokenizer


def siglip_text_ids(tokenizer, texts, max_length: int = 64) -> np.ndarray:
  """int32 (len(texts), max_length) token ids as SigLIP was trained on: padded to max_length
  (the text config's max_position_embeddings), truncated, and no attention mask."""
  if tokenizer.pad_token_id is None:
    raise ValueError("the tokenizer has no pad token: SigLIP pads every text to max_length")
  ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)[
    "input_ids"
  ]
  return np.asarray(ids, np.int32)


# --- export ---


def qwen2_to_hf_tensors(model: Qwen2ForCausalLM) -> dict[str, np.ndarray]:
  """Hugging Face-named float32 tensors of our Qwen2 (LoRA adapters merged, model untouched)."""
  inverse = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if isinstance(variable, nnx.LoRAParam):
      continue
    inverse[_path_key(path)] = np.asarray(jax.device_get(variable.get_value()), np.float32)
  for path, dense in _lora_denses(model):
    key = f"{path}.kernel"
    inverse[key] = inverse[key] + np.asarray(lora_delta(dense), np.float32)
  tensors = {}
  for key, value in inverse.items():
    name, transform = _hf_name(key)
    tensors[name] = np.ascontiguousarray(value if transform is None else transform(value))
  return tensors


def _lora_denses(model):
  return [(p, d) for p, d in iter_dense(model) if d.lora_a is not None]


def _hf_name(key: str):
  """Our paths keep Hugging Face names: only the leaf differs (kernel is a transposed weight)."""
  if key.endswith(".kernel"):
    return key[: -len("kernel")] + "weight", _transpose
  if key.endswith(".embedding"):
    return key[: -len("embedding")] + "weight", None
  return key, None


def save_qwen2(model: Qwen2ForCausalLM, directory: str) -> None:
  """Writes config.json and model.safetensors that transformers' Qwen2ForCausalLM loads."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(qwen2_config_to_hf(model.config), f, indent=2)
  save_file(
    qwen2_to_hf_tensors(model),
    os.path.join(directory, "model.safetensors"),
    metadata={"format": "pt"},
  )
