"""The evaluation harness (python -m eval): a full run on the needle benchmark with the pixel
reader, resumed after an interruption; every benchmark's fixture through it; the downstream
adapters against a recording loopback server of our own, `transformers serve` and a tiny
random Qwen2-VL."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from fake_openai_server import FakeServer, serve

from configs.eval import base as eval_base
from configs.eval import needle as needle_config
from eval import downstream, harness
from frameselect_jax import mllm, selection_file, synthetic, videoqa

N = 16


@pytest.fixture(scope="module")
def needle(tmp_path_factory):
  root = tmp_path_factory.mktemp("needle")
  settings = synthetic.NeedleSettings(duration_s=4.0, fps=8, size=64, needles=2, distractors=1)
  synthetic.write_needle_benchmark(str(root), {"test": 6}, settings, progress=False)
  return str(root)


def needle_eval(root, out, **changes):
  c = needle_config.get_config("random")
  c.root, c.output = root, str(out)
  c.num_candidates = N  # the random tiny selector's n
  c.ks = (1, 2, 4)
  c.progress = False
  c.report.resamples = 500
  for key, value in changes.items():
    c[key] = value
  return c


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_a_needle_run_resumed_after_an_interruption_writes_every_report(
  needle, tmp_path, monkeypatch
):
  whole = harness.run(needle_eval(needle, tmp_path / "whole"))
  calls = []
  real = downstream.NeedleDownstream.answer

  def interrupted(self, *args):
    calls.append(1)
    if len(calls) == 20:
      raise KeyboardInterrupt
    return real(self, *args)

  monkeypatch.setattr(downstream.NeedleDownstream, "answer", interrupted)
  config = needle_eval(needle, tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    harness.run(config)
  partial = read_jsonl(tmp_path / "resumed" / "results.jsonl")
  assert 0 < len(partial) < 12 * 5 * 3
  monkeypatch.setattr(downstream.NeedleDownstream, "answer", real)
  out = harness.run(config)
  results = read_jsonl(os.path.join(out, "results.jsonl"))
  keys = [(r["qid"], r["strategy"], r["k"]) for r in results]
  assert len(keys) == len(set(keys)) == 12 * 5 * 3  # questions x strategies x ks
  expected = {
    (r["qid"], r["strategy"], r["k"]): r["correct"] for r in read_jsonl(f"{whole}/results.jsonl")
  }
  assert {(r["qid"], r["strategy"], r["k"]): r["correct"] for r in results} == expected
  # The selection file is valid, written for every (question, strategy, k), and the answers
  # were given exactly those frames.
  selections = selection_file.read(os.path.join(out, "selections.jsonl"))
  assert len(selections) == 12 * 5 * 3
  frames = {(s["qid"], s["strategy"], s["k"]): len(s["indices"]) for s in selections}
  assert all(frames[r["qid"], r["strategy"], r["k"]] == r["frames"] for r in results)
  # report.json: the numbers are the results' own.
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  for row in report["table"]:
    mine = [r["correct"] for r in results if (r["strategy"], r["k"]) == (row["strategy"], row["k"])]
    assert row["all"]["accuracy"] == pytest.approx(np.mean(mine))
    assert row["all"]["low"] <= row["all"]["accuracy"] <= row["all"]["high"]
    assert row["items"] == 12 and row["scorable"] == 12
    assert set(row["breakdown"]["color"]) <= set(synthetic.NEEDLE_COLORS)
  paired = {(p["strategy"], p["k"]) for p in report["paired"]}
  others = ("random", "pixel_diff", "top_k", "nms_greedy")
  assert paired == {(s, k) for s in others for k in (1, 2, 4)}
  assert report["selection_file_sha256"] and report["versions"]["jax"]
  assert report["config"]["strategies"] == "uniform,random,pixel_diff,top_k,nms_greedy"
  markdown = open(os.path.join(out, "report.md")).read()
  assert re.search(r"\| nms_greedy \| 4 \| [\d.]+ \|", markdown) and "McNemar" in markdown
  from PIL import Image

  with Image.open(os.path.join(out, "accuracy_vs_frames.png")) as image:
    assert image.size[0] > 300
  # More frames, more needles seen: uniform's accuracy does not fall as k grows (the reader
  # guesses, 1 in 4, when no given frame shows the card).
  uniform = {r["k"]: r["all"]["accuracy"] for r in report["table"] if r["strategy"] == "uniform"}
  assert uniform[4] >= uniform[1]


def test_shards_merge_into_one_report(needle, tmp_path):
  config = needle_eval(needle, tmp_path / "sharded", strategies="uniform,random")
  outs = [harness.run(config, (i, 2)) for i in range(2)]
  assert [os.path.basename(o) for o in outs] == ["shard-0-of-2", "shard-1-of-2"]
  merged = harness.merge(outs, str(tmp_path / "merged"), config)
  single = harness.run(needle_eval(needle, tmp_path / "single", strategies="uniform,random"))
  key = lambda r: (r["qid"], r["strategy"], r["k"], r["correct"])
  assert sorted(map(key, read_jsonl(f"{merged}/results.jsonl"))) == sorted(
    map(key, read_jsonl(f"{single}/results.jsonl"))
  )


def test_a_selection_file_made_elsewhere_is_answered_as_it_is(needle, tmp_path):
  first = harness.run(needle_eval(needle, tmp_path / "first", strategies="uniform"))
  config = needle_eval(needle, tmp_path / "again", strategies=f"file:{first}/selections.jsonl")
  again = harness.run(config)
  picks = lambda out: {
    (s["qid"], s["k"]): s["indices"] for s in selection_file.read(f"{out}/selections.jsonl")
  }
  assert picks(again) == picks(first)


def test_missing_and_undecodable_videos_stay_in_the_denominator(tmp_path):
  synthetic.needle_video(tmp_path / "clip.mp4", num_frames=16, fps=8, size=64, seed=0)
  (tmp_path / "empty.mp4").write_bytes(b"")
  lines = [
    {"qid": q, "video": v, "question": "Which?", "options": ["x", "y"], "answer": "x"}
    for q, v in (("a", "clip.mp4"), ("b", "empty.mp4"), ("c", "gone.mp4"))
  ]
  (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  fake = FakeServer(image_answer=lambda request: "The answer is (A).")
  c = eval_base.base("jsonl", root=str(tmp_path))
  c.output, c.strategies, c.ks, c.num_candidates = str(tmp_path / "out"), "uniform", (2,), 8
  c.decode.image_size, c.progress, c.report.resamples = 32, False, 200
  with serve(fake) as url:
    c.downstream.openai.base_url, c.downstream.openai.model = url, "fake-vlm"
    out = harness.run(c)
  with open(f"{out}/report.json") as f:
    row = json.load(f)["table"][0]
  assert (row["items"], row["scorable"], row["missing_video"], row["undecodable"]) == (3, 1, 1, 1)
  assert row["all"]["accuracy"] == pytest.approx(1 / 3)
  assert row["over_scorable"]["accuracy"] == 1.0


# --- Every benchmark's fixture through the harness ---


def _fixture(name, root, clip):
  """A two-question fixture in the benchmark's released layout; returns the config changes."""
  place = lambda *paths: [
    (os.makedirs(os.path.dirname(p), exist_ok=True), shutil.copy(clip, p)) for p in paths
  ]
  write = lambda rel, data: (
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True),
    open(os.path.join(root, rel), "w").write(data if isinstance(data, str) else json.dumps(data)),
  )
  options = ["red", "green", "blue", "white", "black"]
  if name == "nextqa":
    header = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
    rows = "".join(f"v1,16,64,64,what colour {q},1,{q},DC,{','.join(options)}\n" for q in (0, 1))
    write("val.csv", header + rows)
    write("map_vid_vidorID.json", {"v1": "0001/v1"})
    place(os.path.join(root, "NExTVideo", "0001", "v1.mp4"))
  elif name == "egoschema":
    write(
      "questions.json",
      [
        {"q_uid": u, "question": "what?", **{f"option {i}": o for i, o in enumerate(options)}}
        for u in ("u1", "u2")
      ],
    )
    write("subset_answers.json", {"u1": 1, "u2": 1})
    place(*(os.path.join(root, "videos", f"{u}.mp4") for u in ("u1", "u2")))
  elif name == "activitynet_qa":
    write(
      "test_q.json",
      [{"video_name": "x", "question": "what?", "question_id": f"v_x_{i}"} for i in (0, 1)],
    )
    write(
      "test_a.json", [{"answer": "green", "type": 4, "question_id": f"v_x_{i}"} for i in (0, 1)]
    )
    place(os.path.join(root, "videos", "v_x.mp4"))
  elif name == "longvideobench":
    write(
      "lvb_val.json",
      [
        {
          "id": f"x_{i}",
          "video_path": "x.mp4",
          "question": "what?",
          "candidates": options,
          "correct_choice": 1,
          "duration": 2.0,
          "duration_group": 15,
          "question_category": "S2E",
          "topic_category": "t",
          "level": "L1",
        }
        for i in (0, 1)
      ],
    )
    place(os.path.join(root, "videos", "x.mp4"))
  elif name == "videomme":
    lettered = [f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options[:4])]
    write(
      "videomme/test.json",
      [
        {
          "question_id": f"001-{i}",
          "videoID": "yt",
          "duration": "short",
          "domain": "d",
          "sub_category": "s",
          "task_type": "t",
          "question": "what?",
          "options": lettered,
          "answer": "B",
        }
        for i in (1, 2)
      ],
    )
    place(os.path.join(root, "data", "yt.mp4"))
  elif name == "mlvu":
    write(
      "json/1_plotQA.json",
      [
        {
          "video": "m.mp4",
          "duration": 2,
          "question": "what?",
          "candidates": options,
          "answer": "green",
          "question_type": "plotQA",
        }
      ]
      * 2,
    )
    place(os.path.join(root, "video", "1_plotQA", "m.mp4"))
  elif name == "mvbench":
    write(
      "json/action_sequence.json",
      [
        {
          "video": "s.mp4",
          "question": "what?",
          "candidates": options,
          "answer": "green",
          "start": 0.0,
          "end": 1.5,
        }
      ]
      * 2,
    )
    place(os.path.join(root, "video", "star", "Charades_v1_480", "s.mp4"))
  elif name == "jsonl":
    write(
      "test.jsonl",
      "".join(
        json.dumps(
          {
            "qid": str(i),
            "video": "c.mp4",
            "question": "what?",
            "options": options,
            "answer": "green",
          }
        )
        + "\n"
        for i in (0, 1)
      ),
    )
    place(os.path.join(root, "c.mp4"))


