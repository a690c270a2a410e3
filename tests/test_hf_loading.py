"""hf.py: clear errors on bad checkpoints, presets vs config.json, selector assembly, tokenizer."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_random_qwen2
from safetensors.numpy import load_file, save_file

from frameselect_jax import experiment, hf
from frameselect_jax.models import presets


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_missing_directory_and_files(tmp_path, qwen2_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_qwen2(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json and no preset"):
    hf.load_qwen2(str(empty))
  no_weights = _copy(qwen2_dir, tmp_path / "no_weights")
  os.remove(os.path.join(no_weights, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.load_qwen2(no_weights)


def test_missing_shard_listed_in_index(tmp_path, qwen2_dir):
  path = _copy(qwen2_dir, tmp_path / "ck")
  os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "part-1.safetensors"))
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}, f)
  with pytest.raises(FileNotFoundError, match="part-2.safetensors"):
    hf.load_qwen2(path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, qwen2_dir):
  path = _copy(qwen2_dir, tmp_path / "ck")
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.1.mlp.extra_proj.scale"] = np.zeros(3, np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError) as info:
    hf.load_qwen2(path)
  message = str(info.value)
  assert "model.layers.1.mlp.up_proj.kernel" in message
  assert "model.layers.1.mlp.extra_proj.scale" in message


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, qwen2_dir):
  path = _copy(qwen2_dir, tmp_path / "ck")
  tensors = load_file(os.path.join(path, "model.safetensors"))
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(63, np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"q_proj.bias has shape \(63,\).*expected \(64,\)"):
    hf.load_qwen2(path)


def test_unsupported_architecture(tmp_path, qwen2_dir, siglip_dir):
  path = _copy(qwen2_dir, tmp_path / "ck")
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config.update(model_type="llama", architectures=["LlamaForCausalLM"])
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="unsupported LLM architecture.*llama"):
    hf.load_qwen2(path)
  with pytest.raises(ValueError, match="unsupported vision architecture.*qwen2"):
    hf.load_siglip(qwen2_dir)


def test_config_json_wins_over_preset(qwen2_dir):
  model = hf.load_qwen2(qwen2_dir, preset_name="qwen2.5-1.5b")
  assert model.config.hidden_size == 64


def test_preset_used_when_directory_has_no_config(tmp_path):
  tiny = presets.QWEN2["tiny"]
  save_random_qwen2(
    str(tmp_path),
    vocab_size=tiny.vocab_size,
    hidden_size=tiny.hidden_size,
    intermediate_size=tiny.intermediate_size,
    layers=tiny.num_hidden_layers,
    num_attention_heads=tiny.num_attention_heads,
    kv_heads=tiny.num_key_value_heads,
    tie=tiny.tie_word_embeddings,
  )
  os.remove(os.path.join(tmp_path, "config.json"))
  assert hf.load_qwen2(str(tmp_path), preset_name="tiny").config == tiny
  with pytest.raises(ValueError, match="does not match the model"):
    hf.load_qwen2(str(tmp_path), preset_name="qwen2.5-0.5b")
  with pytest.raises(ValueError, match="unknown preset"):
    hf.load_qwen2(str(tmp_path), preset_name="qwen9")


def test_published_presets():
  q = presets.QWEN2
  assert (q["qwen2.5-1.5b"].num_attention_heads, q["qwen2.5-1.5b"].num_key_value_heads) == (12, 2)
  assert q["qwen2.5-0.5b"].tie_word_embeddings and not q["qwen2.5-7b"].tie_word_embeddings
  assert presets.SIGLIP["siglip-so400m-patch14-384"].grid_size == 27
  assert presets.SIGLIP["siglip-base-patch16-224"].grid_size == 14
  assert presets.SIGLIP["siglip-large-patch16-256"].grid_size == 16


def test_selector_from_hf_uses_checkpoints_and_fresh_head(qwen2_dir, siglip_dir):
  llm = hf.load_qwen2(qwen2_dir)
  cfg = experiment.selector_config(
    dict(llm_dir=qwen2_dir, vision_dir=siglip_dir, num_candidates=6, pool_grid=3)
  )
  assert cfg.llm == llm.config
  selector = hf.selector_from_hf(cfg, qwen2_dir, siglip_dir)
  np.testing.assert_array_equal(
    selector.llm.model.layers[2].mlp.up_proj.kernel[...],
    llm.model.layers[2].mlp.up_proj.kernel[...],
  )
  assert selector.score_head.linear_2.kernel[...].shape == (64, 6)
  frames = jnp.zeros((1, 6, 28, 28, 3))
  ids, mask = jnp.array([[3, 4, 5]]), jnp.ones((1, 3), jnp.int32)
  scores = selector(frames, ids, mask)
  assert scores.shape == (1, 6) and bool(jnp.all(jnp.isfinite(scores)))


def test_tokenizer_loads_from_local_directory(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"[UNK]": 0, "what": 1, "is": 2, "the": 3, "boy": 4, "holding": 5, "?": 6}
  raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(str(tmp_path))
  tokenizer = hf.load_tokenizer(str(tmp_path))
  assert tokenizer.encode("what is the boy holding ?", add_special_tokens=False) == [
    1,
    2,
    3,
    4,
    5,
    6,
  ]
  with pytest.raises(FileNotFoundError):
    hf.load_tokenizer(str(tmp_path / "missing"))
  empty = tmp_path / "no_tokenizer_files"
  empty.mkdir()
  (empty / "config.json").write_text('{"model_type": "qwen2"}')
  with pytest.raises(FileNotFoundError, match="no usable tokenizer"):
    hf.load_tokenizer(str(empty))


def test_loading_does_not_import_torch(qwen2_dir, siglip_dir):
  import subprocess
  import sys

  code = (
    f"import sys; from frameselect_jax import hf; hf.load_qwen2({qwen2_dir!r}); "
    f"hf.load_siglip({siglip_dir!r}); assert 'torch' not in sys.modules, 'torch imported'"
  )
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=repo),
  )
  assert result.returncode == 0, result.stderr
