"""SigLIP image-text similarity: parity with transformers' SiglipModel (PyTorch, fp32, CPU) for
a whole SiglipModel loaded through hf.py, and the selector's vision path left as it was."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import save_random_siglip
from flax import nnx

from frameselect_jax import hf
from frameselect_jax.models import siglip

ATOL = 1e-4
VOCAB, MAX_LEN = 61, 16
LOGIT_SCALE, LOGIT_BIAS = 1.7, -2.3  # exp(1.7) ~ 5.5


def _save_random_siglip_model(path, seed=0, **vision):
  """A random transformers SiglipModel: the text tower's width (24) differs from its projection
  (the vision width, 32), so a transposed head could not load; non-trivial logit scale/bias."""
  text = dict(
    vocab_size=VOCAB,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=3,
    max_position_embeddings=MAX_LEN,
    projection_size=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  return save_random_siglip(
    path, seed, full_model=True, text=text, logit_scale_bias=(LOGIT_SCALE, LOGIT_BIAS), **vision
  )


@pytest.fixture(scope="module", params=[(28, 4), (30, 7)], ids=["28-4", "30-7"])
def pair(request, tmp_path_factory):
  """(directory, transformers model, our model); (30, 7) leaves pixels that fill no patch."""
  image_size, patch_size = request.param
  path = str(tmp_path_factory.mktemp("siglip_model"))
  torch_model = _save_random_siglip_model(path, image_size=image_size, patch_size=patch_size)
  return path, torch_model, hf.load_siglip_model(path)


def _pixels(n, size, seed=0):
  return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size, size))).float()


def _nhwc(pixels):
  return jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))


def _ids(n, length=MAX_LEN, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (n, length))


def _max_diff(ours, ref):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max())


def test_text_embeds_match_get_text_features(pair):
  _, torch_model, ours = pair
  for length in (MAX_LEN, 7):  # padded to max_length as SigLIP was trained, and shorter
    ids = _ids(4, length)
    with torch.no_grad():
      ref = torch_model.get_text_features(input_ids=torch.as_tensor(ids)).pooler_output.numpy()
    assert ref.shape == (4, 32)
    diff = _max_diff(ours.text_embeds(jnp.asarray(ids)), ref)
    assert diff <= ATOL, f"text embeds (length {length}): max abs diff {diff}"


def test_text_embeds_with_attention_mask_match(pair):
  _, torch_model, ours = pair
  ids = _ids(3)
  mask = np.zeros_like(ids)
  for row, n in enumerate([MAX_LEN, 9, 3]):
    mask[row, :n] = 1
  with torch.no_grad():
    out = torch_model.get_text_features(
      input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
    )
  hidden = ours.text_model(jnp.asarray(ids), jnp.asarray(mask))
  keep = mask.astype(bool)
  diff = float(np.abs(np.asarray(hidden) - out.last_hidden_state.numpy())[keep].max())
  assert diff <= ATOL, f"text last hidden state: max abs diff {diff}"
  diff = _max_diff(ours.text_embeds(jnp.asarray(ids), jnp.asarray(mask)), out.pooler_output.numpy())
  assert diff <= ATOL, f"masked text embeds: max abs diff {diff}"


def test_image_embeds_match_get_image_features(pair):
  _, torch_model, ours = pair
  size = torch_model.config.vision_config.image_size
  pixels = _pixels(3, size)
  with torch.no_grad():
    out = torch_model.get_image_features(pixel_values=pixels)
  diff = _max_diff(ours.vision_model(_nhwc(pixels)), out.last_hidden_state.numpy())
  assert diff <= ATOL, f"image last hidden state: max abs diff {diff}"
  diff = _max_diff(ours.image_embeds(_nhwc(pixels)), out.pooler_output.numpy())
  assert diff <= ATOL, f"image embeds: max abs diff {diff}"


def test_logits_per_image_match(pair):
  _, torch_model, ours = pair
  size = torch_model.config.vision_config.image_size
  pixels, ids = _pixels(3, size, seed=2), _ids(5, seed=3)
  with torch.no_grad():
    out = torch_model(input_ids=torch.as_tensor(ids), pixel_values=pixels)
  ref = out.logits_per_image.numpy()
  assert ref.shape == (3, 5)
  np.testing.assert_allclose(float(ours.logit_scale[...][0]), LOGIT_SCALE, rtol=1e-6)
  np.testing.assert_allclose(float(ours.logit_bias[...][0]), LOGIT_BIAS, rtol=1e-6)
  logits = ours.logits_per_image(_nhwc(pixels), jnp.asarray(ids))
  diff = _max_diff(logits, ref)
  assert diff <= ATOL, f"logits_per_image: max abs diff {diff}"
  # Embeddings computed once (frames cached) give the same logits.
  cached = ours.logits(ours.image_embeds(_nhwc(pixels)), ours.text_embeds(jnp.asarray(ids)))
  assert _max_diff(cached, ref) <= ATOL
  # Under nnx.jit too.
  jitted = nnx.jit(lambda m, p, t: m.logits_per_image(p, t))(ours, _nhwc(pixels), jnp.asarray(ids))
  assert _max_diff(jitted, ref) <= ATOL


def test_module_tree_keeps_hugging_face_names_and_logical_axes(pair):
  path, torch_model, ours = pair
  ours_names = {
    ".".join(str(p) for p in key): v for key, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))
  }
  for name in (
    "vision_model.head.probe",
    "vision_model.head.attention.in_proj.kernel",
    "vision_model.head.attention.out_proj.kernel",
    "vision_model.head.layernorm.weight",
    "vision_model.head.mlp.fc1.kernel",
    "text_model.embeddings.token_embedding.embedding",
    "text_model.embeddings.position_embedding.embedding",
    "text_model.encoder.layers.1.self_attn.q_proj.kernel",
    "text_model.final_layer_norm.bias",
    "text_model.head.kernel",
    "logit_scale",
    "logit_bias",
  ):
    assert name in ours_names, name
  for name, variable in ours_names.items():
    axes = variable.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == variable.get_value().ndim, name
  n_ours = sum(int(np.prod(v.get_value().shape)) for v in ours_names.values())
  assert n_ours == sum(p.numel() for p in torch_model.parameters())


def test_vision_tower_with_head_loads_alone(pair, tmp_path):
  path, torch_model, _ = pair
  size = torch_model.config.vision_config.image_size
  pixels = _pixels(2, size, seed=4)
  with torch.no_grad():
    ref = torch_model.get_image_features(pixel_values=pixels).pooler_output.numpy()
  tower = hf.load_siglip(path, with_head=True)
  assert isinstance(tower, siglip.SiglipVisionModelWithHead)
  assert _max_diff(tower.pooled(_nhwc(pixels)), ref) <= ATOL
  # A SiglipVisionModel saved with its head (vision_use_head, the default) loads the same way.
  torch_model.vision_model.save_pretrained(str(tmp_path / "vision"))
  tower = hf.load_siglip(str(tmp_path / "vision"), with_head=True)
  assert _max_diff(tower.pooled(_nhwc(pixels)), ref) <= ATOL


def test_selector_vision_path_is_unchanged(pair):
  """The selector's tower: no head created or loaded, the same parameters as before."""
  path, torch_model, _ = pair
  tower = hf.load_siglip(path)
  assert type(tower) is siglip.SiglipVisionModel and not hasattr(tower, "head")
  keys = [".".join(str(p) for p in k) for k, _ in nnx.to_flat_state(nnx.state(tower))]
  assert keys and not any("head" in k for k in keys)
  vision = torch_model.vision_model
  without_head = sum(p.numel() for n, p in vision.named_parameters() if not n.startswith("head."))
  assert sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(tower))) == (
    without_head
  )
  size = torch_model.config.vision_config.image_size
  pixels = _pixels(2, size, seed=5)
  with torch.no_grad():
    ref = vision(pixel_values=pixels).last_hidden_state.numpy()
  assert _max_diff(tower(_nhwc(pixels)), ref) <= ATOL
  # conftest's SigLIP-without-head directory still loads for the selector, not with a head.
  assert hf.siglip_config(path) == tower.config


