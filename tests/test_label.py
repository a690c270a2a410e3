"""Pseudo-labels: the OpenAI-compatible backend against a loopback server of our own
(tests/fake_openai_server.py: logprobs and faults), the labellers, and the resumable,
sharded runner `python -m data.label`."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fake_openai_server import FakeServer, serve
from train_testlib import REPO, env

from configs import label as label_config
from data import label, labelers
from frameselect_jax import mllm, synthetic, video, videoqa

N, SIZE = 8, 32
SECRET = "sk-test-never-written-0123456789"


def grey(level):
  return np.full((SIZE, SIZE, 3), level, np.uint8)


# --- Reading frame indices ---


@pytest.mark.parametrize(
  "text, expected",
  [
    ("[3, 17, 5]", [3, 5, 17]),
    ("The best frames are [2, 4]. Not [9].", [9]),  # the last list is the answer
    ("Frames 3-5 and 7 help.", [3, 4, 5, 7]),
    ("frames 6 to 4, then 1", [1, 4, 5, 6]),
    ('{"frames": [0, 1]}', [0, 1]),
    ("Frame 2 shows it; so does frame 2.", [2]),
  ],
)
def test_frame_indices_are_read_from_json_ranges_and_prose(text, expected):
  assert labelers.parse_frame_indices(text, 20) == expected


@pytest.mark.parametrize(
  "text, problem", [("no idea", "no frame index"), ("[3, 25]", "outside 0..19"), ("", "no")]
)
def test_unreadable_answers_say_why(text, problem):
  with pytest.raises(ValueError, match=problem):
    labelers.parse_frame_indices(text, 20)


# --- The OpenAI-compatible backend ---


def backend(url, **kw):
  kw = {"timeout_s": 0.5, "retries": 4, "backoff_s": 0.01, "concurrency": 4, **kw}
  return mllm.OpenAIBackend(url, "fake-vlm", SECRET, **kw)


def test_p_true_is_read_from_top_logprobs_through_timeouts_500s_and_429s():
  fake = FakeServer(faults=["500", "429", "timeout"], timeout_sleep_s=1.5)
  with serve(fake) as url:
    client = backend(url)
    levels = [51, 102, 204]
    got = client.true_probabilities([grey(v) for v in levels], "Does it help?")
  # The server's P(True) is the JPEG-decoded frame's level / 255: a grey frame survives.
  np.testing.assert_allclose(got, np.array(levels) / 255, atol=2e-3)
  assert client.retried == 3 and client.usage.calls == 3
  assert client.usage.prompt_tokens == 3 * 60 and client.usage.completion_tokens == 24
  assert fake.headers["authorization"] == f"Bearer {SECRET}"  # sent, and only there
  assert SECRET not in repr(client)
  request = fake.requests[-1]
  assert request["logprobs"] is True and request["top_logprobs"] == 10
  image = request["messages"][0]["content"][0]["image_url"]["url"]
  assert image.startswith("data:image/jpeg;base64,")


def test_a_server_without_logprobs_is_a_clear_error_never_a_half():
  with serve(FakeServer(faults=["nologprobs"])) as url:
    with pytest.raises(mllm.NoLogprobsError, match="returned no logprobs") as caught:
      backend(url).true_probabilities([grey(9)], "Q?")
  assert url in str(caught.value) and "transformers serve" in str(caught.value)
  assert SECRET not in str(caught.value)


def test_retries_end_in_a_backend_error_naming_the_server():
  with serve(FakeServer(faults=["500"] * 10)) as url:
    client = backend(url, retries=2)
    with pytest.raises(mllm.BackendError, match="after 2 retries") as caught:
      client.chat([{"role": "user", "content": "hi"}])
  assert url in str(caught.value) and client.retried == 2 and SECRET not in str(caught.value)


def test_a_server_that_is_not_there_is_retried_then_reported():
  import socket

  with socket.socket() as probe:  # a port nothing listens on
    probe.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
  client = backend(url, retries=1)
  with pytest.raises(mllm.BackendError, match="after 1 retries"):
    client.chat([{"role": "user", "content": "hi"}])
  assert client.retried == 1


def test_the_text_llm_is_asked_again_once_then_the_item_fails():
  answers = iter(["[42]", "Frames 1-2."])
  fake = FakeServer(text_answer=lambda prompt: next(answers))
  item = videoqa.Item(benchmark="b", qid="q", video="v.mp4", question="What?")
  frames = np.stack([grey(10 * i) for i in range(N)])
  candidates = video.Candidates(frames, np.arange(N) * 1.0, np.ones(N, bool), np.arange(N), "", 8.0)
  with serve(fake) as url:
    client = backend(url)
    temporal = labelers.TemporalLabeler(client, client, labelers.CaptionCache(None))
    parts = temporal(item, candidates)
    assert parts["temporal_indices"] == [1, 2] and temporal.corrected == 1
    corrective = fake.requests[-1]["messages"]
    assert [m["role"] for m in corrective] == ["user", "assistant", "user"]
    assert "outside 0..7" in corrective[-1]["content"]
    # Captions are per video: the same candidates are not captioned again.
    captions = sum(1 for r in fake.requests if isinstance(r["messages"][0]["content"], list))
    fake.text_answer = lambda prompt: "none of them"
    with pytest.raises(labelers.LabelError, match="asked twice: no frame index"):
      temporal(item, candidates)
    assert (
      sum(1 for r in fake.requests if isinstance(r["messages"][0]["content"], list)) == captions
    )
  np.testing.assert_array_equal(parts["temporal"], [0, 1, 1, 0, 0, 0, 0, 0])


# --- The runner ---


@pytest.fixture(scope="module")
def needle(tmp_path_factory):
  root = tmp_path_factory.mktemp("needle")
  settings = synthetic.NeedleSettings(duration_s=2.0, fps=8, size=32, needles=2, distractors=1)
  synthetic.write_needle_benchmark(str(root), {"train": 4}, settings, progress=False)
  return str(root)


def runner_config(root, output, url="", **changes):
  c = label_config.get_config("benchmark=needle,split=train")
  c.label.root = root
  c.label.output = str(output)
  c.label.num_candidates, c.label.image_size = N, SIZE
  c.label.progress = False
  c.label.openai.base_url, c.label.openai.model = url, "fake-vlm"
  c.label.openai.api_key = SECRET
  c.label.openai.backoff_s = 0.01
  for key, value in changes.items():
    c.label[key] = value
  return c


def label_command(root, output, url, *changes):
  """`python -m data.label` over the needle benchmark against the fake server at url."""
  return [
    sys.executable,
    "-m",
    "data.label",
    "--config=configs/label.py:benchmark=needle,split=train",
    f"--config.label.root={root}",
    f"--config.label.output={output}",
    f"--config.label.num_candidates={N}",
    f"--config.label.image_size={SIZE}",
    f"--config.label.openai.base_url={url}",
    "--config.label.openai.model=fake-vlm",
    "--config.label.progress=False",
    *changes,
  ]


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_spatial_and_temporal_labels_of_a_benchmark(needle, tmp_path, capsys):
  output = tmp_path / "labels.jsonl"
  fake = FakeServer()
  with serve(fake) as url:
    summary = label.run(runner_config(needle, output, url))
  items = videoqa.load("needle", needle, "train")
  assert (summary["done"], summary["skipped"], summary["failed"]) == (8, [], [])
  lines = read_lines(output)
  assert [(x["benchmark"], x["qid"]) for x in lines] == [(i.benchmark, i.qid) for i in items]
  for line, item in zip(lines, items):
    candidates = video.decode_candidates(item.video, n=N, size=SIZE)
    assert line["timestamps"] == candidates.timestamps.tolist()
    levels = candidates.frames.reshape(N, -1).mean(axis=1)
    np.testing.assert_allclose(line["spatial"], levels / 255, atol=0.02)  # JPEG on the way
    brightest = sorted(np.argsort(-levels, kind="stable")[:2].tolist())
    # The captions carry the level to one decimal; ties may break either way.
    assert len(line["temporal_indices"]) == 2
    assert abs(levels[line["temporal_indices"]].sum() - levels[brightest].sum()) < 1.0
    np.testing.assert_allclose(
      line["labels"], (np.array(line["spatial"]) + np.array(line["temporal"])) / 2, atol=1e-5
    )
  # 4 videos x 8 candidates captioned once each, though each video has 2 questions.
  captions = [r for r in fake.requests if not r.get("logprobs") and "image_url" in str(r)]
  assert len(captions) == 4 * N
  assert summary["cost"]["calls"] == len(fake.requests) == 8 * N + 4 * N + 8
  label.print_summary(summary)
  printed = capsys.readouterr().out
  assert (
    "8 labelled, 0 already done, 0 skipped, 0 failed" in printed and "cost: 104 calls" in printed
  )
  for path in tmp_path.iterdir():
    assert SECRET not in path.read_text()
  assert SECRET not in printed
  # Written labels feed the dataset builder as they are.
  from data import build

  labels = build.LabelFile(str(output))
  item = items[0]
  candidates = video.decode_candidates(item.video, n=N, size=SIZE)
  assert labels(item, candidates)["labels"].tolist() == pytest.approx(lines[0]["labels"])


def test_a_labelling_run_killed_with_sigkill_loses_and_duplicates_nothing(needle, tmp_path):
  output = tmp_path / "labels.jsonl"
  fake = FakeServer(delay_s=0.05)
  with serve(fake) as url:
    command = label_command(needle, output, url)
    proc = subprocess.Popen(
      command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline:
      if output.exists() and len(output.read_text().splitlines()) >= 3:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = output.read_text().splitlines()
    assert 3 <= len(before) < 8
    # Restarted (and with a half line a writer could leave): the rest, once each.
    with open(output, "a") as f:
      f.write('{"benchmark": "needle", "qid": "half')
    finished = subprocess.run(
      command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
  assert finished.returncode == 0, finished.stderr[-3000:]
  after = output.read_text().splitlines()
  assert after[: len(before)] == before
  keys = [(x["benchmark"], x["qid"]) for x in map(json.loads, after)]
  assert len(keys) == len(set(keys)) == 8
  assert f"{8 - len(before)} labelled, {len(before)} already done" in finished.stdout


def test_an_empty_or_corrupt_video_is_skipped_and_the_rest_completes(tmp_path):
  synthetic.needle_video(tmp_path / "clip.mp4", num_frames=16, fps=8, size=32, seed=0)
  (tmp_path / "empty.mp4").write_bytes(b"")
  (tmp_path / "corrupt.mp4").write_bytes(os.urandom(2000))
  lines = [
    {"qid": q, "video": v, "question": "Where?"}
    for q, v in (("a", "clip.mp4"), ("b", "empty.mp4"), ("c", "corrupt.mp4"), ("d", "gone.mp4"))
  ]
  (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  config = runner_config(str(tmp_path), tmp_path / "out" / "labels.jsonl", kinds="spatial")
  config.label.benchmark, config.label.split = "jsonl", "test"
  with serve(FakeServer()) as url:
    config.label.openai.base_url = url
    summary = label.run(config)
  reasons = {s["qid"]: s["reason"] for s in summary["skipped"]}
  assert summary["done"] == 1 and not summary["failed"]
  assert reasons["b"].startswith("undecodable video") and "empty file" in reasons["b"]
  assert reasons["c"].startswith("undecodable video")
  assert reasons["d"].startswith("missing_video")
  assert [x["qid"] for x in read_lines(tmp_path / "out" / "labels.jsonl")] == ["a"]


def test_two_runs_on_one_output_are_refused(needle, tmp_path):
  output = tmp_path / "labels.jsonl"
  held = label.hold_lock(str(output))
  try:
    with pytest.raises(label.LabelConfigError, match="another labelling run is writing"):
      label.run(runner_config(needle, output, kinds="oracle"))
  finally:
    held.close()
  assert label.run(runner_config(needle, output, kinds="oracle"))["done"] == 8


def test_shards_merge_into_the_single_run(needle, tmp_path):
  whole = label.run(runner_config(needle, tmp_path / "whole.jsonl", kinds="oracle"))
  paths = []
  for i in range(3):
    summary = label.run(runner_config(needle, tmp_path / "labels.jsonl", kinds="oracle"), (i, 3))
    assert summary["output"].endswith(f"labels.shard-{i}-of-3.jsonl")
    paths.append(summary["output"])
  assert label.merge(paths, str(tmp_path / "merged.jsonl")) == 8
  by_key = lambda path: {(x["benchmark"], x["qid"]): x["labels"] for x in read_lines(path)}
  assert by_key(tmp_path / "merged.jsonl") == by_key(whole["output"])


def test_the_oracle_gives_the_truth_with_optional_noise(needle, tmp_path):
  exact = label.run(runner_config(needle, tmp_path / "exact.jsonl", kinds="oracle"))
  config = runner_config(needle, tmp_path / "noisy.jsonl", kinds="oracle")
  config.label.oracle.spatial_noise, config.label.oracle.temporal_flip = 0.2, 0.25
  noisy = label.run(config)
  items = {i.qid: i for i in videoqa.load("needle", needle, "train")}
  flips = 0
  for a, b in zip(read_lines(exact["output"]), read_lines(noisy["output"])):
    item = items[a["qid"]]
    candidates = video.decode_candidates(item.video, n=N, size=SIZE)
    truth = synthetic.candidate_relevance(item.extra, candidates.frame_indices)
    assert a["spatial"] == a["temporal"] == a["labels"] == truth.tolist()
    assert np.all((np.array(b["spatial"]) >= 0) & (np.array(b["spatial"]) <= 1))
    assert b["spatial"] != a["spatial"]
    flips += int(np.sum(np.array(b["temporal"]) != truth))
  assert 0 < flips < 8 * N  # about a quarter of the 64 candidates


def test_too_many_failures_exit_non_zero(needle, tmp_path):
  output = tmp_path / "labels.jsonl"
  with serve(FakeServer(faults=["garbage"] * 1000)) as url:
    proc = subprocess.run(
      label_command(needle, output, url, "--config.label.kinds=temporal"),
      cwd=REPO,
      env=env(),
      capture_output=True,
      text=True,
      timeout=300,
    )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1].startswith("error: 8 items failed (100.0%)")
  assert "failed: 8 x temporal" in proc.stdout
  failures = read_lines(tmp_path / "labels.failures.jsonl")
  assert len(failures) == 8 and "asked twice" in failures[0]["reason"]
  assert output.read_text() == ""


def test_an_item_over_the_time_limit_fails_with_that_reason(needle, tmp_path):
  config = runner_config(needle, tmp_path / "labels.jsonl", kinds="spatial")
  config.label.time_limit_s = 0.3
  config.label.openai.concurrency = 1
  with serve(FakeServer(delay_s=0.1)) as url:
    config.label.openai.base_url = url
    summary = label.run(config)
  assert summary["done"] == 0 and len(summary["failed"]) == 8
  assert {f["reason"] for f in summary["failed"]} == {"over the time limit"}
