"""A small OpenAI-compatible chat server of our own, on loopback, for what `transformers serve`
cannot show: logprobs with top_logprobs, and faults (timeouts, 500, 429, malformed answers).

It answers like a deterministic multimodal LLM:
- a request with logprobs (the spatial judge): some reasoning, then "Answer: True", with
  top_logprobs at the answer token where P(True) = the mean pixel level of the image / 255
  (so a test can compute the expected label from the frame itself);
- a request with an image and no logprobs (a caption): "a frame of level <mean level>";
- a text-only request (the temporal text LLM): `text_answer(prompt)`, by default the
  indices of the two brightest captions as a JSON list;
- with `image_answer(request)` set, a request with images gets its answer (a downstream
  model; the request is recorded in `requests` for the test to inspect).

`faults` is a list consumed one per request, first: "500", "429", "timeout" (sleeps past
the client's timeout), "nologprobs" (answers without logprobs), "garbage" (text without any
index) or None (answer normally). The server stops when the `serve` block ends, and by
itself after `lifetime_s` whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def image_level(url: str) -> float:
  from PIL import Image

  data = base64.b64decode(url.split(",", 1)[1])
  return float(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean())


def brightest_captions(prompt: str, count: int = 2) -> str:
  levels = {int(i): float(v) for i, v in re.findall(r"\[(\d+)\] a frame of level ([\d.]+)", prompt)}
  best = sorted(sorted(levels, key=lambda i: -levels[i])[:count])
  return f"The most helpful frames are {json.dumps(best)}."


class FakeServer:
  def __init__(
    self,
    faults=(),
    text_answer=brightest_captions,
    timeout_sleep_s=2.0,
    delay_s=0.0,
    image_answer=None,
  ):
    self.faults = list(faults)
    self.image_answer = image_answer  # request -> text, for requests with images (a downstream)
    self.delay_s = delay_s  # every answer takes this long (a slow server)
    self.text_answer = text_answer
    self.timeout_sleep_s = timeout_sleep_s
    self.requests: list[dict] = []
    self.lock = threading.Lock()

  def respond(self, request: dict):
    """(status, body dict or None) for one request."""
    with self.lock:
      self.requests.append(request)
      fault = self.faults.pop(0) if self.faults else None
    time.sleep(self.delay_s)
    if fault == "500":
      return 500, {"error": {"message": "internal error", "type": "server_error"}}
    if fault == "429":
      return 429, {"error": {"message": "slow down", "type": "rate_limit"}}
    if fault == "timeout":
      time.sleep(self.timeout_sleep_s)
    content = request["messages"][-1]["content"]
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    prompt = "\n".join(m["content"] for m in request["messages"] if isinstance(m["content"], str))
    prompt += "\n".join(p["text"] for p in parts if p["type"] == "text")
    logprobs = None
    if request.get("logprobs") and fault != "nologprobs":
      p_true = min(max(image_level(images[0]) / 255.0, 1e-6), 1 - 1e-6)
      text = "The frame shows something. Answer: True"
      top = [
        {"token": " True", "logprob": math.log(p_true), "bytes": None},
        {"token": " False", "logprob": math.log(1 - p_true), "bytes": None},
      ]
      tokens = ["The", " frame", " shows", " something", ".", " Answer", ":", " True"]
      logprobs = {
        "content": [
          {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": top if t == " True" else []}
          for t in tokens
        ]
      }
    elif request.get("logprobs"):
      text = "Answer: True"
    elif images and self.image_answer is not None:
      text = self.image_answer(request)
    elif images:
      text = f"a frame of level {image_level(images[0]):.1f}"
    elif fault == "garbage":
      text = "I cannot tell which frames."
    else:
      text = self.text_answer(prompt)
    choice = {
      "index": 0,
      "message": {"role": "assistant", "content": text},
      "finish_reason": "stop",
      "logprobs": logprobs,
    }
    usage = {"prompt_tokens": 10 + 50 * len(images), "completion_tokens": 8, "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    body = {
      "id": "fake",
      "object": "chat.completion",
      "created": 0,
      "model": request.get("model", ""),
      "choices": [choice],
      "usage": usage,
    }
    return 200, body


@contextlib.contextmanager
def serve(fake: FakeServer, lifetime_s: float = 300.0):
  """Runs `fake` on 127.0.0.1 (a free port); yields its base URL ending in /v1."""

  class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
      length = int(self.headers.get("Content-Length", 0))
      request = json.loads(self.rfile.read(length))
      fake.headers = {k.lower(): v for k, v in self.headers.items()}
      status, body = fake.respond(request)
      data = json.dumps(body).encode()
      try:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
      except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
        pass

    def log_message(self, *args):
      pass

  server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  stop = threading.Timer(lifetime_s, server.shutdown)
  stop.daemon = True
  stop.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
  finally:
    stop.cancel()
    server.shutdown()
    server.server_close()
