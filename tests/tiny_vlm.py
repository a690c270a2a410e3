"""A tiny random Qwen2-VL for tests: build and save it, and make its inputs on CPU, no torchvision.

Measured with transformers 5.23.0 and torch 2.13.0+cpu, torchvision not installed:

* `AutoModelForImageTextToText.from_pretrained(dir)` loads it (Qwen2VLForConditionalGeneration);
  `model(**inputs).logits` and `model.generate(**inputs, max_new_tokens=5, do_sample=False)` run.
  `AutoTokenizer` gives a Qwen2Tokenizer (with the chat template below) and `AutoImageProcessor`
  gives Qwen2VLImageProcessorPil (the PIL backend, which needs no torchvision).
* `AutoProcessor.from_pretrained(dir)` fails, also with `video_processor=None` or with a
  processor_config.json: `ImportError: Qwen2VLVideoProcessor requires the Torchvision library but
  it was not found in your environment`. `Qwen2VLProcessor(image_processor=..., tokenizer=...)`,
  with or without `video_processor=None`, fails with `AttributeError: type object
  'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'` (Qwen2_5_VLProcessor: the same).
* So `qwen2vl_inputs` builds the inputs from the image processor and the tokenizer. The chat
  template writes `<|vision_start|><|image_pad|><|vision_end|>` for each image; each `<|image_pad|>`
  is then repeated `image_grid_thw.prod() // merge_size**2` times (as in
  Qwen2VLProcessor.replace_image_token). The model also needs `mm_token_type_ids` (1 at image
  tokens, else 0); a forward with `image_grid_thw` but without it raises `ValueError: Multimodal
  data was passed ... but `mm_token_type_ids` is missing`. The result is tensor-for-tensor equal to
  what `image_only_processor_class()` (Qwen2VLProcessor minus the video processor) returns; that
  subclass also loads with `.from_pretrained(dir)`.
* Batches are left-padded. Several (image, prompt) pairs and prompts with 2 images work; the
  last-position logits of a batch of 4 equal those of each prompt alone (to ~2e-7).
* A 56x56 image gives image_grid_thw [1, 4, 4]: 16 patches, 4 `<|image_pad|>` tokens; larger
  images are shrunk to at most 56*56 pixels.
* "True", " True", "true", "False", " False", "false" are single tokens (`TRUE_FALSE`).
* `make_servable(dir)` puts that image-only processor in the directory as its own code (an
  auto_map in processor_config.json): `AutoProcessor.from_pretrained(dir,
  trust_remote_code=True)` then loads it, and so does `transformers serve DIR
  --trust-remote-code`, which serves the tiny Qwen2-VL on loopback.
"""

import numpy as np

SPECIAL_TOKENS = (
  "<|endoftext|> <|im_start|> <|im_end|> "
  "<|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>"
).split()
TRUE_FALSE = ["True", " True", "true", "False", " False", "false"]

CHAT_TEMPLATE = (
  "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
  "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
  "{% for part in message['content'] %}"
  "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
  "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
  "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
  "Is there a person in this frame? Answer True or False.",
  "Does the image show a red car? Answer with true or false.",
  "Describe the picture.",
] + "user assistant system True False true false yes no".split()