@pytest.mark.parametrize(
  "name",
  [
    "nextqa",
    "egoschema",
    "activitynet_qa",
    "longvideobench",
    "videomme",
    "mlvu",
    "mvbench",
    "jsonl",
  ],
)
def test_every_benchmark_through_the_harness(name, tmp_path):
  clip = str(tmp_path / "clip.mp4")
  synthetic.needle_video(clip, num_frames=16, fps=8, size=64, seed=0)
  root = str(tmp_path / name)
  _fixture(name, root, clip)
  fake = FakeServer(
    image_answer=lambda request: "The answer is (B).",
    text_answer=lambda prompt: "{'pred': 'yes', 'score': 4}",
  )
  c = eval_base.base(name, root=root)
  c.output, c.strategies, c.ks, c.num_candidates = (
    str(tmp_path / "out"),
    "uniform,random",
    (2, 4),
    8,
  )
  c.decode.image_size, c.progress, c.report.resamples = 32, False, 200
  with serve(fake) as url:
    c.downstream.openai.base_url, c.downstream.openai.model = url, "fake-vlm"
    c.judge.base_url, c.judge.model = url, "fake-judge"
    out = harness.run(c)
  results = read_jsonl(f"{out}/results.jsonl")
  assert len(results) == 2 * 2 * 2 and all(r["status"] == "ok" for r in results)
  # Option B is the right one in every fixture; ActivityNet-QA's judge says yes.
  assert all(r["correct"] and r["scorable"] for r in results), results[0]
  items = videoqa.load(name, root)
  assert {r["qid"] for r in results} == {i.qid for i in items}


