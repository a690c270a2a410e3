"""The two backends against real implementations: a tiny random Qwen2-VL run locally through
transformers (tests/tiny_vlm.py), and `transformers serve` on loopback serving a tiny random
LLaVA through the official openai client (tests/serve_fixture.py). The loopback server of
our own (logprobs, faults) is in test_label.py."""

import numpy as np
import pytest
from serve_fixture import save_tiny_llava, transformers_serve
from tiny_vlm import (
  image_only_processor_class,
  load_tiny_qwen2vl,
  qwen2vl_inputs,
  save_tiny_qwen2vl,
)

from data import labelers
from frameselect_jax import mllm, video, videoqa

PROMPT = "Is there a person? Answer True or False."


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
  path = save_tiny_qwen2vl(str(tmp_path_factory.mktemp("qwen2vl")))
  # AutoProcessor cannot load a Qwen2-VL here: its video processor needs torchvision, which
  # does not load against the CPU torch. An image-only Qwen2VLProcessor stands in for it.
  processor = image_only_processor_class().from_pretrained(path)
  return path, mllm.TransformersBackend(path, processor=processor, batch_size=3)


def frames(count, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(count)]


def test_local_p_true_is_the_softmax_of_the_two_answers_logits(qwen2vl):
  import torch

  path, backend = qwen2vl
  images = frames(5)
  got = backend.true_probabilities(images, PROMPT)  # batches of 3 and 2, left-padded
  model, tokenizer, image_processor = load_tiny_qwen2vl(path)
  # The answer's variants: "True", " True", "true", " true" (and False's), one token each here.
  single = lambda words: [tokenizer.encode(w, add_special_tokens=False) for w in words]
  true_ids = [ids[0] for ids in single(("True", " True", "true", " true"))]
  false_ids = [ids[0] for ids in single(("False", " False", "false", " false"))]
  assert all(len(ids) == 1 for ids in single(("True", " True", "true", " true", "False")))
  cue = tokenizer("Answer:", add_special_tokens=False, return_tensors="pt").input_ids
  for image, p in zip(images, got):
    inputs = qwen2vl_inputs((tokenizer, image_processor), [image], [PROMPT])  # alone
    inputs["input_ids"] = torch.cat([inputs["input_ids"], cue], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], 0 * cue], 1)
    with torch.no_grad():
      logits = model(**inputs).logits[0, -1].double()
    # Each answer's variants pooled into one logit, then a softmax over the two.
    answers = torch.stack([logits[true_ids].logsumexp(0), logits[false_ids].logsumexp(0)])
    assert 0 <= p <= 1
    assert p == pytest.approx(torch.softmax(answers, 0)[0].item(), abs=1e-5)
  assert len(set(np.round(got, 6))) > 1  # the frames differ, and so do their scores


def test_local_reasoning_captions_and_chat_run(qwen2vl):
  path, backend = qwen2vl
  thinking = mllm.TransformersBackend(
    path, processor=backend.processor, batch_size=2, reasoning_tokens=4
  )
  scores = thinking.true_probabilities(frames(3), PROMPT)
  assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
  # The spatial labeller over a video's candidates: a score per valid one, 0 on padding.
  n = 4
  valid = np.array([True, True, True, False])
  stack = np.stack(frames(n))
  candidates = video.Candidates(stack, np.arange(n) * 1.0, valid, np.arange(n), "", 3.0)
  item = videoqa.Item(benchmark="b", qid="q", video="v.mp4", question="Is there a person?")
  spatial = labelers.SpatialLabeler(backend)(item, candidates)["spatial"]
  assert spatial[3] == 0 and np.all((spatial[:3] > 0) & (spatial[:3] < 1))
  captions = backend.describe(frames(2), "Describe the picture.", max_tokens=4)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  assert isinstance(backend.chat([{"role": "user", "content": "Describe"}], max_tokens=4), str)
  assert backend.usage.calls >= 5


@pytest.mark.slow
def test_captions_and_the_text_llm_through_transformers_serve(tmp_path):
  model_dir = save_tiny_llava(str(tmp_path / "llava"))
  with transformers_serve(model_dir) as (url, model):
    client = mllm.OpenAIBackend(url, model, "sk-unused", timeout_s=60, concurrency=2)
    captions = client.describe(frames(3), "Describe the frame.", max_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    answer = client.chat([{"role": "user", "content": "Which frames?"}], max_tokens=6)
    assert isinstance(answer, str) and answer
    assert client.usage.calls == 4 and client.usage.prompt_tokens > 0
    # The temporal labeller through it: a random model's answer holds no usable index, so it
    # is asked again, then the item fails with the reason (never a silent label).
    item = videoqa.Item(benchmark="b", qid="q", video="v.mp4", question="Where is it?")
    n = 4
    stack = np.stack(frames(n))
    candidates = video.Candidates(
      stack, np.arange(n) * 1.0, np.ones(n, bool), np.arange(n), "", 4.0
    )
    temporal = labelers.TemporalLabeler(
      client, client, labelers.CaptionCache(None), caption_tokens=6, answer_tokens=6
    )
    try:
      parts = temporal(item, candidates)
      assert set(parts["temporal_indices"]) <= set(range(n))
    except labelers.LabelError as e:
      assert "asked twice" in str(e) and temporal.corrected == 1
    # A real server that returns no logprobs: the spatial score refuses, naming it.
    with pytest.raises(mllm.NoLogprobsError, match="transformers serve"):
      client.true_probabilities(frames(1), PROMPT, max_tokens=4)
