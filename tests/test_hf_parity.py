"""Numerical parity with transformers (PyTorch, fp32, CPU) for checkpoints loaded through hf.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import save_random_qwen2, save_random_siglip
from flax import nnx

from frameselect_jax import experiment, hf
from frameselect_jax.models import presets
from frameselect_jax.models.layers import add_lora
from frameselect_jax.models.siglip import adaptive_avg_pool

ATOL = 1e-4


def _torch_qwen2_outputs(model, ids, mask=None):
  with torch.no_grad():
    out = model(
      torch.as_tensor(ids),
      attention_mask=None if mask is None else torch.as_tensor(mask),
      output_hidden_states=True,
    )
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _assert_qwen2_parity(model_dir, torch_model, ids, mask=None):
  ours = hf.load_qwen2(model_dir)
  logits, hidden = ours(
    jnp.asarray(ids),
    attention_mask=None if mask is None else jnp.asarray(mask),
    output_hidden_states=True,
  )
  ref_logits, ref_hidden = _torch_qwen2_outputs(torch_model, ids, mask)
  keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
  assert len(hidden) == len(ref_hidden) == torch_model.config.num_hidden_layers + 1
  for layer, (a, b) in enumerate(zip(hidden, ref_hidden)):
    diff = np.abs(np.asarray(a) - b)[keep].max()
    assert diff <= ATOL, f"hidden state {layer}: max abs diff {diff}"
  diff = np.abs(np.asarray(logits) - ref_logits)[keep].max()
  assert diff <= ATOL, f"logits: max abs diff {diff}"
  return ours


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 2), (False, 4), (True, 1)])
def test_qwen2_logits_and_every_hidden_state_match(tmp_path, tie, kv_heads):
  torch_model = save_random_qwen2(str(tmp_path), tie=tie, kv_heads=kv_heads)
  ids = np.random.default_rng(0).integers(0, 97, (2, 13))
  ours = _assert_qwen2_parity(str(tmp_path), torch_model, ids)
  assert (ours.lm_head is None) == tie


@pytest.mark.parametrize("side", ["right", "left"])
def test_qwen2_padded_batch_matches(tmp_path, side):
  torch_model = save_random_qwen2(str(tmp_path), kv_heads=2)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 97, (3, 10))
  lengths = np.array([10, 6, 3])
  mask = np.zeros((3, 10), np.int64)
  for row, n in enumerate(lengths):
    if side == "right":
      mask[row, :n] = 1
    else:
      mask[row, 10 - n :] = 1
  _assert_qwen2_parity(str(tmp_path), torch_model, ids, mask)


def test_qwen2_sharded_checkpoint_with_index(tmp_path):
  torch_model = save_random_qwen2(str(tmp_path / "src"))
  torch_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  ids = np.random.default_rng(2).integers(0, 97, (1, 7))
  _assert_qwen2_parity(str(tmp_path / "sharded"), torch_model, ids)


def test_qwen2_bfloat16_checkpoint_loads_without_torch_dtype_support(tmp_path):
  torch_model = save_random_qwen2(str(tmp_path / "fp32"))
  torch_model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  ours = hf.load_qwen2(str(tmp_path / "bf16"))
  ref = torch_model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(ours.model.embed_tokens.embedding[...]), ref)


@pytest.mark.parametrize("full_model", [False, True])
@pytest.mark.parametrize("image_size,patch_size", [(28, 4), (30, 7)])
def test_siglip_last_hidden_state_matches(tmp_path, full_model, image_size, patch_size):
  """(30, 7) leaves 2 pixels that fill no patch, as so400m's 384 / 14 does."""
  torch_model = save_random_siglip(
    str(tmp_path), full_model=full_model, image_size=image_size, patch_size=patch_size
  )
  tower = torch_model.vision_model if full_model else torch_model
  pixels = torch.randn(3, 3, image_size, image_size)
  with torch.no_grad():
    ref = tower(pixel_values=pixels).last_hidden_state.numpy()
  ours = hf.load_siglip(str(tmp_path))
  out = ours(jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
  assert np.abs(np.asarray(out) - ref).max() <= ATOL


@pytest.mark.parametrize("grid", [27, 16, 14])
@pytest.mark.parametrize("out_grid", [1, 3, 5])
def test_pooling_matches_torch_adaptive_avg_pool2d(grid, out_grid):
  tokens = torch.randn(2, grid * grid, 7)
  ref = torch.nn.functional.adaptive_avg_pool2d(
    tokens.reshape(2, grid, grid, 7).permute(0, 3, 1, 2), out_grid
  )
  ref = ref.permute(0, 2, 3, 1).reshape(2, out_grid * out_grid, 7).numpy()
  ours = adaptive_avg_pool(jnp.asarray(tokens.numpy()), grid, out_grid)
  assert np.abs(np.asarray(ours) - ref).max() <= 1e-6


def test_pooling_rejects_grid_larger_than_patch_grid():
  with pytest.raises(ValueError, match="larger than the patch grid"):
    adaptive_avg_pool(jnp.zeros((1, 16, 4)), 4, 5)


def _assert_export_reloads_with_same_logits(ours, directory):
  from transformers import Qwen2ForCausalLM

  hf.save_qwen2(ours, directory)
  reloaded = Qwen2ForCausalLM.from_pretrained(directory).eval()
  ids = np.random.default_rng(3).integers(0, 97, (2, 9))
  ref_logits, _ = _torch_qwen2_outputs(reloaded, ids)
  logits, _ = ours(jnp.asarray(ids))
  assert np.abs(np.asarray(logits) - ref_logits).max() <= ATOL


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip_reloads_in_transformers(tmp_path, tie):
  save_random_qwen2(str(tmp_path / "src"), tie=tie)
  ours = hf.load_qwen2(str(tmp_path / "src"))
  _assert_export_reloads_with_same_logits(ours, str(tmp_path / "export"))


def test_export_merges_trained_lora(tmp_path):
  save_random_qwen2(str(tmp_path / "src"))
  ours = hf.load_qwen2(str(tmp_path / "src"))
  add_lora(ours, r"(q|v)_proj$", rank=4, alpha=8, rngs=nnx.Rngs(0))
  for seed, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(ours, nnx.LoRAParam))):
    variable.set_value(0.1 * jax.random.normal(jax.random.key(seed), variable.get_value().shape))
  _assert_export_reloads_with_same_logits(ours, str(tmp_path / "export"))