# --- The downstream adapters ---


def test_the_frames_arrive_in_temporal_order_with_their_timestamps_through_retries():
  fake = FakeServer(faults=["429", "500"], image_answer=lambda request: "(C)")
  frames = [np.full((32, 32, 3), level, np.uint8) for level in (30, 90, 150, 210)]
  stamps = [0.5, 2.0, 3.25, 7.0]
  with serve(fake) as url:
    backend = mllm.OpenAIBackend(url, "fake-vlm", "k", timeout_s=5, backoff_s=0.01)
    model = downstream.ModelDownstream(
      backend, "fake", eval_base.MULTIPLE_CHOICE, eval_base.OPEN_ENDED
    )
    reply = model.answer(frames, stamps, "Which colour?", ["red", "green", "blue"])
  assert reply["text"] == "(C)" and backend.retried == 2 and reply["prompt_tokens"] > 0
  content = fake.requests[-1]["messages"][0]["content"]
  texts = [p["text"] for p in content if p["type"] == "text"]
  images = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
  assert texts[:4] == [
    "Frame 1 at 0.5 s:",
    "Frame 2 at 2.0 s:",
    "Frame 3 at 3.2 s:",
    "Frame 4 at 7.0 s:",
  ]
  assert [p["type"] for p in content] == ["text", "image_url"] * 4 + ["text"]
  from fake_openai_server import image_level

  assert [round(image_level(u)) for u in images] == [30, 90, 150, 210]
  assert "A. red\nB. green\nC. blue" in texts[-1] and "Which colour?" in texts[-1]


