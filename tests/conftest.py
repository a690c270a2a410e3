"""Shared fixtures: tiny random Hugging Face models built and saved by the tests themselves."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the stage folders (train/, eval/, data/) run from the repo root
  sys.path.insert(0, REPO)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
# CPU tests (the AOT ones compile for TPU topologies without a TPU backend): keeps libtpu's
# device probe, which only prints errors on a host without TPUs, from running.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_qwen2_config(tie=False, kv_heads=2, layers=3, **overrides):
  from transformers import Qwen2Config

  values = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=layers,
    num_attention_heads=4,
    num_key_value_heads=kv_heads,
    tie_word_embeddings=tie,
    rope_theta=1e6,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
  )
  values.update(overrides)
  return Qwen2Config(**values)


def tiny_siglip_config(image_size=28, patch_size=4, **overrides):
  from transformers import SiglipVisionConfig

  values = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=image_size,
    patch_size=patch_size,
  )
  values.update(overrides)
  return SiglipVisionConfig(**values)


def save_random_qwen2(path, seed=0, std=0.2, **config):
  """A randomly initialised transformers Qwen2ForCausalLM saved to `path` (no download).

  Weights are drawn with a larger std than the default so that layers really mix."""
  import torch
  from transformers import Qwen2ForCausalLM

  torch.manual_seed(seed)
  model = Qwen2ForCausalLM(tiny_qwen2_config(**config)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, std)
  model.save_pretrained(path)
  return model


def save_random_siglip(path, seed=0, full_model=False, text=None, logit_scale_bias=None, **config):
  """A random SiglipVisionModel (or a whole SiglipModel, text tower included: `text` overrides
  its tiny config, `logit_scale_bias` sets those two scalars) saved to `path`."""
  import torch
  from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

  torch.manual_seed(seed)
  vision = tiny_siglip_config(**config)
  if full_model:
    text = text or dict(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      vocab_size=50,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
    )
    model = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config=text)).eval()
  else:
    model = SiglipVisionModel(vision).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)
    if logit_scale_bias is not None:
      model.logit_scale.fill_(logit_scale_bias[0])
      model.logit_bias.fill_(logit_scale_bias[1])
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("qwen2"))
  save_random_qwen2(path)
  return path


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("siglip"))
  save_random_siglip(path)
  return path


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "slow: an end-to-end run of a minute or more (still part of `make test`)"
  )
