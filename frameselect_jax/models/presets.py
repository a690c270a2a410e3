"""Named model sizes: the published hyperparameters of Qwen2.5 and SigLIP, and tiny random
ones for CPU tests and demos. A Hugging Face directory's config.json wins over these; they
serve random inits, AOT compilation and directories without a config.
"""

from __future__ import annotations

from frameselect_jax.models.qwen2 import Qwen2Config
from frameselect_jax.models.siglip import SiglipVisionConfig

QWEN2 = {
  "qwen2.5-0.5b": Qwen2Config(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
  ),
  "qwen2.5-1.5b": Qwen2Config(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
  ),
  "qwen2.5-7b": Qwen2Config(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
  ),
  # For CPU tests and demos only.
  "tiny": Qwen2Config(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
  ),
}
SIGLIP = {
  "siglip-base-patch16-224": SiglipVisionConfig(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
  ),
  "siglip-large-patch16-256": SiglipVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=256,
    patch_size=16,
  ),
  "siglip-so400m-patch14-384": SiglipVisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
  ),
  "tiny": SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=56,
    patch_size=8,
  ),
}


def preset(table: dict, name: str):
  if name not in table:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(table)}")
  return table[name]