def test_numbered_frames_carry_their_index_and_time():
  frame = np.full((64, 64, 3), 128, np.uint8)
  marked = downstream.number_frame(frame, 3, 12.5)
  assert marked.shape == frame.shape and (marked != frame).any()
  assert (marked[40:, 40:] == 128).all()  # only the corner label changes


def test_the_response_cache_answers_a_rerun(tmp_path):
  cache = downstream.ResponseCache(str(tmp_path / "cache"))
  frames = [np.zeros((8, 8, 3), np.uint8)]
  key = cache.key("m", "p", frames, [1.0])
  assert cache.get(key) is None
  cache.put(key, {"text": "(A)"})
  assert downstream.ResponseCache(str(tmp_path / "cache")).get(key) == {"text": "(A)"}
  assert cache.key("m", "p", [np.ones((8, 8, 3), np.uint8)], [1.0]) != key
  assert cache.key("other", "p", frames, [1.0]) != key


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
  from tiny_vlm import image_only_processor_class, save_tiny_qwen2vl

  path = save_tiny_qwen2vl(str(tmp_path_factory.mktemp("qwen2vl")))
  processor = image_only_processor_class().from_pretrained(path)
  return mllm.TransformersBackend(path, processor=processor)


def test_the_local_qwen2vl_gets_the_frames_as_a_video(qwen2vl):
  rng = np.random.default_rng(0)
  a, b, c = (rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(3))
  image_processor = qwen2vl.processor.image_processor
  as_image = lambda f: image_processor(images=[f], return_tensors="np")["pixel_values"]
  # A still video (one frame twice) is laid out exactly as that frame as an image...
  still = qwen2vl.video_inputs([a, a])
  np.testing.assert_array_equal(still["pixel_values_videos"].numpy(), as_image(a))
  assert still["video_grid_thw"].tolist() == [[1, 4, 4]]
  # ...and a moving one pairs consecutive frames along the temporal patch (the last repeated).
  moving = qwen2vl.video_inputs([a, b, c])
  assert moving["video_grid_thw"].tolist() == [[2, 4, 4]]
  patches = moving["pixel_values_videos"].numpy().reshape(2, 16, 3, 2, 14, 14)
  single = lambda f: as_image(f).reshape(16, 3, 2, 14, 14)[:, :, 0]
  for t, (first, second) in enumerate(((a, b), (c, c))):
    np.testing.assert_array_equal(patches[t, :, :, 0], single(first))
    np.testing.assert_array_equal(patches[t, :, :, 1], single(second))
  model = downstream.ModelDownstream(
    qwen2vl, "tiny", eval_base.MULTIPLE_CHOICE, eval_base.OPEN_ENDED, max_tokens=4, as_video=True
  )
  reply = model.answer([a, b, c], [0.0, 1.0, 2.0], "Which?", ["x", "y"])
  assert isinstance(reply["text"], str) and reply["prompt_tokens"] > 0
  # 2 x 4 x 4 patches merged 2 x 2: 8 video tokens, and the timestamps in the text.
  as_images = downstream.ModelDownstream(
    qwen2vl, "tiny", eval_base.MULTIPLE_CHOICE, eval_base.OPEN_ENDED, max_tokens=4
  ).answer([a, b, c], [0.0, 1.0, 2.0], "Which?", ["x", "y"])
  assert isinstance(as_images["text"], str) and as_images["prompt_tokens"] > 0


