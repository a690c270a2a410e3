"""Multimodal LLM backends: what the pseudo-labellers (data/) and the evaluation harness's
downstream models ask of a model, with two implementations.

- `OpenAIBackend`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, a hosted
  API) through the official `openai` client. Frames go as base64 JPEG image parts. Calls
  run concurrently (at most `concurrency` at once) and are retried with exponential backoff
  and jitter on timeouts, connection errors, 429 and 5xx.
- `TransformersBackend`: a local Hugging Face image-text-to-text model (Qwen2-VL /
  Qwen2.5-VL: AutoModelForImageTextToText and AutoProcessor), on CPU or GPU, batched over
  frames; it reads the answer token's logits directly.

Both answer four questions:
- `true_probabilities(frames, prompt)`: for each frame, P(True) / (P(True) + P(False)) at the
  answer token, the probabilities of the token variants (" True", "True", "true", ...)
  summed. The OpenAI backend needs `logprobs` with `top_logprobs`; a server that returns
  none gets `NoLogprobsError`, never a made-up 0.5.
- `describe(frames, prompt)`: one text per frame (captions).
- `chat(messages)`: a text-only answer (the temporal labeller's text LLM, the judge);
- `ask(parts)`: an answer to interleaved text and frames (the harness's downstream model).

`usage` counts calls, prompt and completion tokens. The API key is never part of a repr, a
log line or an error message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import math
import os
import random
import threading
import time
from typing import Sequence

import numpy as np

from frameselect_jax import errors

TRUE_VARIANTS = (" True", "True", " true", "true")
FALSE_VARIANTS = (" False", "False", " false", "false")


class BackendError(RuntimeError):
  """A model call that failed for good (after its retries), or an answer that cannot be read."""


class NoAnswerTokenError(BackendError):
  """The model's answer holds no True/False token to read the probability at."""


class NoLogprobsError(errors.InputError):
  """The server returns no logprobs: it cannot give the spatial score."""


class TimeLimitError(BackendError):
  """The caller's deadline passed before the work was done."""


@dataclasses.dataclass
class Usage:
  calls: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0

  def __post_init__(self):
    self._lock = threading.Lock()

  def add(self, calls=1, prompt_tokens=0, completion_tokens=0):
    with self._lock:
      self.calls += calls
      self.prompt_tokens += prompt_tokens or 0
      self.completion_tokens += completion_tokens or 0

  def as_dict(self) -> dict:
    return {
      "calls": self.calls,
      "prompt_tokens": self.prompt_tokens,
      "completion_tokens": self.completion_tokens,
    }


def true_probability(probabilities: dict[str, float]) -> float | None:
  """P(True) / (P(True) + P(False)) from token -> probability (the variants summed); None
  when neither appears."""
  p_true = sum(probabilities.get(t, 0.0) for t in TRUE_VARIANTS)
  p_false = sum(probabilities.get(t, 0.0) for t in FALSE_VARIANTS)
  if p_true + p_false <= 0:
    return None
  return p_true / (p_true + p_false)


def jpeg_data_url(frame: np.ndarray, quality: int = 90) -> str:
  """uint8[H, W, 3] -> 'data:image/jpeg;base64,...' (an image part of a chat message)."""
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(np.asarray(frame, np.uint8)).save(buffer, format="JPEG", quality=quality)
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def user_message(frames: Sequence[np.ndarray], text: str) -> dict:
  """One user turn: the frames as image parts, then the text."""
  parts = [{"type": "image_url", "image_url": {"url": jpeg_data_url(f)}} for f in frames]
  return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _check_deadline(deadline: float | None):
  if deadline is not None and time.monotonic() > deadline:
    raise TimeLimitError("over the time limit")


# --- An OpenAI-compatible server ---