def build_tokenizer():
  """A byte-level BPE (352 tokens) in a Qwen2TokenizerFast, left padding, chat template set."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import Qwen2TokenizerFast

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(
    vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False, initial_alphabet=alphabet
  )
  bpe.train_from_iterator(_CORPUS * 50, trainer)
  tok = Qwen2TokenizerFast(
    tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
  )
  tok.chat_template = CHAT_TEMPLATE
  for word in TRUE_FALSE:
    assert len(tok.encode(word, add_special_tokens=False)) == 1, word
  return tok


def save_tiny_qwen2vl(path, seed=0) -> str:
  """Save a tiny random Qwen2-VL (model, tokenizer, image processor config) to `path`."""
  import torch
  from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

  tok = build_tokenizer()
  ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
  pad_id, eos_id = ids["<|endoftext|>"], ids["<|im_end|>"]
  text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
  text.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
  # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width).
  text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
  text.update(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
  vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14)
  vision.update(spatial_merge_size=2, temporal_patch_size=2)
  config = Qwen2VLConfig(
    text_config=text,
    vision_config=vision,
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
  )
  with torch.random.fork_rng():
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
  model.generation_config.pad_token_id = pad_id
  model.generation_config.eos_token_id = eos_id
  model.save_pretrained(path)
  tok.save_pretrained(path)
  # At least 28*28 pixels (1 image token), at most 56*56 (4 image tokens).
  Qwen2VLImageProcessorPil(
    min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
  ).save_pretrained(path)
  return str(path)


def load_tiny_qwen2vl(path):
  """(model, tokenizer, image_processor) from a directory written by save_tiny_qwen2vl."""
  from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

  model = AutoModelForImageTextToText.from_pretrained(path).eval()
  return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def qwen2vl_inputs(path_or_objects, images, prompts):
  """Batched model inputs (torch tensors) for the pairs (images[i], prompts[i]).

  path_or_objects: a model directory, or a (tokenizer, image_processor) pair.
  images[i]: one RGB uint8 array (H, W, 3), or a list of them (placed before the text).
  Returns a BatchFeature: input_ids, attention_mask, mm_token_type_ids, pixel_values and
  image_grid_thw.
  """
  from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature

  if isinstance(path_or_objects, (tuple, list)):
    tok, image_processor = path_or_objects
  else:
    tok = AutoTokenizer.from_pretrained(path_or_objects)
    image_processor = AutoImageProcessor.from_pretrained(path_or_objects)
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts")
  per_prompt = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
  flat = [np.asarray(im, dtype=np.uint8) for ims in per_prompt for im in ims]
  vision = image_processor(images=flat, return_tensors="pt")
  counts = iter((vision["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist())

  pad = "<|image_pad|>"
  texts = []
  for ims, prompt in zip(per_prompt, prompts):
    content = [{"type": "image"}] * len(ims) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, *rest = text.split(pad)
    assert len(rest) == len(ims), "the prompt text must not contain <|image_pad|>"
    texts.append(head + "".join(pad * next(counts) + tail for tail in rest))

  tok.padding_side = "left"
  text_inputs = tok(texts, padding=True, return_tensors="pt")
  ids = text_inputs["input_ids"]
  image_id, video_id = tok.convert_tokens_to_ids(pad), tok.convert_tokens_to_ids("<|video_pad|>")
  text_inputs["mm_token_type_ids"] = (ids == image_id).long() + 2 * (ids == video_id).long()
  return BatchFeature({**text_inputs, **vision})


def image_only_processor_class():
  """Qwen2VLProcessor without a video processor: it works here, e.g. `cls.from_pretrained(dir)`."""
  from transformers import Qwen2VLProcessor

  class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

  return ImageOnlyQwen2VLProcessor


IMAGE_ONLY_PROCESSOR = '''
from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
  """Qwen2VLProcessor without its video processor (which needs torchvision)."""

  attributes = ["image_processor", "tokenizer"]

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
'''


def make_servable(path) -> str:
  """Lets `AutoProcessor` (and so `transformers serve --trust-remote-code`) load the model
  directory here: the image-only processor as the directory's own code (an auto_map)."""
  import json
  import os

  with open(os.path.join(path, "processing_image_only.py"), "w") as f:
    f.write(IMAGE_ONLY_PROCESSOR)
  with open(os.path.join(path, "processor_config.json"), "w") as f:
    json.dump(
      {
        "processor_class": "ImageOnlyQwen2VLProcessor",
        "auto_map": {"AutoProcessor": "processing_image_only.ImageOnlyQwen2VLProcessor"},
      },
      f,
    )
  return str(path)