def test_selector_tower_directory_without_head(tmp_path):
  save_random_siglip(str(tmp_path), vision_use_head=False)
  assert type(hf.load_siglip(str(tmp_path))) is siglip.SiglipVisionModel
  with pytest.raises(ValueError, match=r"missing tensors for: \['head\.attention"):
    hf.load_siglip(str(tmp_path), with_head=True)


def test_tokenizer_from_the_model_directory(pair, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  path, torch_model, ours = pair
  words = ["<pad>", "<s>", "</s>", "<unk>", "which", "frame", "shows", "a", "red", "circle", "?"]
  raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  directory = str(tmp_path / "with_tokenizer")
  torch_model.save_pretrained(directory)
  PreTrainedTokenizerFast(
    tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>"
  ).save_pretrained(directory)
  tokenizer = hf.load_tokenizer(directory)
  ids = hf.siglip_text_ids(tokenizer, ["which frame shows a red circle ?", "a circle"], MAX_LEN)
  assert ids.shape == (2, MAX_LEN) and ids.dtype == np.int32
  assert list(ids[1, :3]) == [7, 9, 0]
  with torch.no_grad():
    ref = torch_model.get_text_features(input_ids=torch.as_tensor(ids, dtype=torch.long))
  assert (
    _max_diff(
      hf.load_siglip_model(directory).text_embeds(jnp.asarray(ids)), ref.pooler_output.numpy()
    )
    <= ATOL
  )


def test_text_longer_than_max_positions_is_refused(pair):
  _, _, ours = pair
  with pytest.raises(ValueError, match="longer than max_position_embeddings"):
    ours.text_embeds(jnp.zeros((1, MAX_LEN + 1), jnp.int32))


def test_not_a_siglip_model_directory(tmp_path, siglip_dir):
  with pytest.raises(ValueError, match="unsupported image-text architecture"):
    hf.load_siglip_model(siglip_dir)  # a SiglipVisionModel: no text tower
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_siglip_model(str(tmp_path))


def test_config_mismatches_are_refused(pair, tmp_path):
  path, torch_model, _ = pair
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  headless = json.loads(json.dumps(config))
  headless["vision_config"]["vision_use_head"] = False
  with pytest.raises(ValueError, match="vision_use_head"):
    hf.siglip_model_config_from_hf(headless)
  narrow = json.loads(json.dumps(config))
  narrow["text_config"]["projection_size"] = 24
  with pytest.raises(ValueError, match="projection_size 24 differs from the vision hidden_size 32"):
    hf.siglip_model_config_from_hf(narrow).validate()


def test_so400m_sized_pair_param_count_equals_transformers():
  """SigLIP so400m-patch14-384 (both towers) built abstractly against transformers on meta."""
  from transformers import SiglipConfig, SiglipModel

  cfg = siglip.SiglipConfig()  # the defaults are so400m's
  ours = nnx.eval_shape(lambda: siglip.SiglipModel(cfg, rngs=nnx.Rngs(0)))
  vision = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
  )
  text = dict(
    vocab_size=32000,
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    max_position_embeddings=64,
  )
  with torch.device("meta"):
    ref = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
  n_ours = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(ours)))
  assert n_ours == sum(p.numel() for p in ref.parameters())
  assert 0.85e9 < n_ours < 0.9e9  # so400m's published ~878M