class OpenAIBackend:
  """A model behind an OpenAI-compatible endpoint.

  base_url and model name the server; api_key falls back to $OPENAI_API_KEY (a local vLLM
  or SGLang takes any). Each call is retried `retries` times on a timeout, a connection
  error, 429 or a 5xx, waiting backoff_s * 2**attempt seconds, jittered by +-50%.
  """

  def __init__(
    self,
    base_url: str,
    model: str,
    api_key: str | None = None,
    *,
    timeout_s: float = 120.0,
    retries: int = 4,
    backoff_s: float = 1.0,
    concurrency: int = 8,
    top_logprobs: int = 10,
    seed: int = 0,
  ):
    import openai

    self.base_url, self.model = base_url, model
    self.retries, self.backoff_s, self.top_logprobs = retries, backoff_s, top_logprobs
    self.concurrency = max(1, concurrency)
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)
    self._random = random.Random(seed)
    self.usage = Usage()
    self.retried = 0

  def __repr__(self):
    return f"OpenAIBackend({self.base_url}, model={self.model!r})"

  def _create(self, deadline=None, **request):
    import openai

    retryable = (
      openai.APITimeoutError,
      openai.APIConnectionError,
      openai.RateLimitError,
      openai.InternalServerError,
    )
    for attempt in range(self.retries + 1):
      _check_deadline(deadline)
      try:
        response = self._client.chat.completions.create(model=self.model, **request)
      except retryable as error:
        if attempt == self.retries:
          raise BackendError(
            f"{self.base_url}: {errors.one_line(error)} (after {self.retries} retries)"
          ) from None
        self.retried += 1
        pause = self.backoff_s * 2**attempt * self._random.uniform(0.5, 1.5)
        if deadline is not None:
          pause = min(pause, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        continue
      except openai.APIStatusError as error:  # 4xx other than 429: retrying will not help
        raise BackendError(f"{self.base_url}: {errors.one_line(error)}") from None
      usage = getattr(response, "usage", None)
      self.usage.add(
        prompt_tokens=getattr(usage, "prompt_tokens", 0),
        completion_tokens=getattr(usage, "completion_tokens", 0),
      )
      if not response.choices:
        raise BackendError(f"{self.base_url}: an answer without choices")
      return response.choices[0]
    raise AssertionError("unreachable")

  def _fan_out(self, function, inputs, deadline):
    """function(x) for each input, at most `concurrency` at once, in input order."""
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = [pool.submit(function, x) for x in inputs]
      try:
        return [f.result() for f in futures]
      except BaseException:
        for f in futures:
          f.cancel()
        raise

  def chat(self, messages, *, max_tokens: int = 256, deadline: float | None = None) -> str:
    choice = self._create(deadline, messages=messages, max_tokens=max_tokens, temperature=0.0)
    return choice.message.content or ""

  def ask(self, parts, *, max_tokens: int = 64, deadline=None) -> str:
    """One answer to a user turn of interleaved parts: text (str) and frames (uint8 arrays),
    in the order given (a downstream model sees the frames in temporal order)."""
    content = [
      {"type": "text", "text": p}
      if isinstance(p, str)
      else {"type": "image_url", "image_url": {"url": jpeg_data_url(p)}}
      for p in parts
    ]
    return self.chat(
      [{"role": "user", "content": content}], max_tokens=max_tokens, deadline=deadline
    )

  def describe(self, frames, prompt, *, max_tokens: int = 96, deadline=None) -> list[str]:
    return self._fan_out(
      lambda f: self.chat([user_message([f], prompt)], max_tokens=max_tokens, deadline=deadline),
      list(frames),
      deadline,
    )

  def true_probabilities(
    self, frames, prompt, *, max_tokens: int = 256, deadline=None
  ) -> list[float]:
    def one(frame):
      choice = self._create(
        deadline,
        messages=[user_message([frame], prompt)],
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        top_logprobs=self.top_logprobs,
      )
      content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
      if not content:
        raise NoLogprobsError(
          f"{self.base_url} (model {self.model!r}) returned no logprobs: the spatial score "
          f"reads P(True) from top_logprobs. Serve the model with vLLM, SGLang or llama.cpp's "
          f"server (they return logprobs; `transformers serve` does not), or label locally "
          f"with the transformers backend"
        )
      # The answer comes after the reasoning: the last True/False token.
      for token in reversed(content):
        if token.token.strip() in ("True", "False", "true", "false"):
          top = {t.token: math.exp(t.logprob) for t in token.top_logprobs or ()}
          top.setdefault(token.token, math.exp(token.logprob))
          return true_probability(top)
      raise NoAnswerTokenError(
        f"the answer has no True/False token: {(choice.message.content or '')[-120:]!r}"
      )

    return self._fan_out(one, list(frames), deadline)


# --- A local transformers model ---


class TransformersBackend:
  """A local image-text-to-text model (Qwen2-VL / Qwen2.5-VL), batched over frames.

  model_dir is a Hugging Face directory (weights, processor, tokenizer); or pass model and
  processor objects. P(True) is read from the logits of the token after the prompt (which
  ends in an answer cue, e.g. "Answer:"); with reasoning_tokens > 0 the model first writes
  that many tokens of reasoning (greedy), then the answer cue is appended.
  """

  def __init__(
    self,
    model_dir: str | None = None,
    *,
    model=None,
    processor=None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    answer_cue: str = "Answer:",
    reasoning_tokens: int = 0,
  ):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model is None:
      if not model_dir or not os.path.isdir(model_dir):
        raise errors.InputError(f"model directory {model_dir!r} does not exist")
      model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype))
      processor = processor or AutoProcessor.from_pretrained(model_dir)
    self.model = model.to(device).eval()
    self.processor, self.device, self.batch_size = processor, device, batch_size
    self.answer_cue, self.reasoning_tokens = answer_cue, reasoning_tokens
    self.tokenizer = getattr(processor, "tokenizer", processor)
    self.tokenizer.padding_side = "left"  # the last position is every row's next token
    self.variant_ids = tuple(
      [i for t in variants if (i := self._single_token(t)) is not None]
      for variants in (TRUE_VARIANTS, FALSE_VARIANTS)
    )
    if not all(self.variant_ids):
      raise errors.InputError(
        f"the tokenizer of {model_dir or type(model).__name__} has no single token for True "
        f"or False; P(True) cannot be read"
      )
    self.name = model_dir or type(model).__name__
    self.usage = Usage()

  def __repr__(self):
    return f"TransformersBackend({self.name}, device={self.device})"

  def _single_token(self, text):
    ids = self.tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None

  def _inputs(self, frames, prompt, suffix=""):
    from PIL import Image

    messages = [
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    ]
    text = self.processor.apply_chat_template(messages[0], add_generation_prompt=True)
    texts = [text + suffix] * len(frames)
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    return self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(
      self.device
    )

  def _batches(self, frames, deadline):
    frames = list(frames)
    for start in range(0, len(frames), self.batch_size):
      _check_deadline(deadline)
      yield frames[start : start + self.batch_size]

  def true_probabilities(self, frames, prompt, *, deadline=None, **_) -> list[float]:
    import torch

    out = []
    for batch in self._batches(frames, deadline):
      inputs = self._inputs(batch, prompt)
      with torch.no_grad():
        if self.reasoning_tokens:
          logits = self._logits_after_reasoning(inputs, len(batch))
        else:
          inputs = self._inputs(batch, prompt, suffix=self.answer_cue)
          logits = self.model(**inputs).logits[:, -1]
      self.usage.add(calls=len(batch), prompt_tokens=int(inputs["attention_mask"].sum()))
      probs = torch.softmax(logits.float(), dim=-1)
      p_true = probs[:, self.variant_ids[0]].sum(-1)
      p_false = probs[:, self.variant_ids[1]].sum(-1)
      out += (p_true / (p_true + p_false)).tolist()
    return out

  def _logits_after_reasoning(self, inputs, rows):
    """Next-token logits after the model's own reasoning (greedy, reasoning_tokens long, the
    padding after an early end masked out) and the answer cue."""
    import torch

    length = inputs["input_ids"].shape[1]
    generated = self.model.generate(**inputs, max_new_tokens=self.reasoning_tokens, do_sample=False)
    cue = self.tokenizer(
      [self.answer_cue] * rows, add_special_tokens=False, return_tensors="pt"
    ).input_ids.to(self.device)
    new = torch.cat([generated[:, length:], cue], dim=1)
    pad = self.tokenizer.pad_token_id
    new_mask = (new != pad).long() if pad is not None else torch.ones_like(new)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # Qwen2-VL: 1 at image tokens; the new ones are text
      extra["mm_token_type_ids"] = torch.cat(
        [extra["mm_token_type_ids"], torch.zeros_like(new)], dim=1
      )
    return self.model(
      input_ids=torch.cat([inputs["input_ids"], new], dim=1),
      attention_mask=torch.cat([inputs["attention_mask"], new_mask], dim=1),
      **extra,
    ).logits[:, -1]

  def describe(self, frames, prompt, *, max_tokens: int = 96, deadline=None) -> list[str]:
    import torch

    out = []
    for batch in self._batches(frames, deadline):
      inputs = self._inputs(batch, prompt)
      with torch.no_grad():
        generated = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
      new = generated[:, inputs["input_ids"].shape[1] :]
      self.usage.add(calls=len(batch), completion_tokens=int(new.numel()))
      out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
    return out

  def ask(self, parts, *, max_tokens: int = 64, deadline=None) -> str:
    """One answer to interleaved text (str) and frames (uint8 arrays), the frames passed as
    images in the order given, one generation."""
    import torch
    from PIL import Image

    _check_deadline(deadline)
    content = [
      {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts
    ]
    text = self.processor.apply_chat_template(
      [{"role": "user", "content": content}], add_generation_prompt=True
    )
    images = [Image.fromarray(np.asarray(p, np.uint8)) for p in parts if not isinstance(p, str)]
    inputs = self.processor(
      text=[text], images=images or None, return_tensors="pt", padding=True
    ).to(self.device)
    with torch.no_grad():
      generated = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    self.usage.add(prompt_tokens=int(inputs["input_ids"].numel()), completion_tokens=len(new))
    return self.tokenizer.decode(new, skip_special_tokens=True)

  def video_inputs(self, frames) -> dict:
    """Qwen2-VL's video inputs for frames uint8[T, H, W, 3] (one size), made with its image
    processor: each frame resized and normalised as an image, then consecutive frames paired
    along the temporal patch (the last repeated when T is odd), exactly as its video
    processor lays them out. (That processor needs torchvision, which the image processor
    does not.) Returns pixel_values_videos (grid_t * grid_h * grid_w, C * tps * p * p) and
    video_grid_thw [[grid_t, grid_h, grid_w]]."""
    import torch

    ip = self.processor.image_processor
    tps, p = ip.temporal_patch_size, ip.patch_size
    frames = [np.asarray(f, np.uint8) for f in frames]
    if len(frames) % tps:
      frames += [frames[-1]] * (tps - len(frames) % tps)
    images = ip(images=frames, return_tensors="np")
    grids = images["image_grid_thw"]
    if len({tuple(g) for g in grids.tolist()}) != 1:
      raise ValueError("the frames of one video must share a size")
    _, grid_h, grid_w = (int(v) for v in grids[0])
    per_frame = images["pixel_values"].reshape(len(frames), grid_h * grid_w, -1, tps, p, p)
    first_slice = per_frame[:, :, :, 0]  # an image repeats itself along the temporal patch
    grid_t = len(frames) // tps
    pairs = first_slice.reshape(grid_t, tps, grid_h * grid_w, -1, p, p).transpose(0, 2, 3, 1, 4, 5)
    return {
      "pixel_values_videos": torch.as_tensor(pairs.reshape(grid_t * grid_h * grid_w, -1)),
      "video_grid_thw": torch.as_tensor([[grid_t, grid_h, grid_w]]),
    }

  def ask_video(self, frames, timestamps, prompt, *, max_tokens: int = 64, deadline=None) -> str:
    """One answer to a video (the frames, in temporal order, passed as Qwen2-VL's video input)
    and a prompt that starts with the frames' timestamps."""
    import torch

    _check_deadline(deadline)
    video = self.video_inputs(frames)
    stamps = ", ".join(f"{t:.1f}" for t in timestamps)
    content = [
      {"type": "video"},
      {"type": "text", "text": f"The video's frames are at {stamps} seconds.\n{prompt}"},
    ]
    text = self.processor.apply_chat_template(
      [{"role": "user", "content": content}], add_generation_prompt=True
    )
    pad = "<|video_pad|>"
    merge = self.processor.image_processor.merge_size
    count = int(video["video_grid_thw"].prod()) // merge**2
    if text.count(pad) != 1:
      raise errors.InputError(f"{self.name}: its chat template has no {pad} for a video")
    inputs = self.tokenizer([text.replace(pad, pad * count)], return_tensors="pt")
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = 2 * (ids == self.tokenizer.convert_tokens_to_ids(pad)).long()
    inputs = {**inputs, **video}
    inputs = {k: v.to(self.device) for k, v in inputs.items()}
    with torch.no_grad():
      generated = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = generated[0, ids.shape[1] :]
    self.usage.add(prompt_tokens=int(ids.numel()), completion_tokens=len(new))
    return self.tokenizer.decode(new, skip_special_tokens=True)

  def chat(self, messages, *, max_tokens: int = 256, deadline=None) -> str:
    import torch

    _check_deadline(deadline)
    text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = self.tokenizer([text], return_tensors="pt", add_special_tokens=False).to(self.device)
    with torch.no_grad():
      generated = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    self.usage.add(prompt_tokens=int(inputs["input_ids"].numel()), completion_tokens=len(new))
    return self.tokenizer.decode(new, skip_special_tokens=True)