@pytest.mark.slow
def test_end_to_end_through_transformers_serve(tmp_path):
  """A tiny random Qwen2-VL served on loopback by `transformers serve` (its processor as the
  model directory's own code: the stock one needs torchvision here), answering through the
  harness."""
  from serve_fixture import transformers_serve
  from tiny_vlm import make_servable, save_tiny_qwen2vl

  synthetic.needle_video(tmp_path / "clip.mp4", num_frames=16, fps=8, size=64, seed=0)
  lines = [
    {"qid": "a", "video": "clip.mp4", "question": "Which?", "options": ["x", "y"], "answer": "x"}
  ]
  (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  c = eval_base.base("jsonl", root=str(tmp_path))
  c.output, c.strategies, c.ks, c.num_candidates = str(tmp_path / "out"), "uniform", (2,), 8
  c.decode.image_size, c.progress, c.report.resamples = 56, False, 200
  c.downstream.max_tokens = 6
  model_dir = make_servable(save_tiny_qwen2vl(str(tmp_path / "qwen2vl")))
  with transformers_serve(model_dir, trust_remote_code=True) as (url, model):
    c.downstream.openai.base_url, c.downstream.openai.model = url, model
    out = harness.run(c)
  (result,) = read_jsonl(f"{out}/results.jsonl")
  assert result["status"] == "ok" and isinstance(result["answer"], str)
  assert result["prompt_tokens"] > 0
  # A random model's answer: parsed when it names an option, else listed as unparseable.
  with open(f"{out}/report.json") as f:
    row = json.load(f)["table"][0]
  assert row["unparseable"] == (0 if result["parsed"] else 1)


def _generic_items(tmp_path, count=2):
  synthetic.needle_video(tmp_path / "clip.mp4", num_frames=16, fps=8, size=64, seed=0)
  lines = [
    {"qid": str(i), "video": "clip.mp4", "question": "Which?", "options": ["x", "y"], "answer": "y"}
    for i in range(count)
  ]
  (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  c = eval_base.base("jsonl", root=str(tmp_path))
  c.output, c.ks, c.num_candidates = str(tmp_path / "out"), (2,), 8
  c.decode.image_size, c.progress, c.report.resamples = 32, False, 200
  return c


def test_gens_names_frames_through_a_server_and_falls_back_when_unreadable(tmp_path):
  from frameselect_jax import peers

  answers = {"0": '```json\n{"3": 5, "4-5": 4}\n```', "1": "I would look at the middle."}

  def reply(request):
    content = request["messages"][0]["content"]
    text = content[-1]["text"]
    if peers.GENS_INSTRUCTION in text:  # GenS: numbered candidates, then the question
      assert [p["text"] for p in content if p["type"] == "text"][:2] == ["[0]", "[1]"]
      return answers[fake.current]
    return "(B)"

  fake = FakeServer(image_answer=reply)
  c = _generic_items(tmp_path)
  c.strategies = "uniform,gens_top_k,gens_nms"
  with serve(fake) as url:
    c.downstream.openai.base_url, c.downstream.openai.model = url, "fake-vlm"
    c.gens.base_url, c.gens.model = url, "fake-gens"
    fake.current = "0"
    items = videoqa.load("jsonl", str(tmp_path))
    # One question at a time, so the fake knows which answer GenS gives.
    c.root = str(tmp_path / "one.jsonl")
    (tmp_path / "one.jsonl").write_text(json.dumps(items[0].to_json()) + "\n")
    harness.run(c)
    fake.current = "1"
    (tmp_path / "one.jsonl").write_text(json.dumps({**items[1].to_json(), "qid": "1"}) + "\n")
    second = harness.run(c)
  picks = {(s["qid"], s["strategy"]): s for s in selection_file.read(f"{second}/selections.jsonl")}
  assert picks["0", "gens_top_k"]["indices"] == [3, 4]  # 5, then 4 and 4: the earlier
  assert picks["0", "gens_nms"]["indices"] == [3, 5]  # 4 is within n // (4k) = 1 of 3
  assert picks["1", "gens_top_k"]["fallback"].startswith("uniform: GenS's answer could not be used")
  assert picks["1", "gens_top_k"]["indices"] == picks["1", "uniform"]["indices"]
  with open(f"{second}/report.json") as f:
    rows = {(r["strategy"], r["k"]): r for r in json.load(f)["table"]}
  assert rows["gens_top_k", 2]["fallbacks"] == 1 and rows["uniform", 2]["fallbacks"] == 0
  assert "Fallbacks" in open(f"{second}/report.md").read()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  """A tiny random SiglipModel directory with a word-level tokenizer."""
  from test_siglip_similarity import MAX_LEN, _save_random_siglip_model
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  directory = str(tmp_path_factory.mktemp("siglip_pair"))
  _save_random_siglip_model(directory)
  words = ["<pad>", "<s>", "</s>", "<unk>", "which", "?", "x", "y", "red", "card"]
  raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(
    tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>"
  ).save_pretrained(directory)
  assert MAX_LEN == 16
  return directory


def test_siglip_scores_are_the_models_logits_and_frame_embeddings_are_cached(siglip_dir):
  import jax.numpy as jnp

  from frameselect_jax import hf, similarity, video

  scorer = similarity.SiglipScorer(siglip_dir, batch_size=4)
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
  valid = np.array([True] * 5 + [False])
  scores = scorer.scores(frames, valid, "which red card ?", key="v")
  model = hf.load_siglip_model(siglip_dir)
  ids = hf.siglip_text_ids(hf.load_tokenizer(siglip_dir), ["which red card ?"], 16)
  expected = np.asarray(
    model.logits_per_image(jnp.asarray(video.normalize(frames[:5])), jnp.asarray(ids))
  )[:, 0]
  np.testing.assert_allclose(scores[:5], expected, atol=1e-5)
  assert scores[5] == -np.inf
  scorer.scores(frames, valid, "which card ?", key="v")  # another question, same candidates
  assert scorer.image_calls == 1


def test_similarity_peers_through_the_harness(siglip_dir, tmp_path):
  from frameselect_jax import peers

  fake = FakeServer(image_answer=lambda request: "(B)")
  c = _generic_items(tmp_path)
  c.strategies = "uniform,siglip_top_k,siglip_nms,bolt,aks"
  c.ks = (2, 4)
  c.similarity.siglip_dir = siglip_dir
  with serve(fake) as url:
    c.downstream.openai.base_url, c.downstream.openai.model = url, "fake-vlm"
    out = harness.run(c)
  records = selection_file.read(f"{out}/selections.jsonl")
  assert {r["strategy"] for r in records} == {
    "uniform",
    "siglip_top_k",
    "siglip_nms",
    "bolt",
    "aks",
  }
  for r in records:
    if r["strategy"] in ("bolt", "aks"):
      scores = np.array([-np.inf if s is None else s for s in r["scores"]], np.float32)
      valid = np.array([s is not None for s in r["scores"]])
      expected = (peers.bolt if r["strategy"] == "bolt" else peers.aks)(scores, valid, r["k"])
      assert r["indices"] == [int(i) for i in expected if i >= 0]
  with open(f"{out}/report.json") as f:
    rows = json.load(f)["table"]
  assert all(row["all"]["accuracy"] == 1.0 for row in rows)  # every answer is (B), the right one
  assert all(row["cost"]["select_ms"] >= 0 for row in rows)