def _torch_param_count(model):
  return sum(p.numel() for p in model.parameters())


def _hf_qwen2_config(cfg):
  from transformers import Qwen2Config

  values = hf.qwen2_config_to_hf(cfg)
  return Qwen2Config(
    **{k: v for k, v in values.items() if k not in ("architectures", "torch_dtype")}
  )


def _nnx_param_count(state):
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))


def test_real_size_selector_param_counts_equal_transformers():
  """Qwen2.5-1.5B + SigLIP so400m built abstractly (no memory) against transformers on meta."""
  from transformers import Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

  from frameselect_jax.models.selector import Selector

  cfg = experiment.selector_config(dict(llm="qwen2.5-1.5b", vision="siglip-so400m-patch14-384"))
  selector = nnx.eval_shape(lambda: Selector(cfg, rngs=nnx.Rngs(0)))
  llm_cfg = _hf_qwen2_config(cfg.llm)
  vision_cfg = SiglipVisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    vision_use_head=False,
  )
  with torch.device("meta"):
    torch_llm = Qwen2ForCausalLM(llm_cfg)
    torch_vision = SiglipVisionModel(vision_cfg)
  assert _nnx_param_count(nnx.state(selector.llm)) == _torch_param_count(torch_llm)
  assert _nnx_param_count(nnx.state(selector.vision_tower)) == _torch_param_count(torch_vision)
  # The published sizes: about 1.54B (LLM, tied) and 0.43B (so400m tower).
  assert 1.5e9 < _torch_param_count(torch_llm) < 1.6e9
  assert 0.40e9 < _torch_param_count(torch_vision) < 0.45e9


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b"])
def test_other_llm_presets_param_counts_equal_transformers(name):
  from transformers import Qwen2ForCausalLM

  from frameselect_jax.models.qwen2 import Qwen2ForCausalLM as Ours

  cfg = presets.QWEN2[name]
  ours = nnx.eval_shape(lambda: Ours(cfg, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    ref = Qwen2ForCausalLM(_hf_qwen2_config(cfg))
  assert _nnx_param_count(nnx.state(ours)) == _torch_param_count(ref)


@pytest.mark.parametrize("name", ["siglip-base-patch16-224", "siglip-large-patch16-256"])
def test_other_siglip_presets_param_counts_equal_transformers(name):
  import dataclasses

  from transformers import SiglipVisionConfig, SiglipVisionModel

  from frameselect_jax.models.siglip import SiglipVisionModel as Ours

  cfg = presets.SIGLIP[name]
  ours = nnx.eval_shape(lambda: Ours(cfg, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    ref = SiglipVisionModel(SiglipVisionConfig(**dataclasses.asdict(cfg), vision_use_head=False))
  assert _nnx_param_count(nnx.state(ours)) == _torch_param_count(ref)
