"""Run the real `transformers serve` on loopback with a tiny random LLaVA built here.

Verified (transformers 5.23.0, torch 2.13.0+cpu, openai 3.57.0, fastapi 0.165.0, uvicorn 0.54.0):
- `save_tiny_llava` builds a random LlavaForConditionalGeneration (SigLIP 32 wide, 28 px, patch
  14: 4 image tokens per image; Qwen2 64 wide, 2 layers) with a LlavaProcessor, a byte-level BPE
  tokenizer trained with `tokenizers` and a small chat template; nothing is downloaded.
- `transformers serve DIR --device cpu` comes up (GET /health == 200) and the official `openai`
  client gets text and `usage` back for a text-only message and for one with two base64 JPEG
  `image_url` parts.
- The server is pinned to DIR: the `model=` to pass is exactly the DIR string given on the
  command line (anything else is a 400 "Server is pinned to ..."); responses name it "DIR@main".
- `logprobs=True, top_logprobs=5` is accepted and ignored: `choices[0].logprobs` is None.
- Always pass max_tokens: a random model otherwise runs to 1024 tokens (about 20 s).
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHAT_TEMPLATE = (
  "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
  "{% if message['content'] is string %}{{ message['content'] }}"
  "{% else %}{% for part in message['content'] %}"
  "{% if part['type'] == 'image' %}<image>"
  "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
  "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def _tiny_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import Qwen2TokenizerFast

  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=SPECIAL_TOKENS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  corpus = [
    "Describe the two images.",
    "What is in the picture? A cat, a dog and a red car.",
    "user assistant system",
  ]
  raw.train_from_iterator(corpus * 20, trainer=trainer)
  return Qwen2TokenizerFast(
    tokenizer_object=raw,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    unk_token=None,
    bos_token=None,
    extra_special_tokens={"image_token": "<image>"},
    chat_template=CHAT_TEMPLATE,
  )


def save_tiny_llava(path):
  """Build a tiny random LLaVA (model + processor) and save it to `path`; return `path`."""
  import torch
  from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
  )

  tokenizer = _tiny_tokenizer()
  image_processor = SiglipImageProcessor(size={"height": 28, "width": 28})
  processor = LlavaProcessor(
    image_processor=image_processor,
    tokenizer=tokenizer,
    patch_size=14,
    num_additional_image_tokens=0,
    vision_feature_select_strategy="full",
    image_token="<image>",
    chat_template=CHAT_TEMPLATE,
  )
  vision = SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
  )
  text = Qwen2Config(
    vocab_size=len(tokenizer),
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
  )
  config = LlavaConfig(
    vision_config=vision,
    text_config=text,
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    vision_feature_select_strategy="full",
    vision_feature_layer=-1,
    projector_hidden_act="gelu",
  )
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration(config).eval()
  model.generation_config.eos_token_id = tokenizer.eos_token_id
  model.generation_config.pad_token_id = tokenizer.pad_token_id
  model.save_pretrained(path)
  processor.save_pretrained(path)
  return str(path)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _healthy(url):
  try:
    with urllib.request.urlopen(url, timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


def _stop(proc, wait=10):
  if proc.poll() is not None:
    return
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)  # the server runs in its own process group (start_new_session)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def _tail(path, n=30):
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-n:])


LIFETIME_S = 600


@contextlib.contextmanager
def transformers_serve(model_dir, timeout=90, trust_remote_code=False):
  """Starts `transformers serve model_dir` on 127.0.0.1, yields (base_url, model_name), and stops
  it (it also stops by itself after LIFETIME_S).

  `model_name` is the string to pass as `model=` to the openai client (the server is pinned to it).
  """
  model_dir = str(model_dir)
  port = _free_port()
  with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
    hub = os.path.join(tmp, "hub")
    os.makedirs(hub)  # /v1/models scans the hub cache and 500s when the folder is missing
    env = dict(
      os.environ,
      HF_HUB_CACHE=hub,
      HF_HUB_OFFLINE="1",
      TRANSFORMERS_VERBOSITY="error",
      TOKENIZERS_PARALLELISM="false",
      NO_COLOR="1",
    )
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    serve = [cli, "serve", model_dir, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    if trust_remote_code:  # a model directory with its own processor code (tiny_vlm.make_servable)
      serve.append("--trust-remote-code")
    cmd = ["timeout", str(LIFETIME_S), *serve]  # it stops by itself, even if the test dies
    log_path = os.path.join(tmp, "server.log")
    with open(log_path, "w") as log:
      proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
      )
    try:
      deadline = time.monotonic() + timeout
      while not _healthy(f"http://127.0.0.1:{port}/health"):
        if proc.poll() is not None:
          raise RuntimeError(
            f"transformers serve exited with {proc.returncode}:\n{_tail(log_path)}"
          )
        if time.monotonic() > deadline:
          raise RuntimeError(f"transformers serve not healthy after {timeout}s:\n{_tail(log_path)}")
        time.sleep(0.25)
      yield f"http://127.0.0.1:{port}/v1", model_dir
    finally:
      _stop(proc)
