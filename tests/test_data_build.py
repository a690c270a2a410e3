"""data/build.py: items + labels -> work shards -> a TFDS dataset in array_record form, read
back through tfds.data_source and grain, restartable, and read by a training run."""

import json
import os

import grain
import numpy as np
import pytest
from train_testlib import read_metrics, run_train

from configs import build as build_config
from data import build
from frameselect_jax import input_pipeline, records, synthetic, video, videoqa

N, SIZE = 16, 32  # the tiny model's candidates and image size


def tiny_config(tmp_path, **changes):
  c = build_config.get_config("tiny")
  c.build.root = str(tmp_path / "needle")
  c.build.data_dir = str(tmp_path / "tfds")
  c.build.progress = False
  c.needle.train_videos, c.needle.test_videos = 4, 2
  c.build.shard_size = 5
  for key, value in changes.items():
    c.build[key] = value
  return c


def generic_config(tmp_path):
  """A build of tmp_path/train.jsonl (the generic format) with tmp_path/labels.jsonl."""
  return tiny_config(
    tmp_path,
    benchmark="jsonl",
    root=str(tmp_path),
    splits=("train",),
    labels=str(tmp_path / "labels.jsonl"),
    generate_needle=False,
  )


def work_records(work_dir, split):
  out = {}
  for name in sorted(os.listdir(os.path.join(work_dir, split))):
    if name.endswith(".array_record"):
      source = input_pipeline.ArrayRecordSource(os.path.join(work_dir, split, name))
      for i in range(len(source)):
        out[source[i]["qid"]] = source[i]
  return out


def assert_same_record(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    if isinstance(a[key], np.ndarray):
      np.testing.assert_array_equal(a[key], b[key])
    else:
      assert a[key] == b[key], key


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("build")
  config = tiny_config(tmp_path)
  return config, build.build(config)


def test_records_read_back_through_grain_equal_what_was_built(built):
  config, result = built
  assert result["dataset"] == "frameselect_records/needle_jpeg_tiny"
  work_dir = os.path.join(config.build.data_dir, "work", config.build.name)
  for split, count in (("train", 12), ("test", 6)):  # 3 needles (questions) per video
    assert result["splits"][split]["records"] == count and not result["splits"][split]["skipped"]
    source = input_pipeline.TfdsSource(result["dataset"], split, result["data_dir"])
    read = list(grain.MapDataset.source(source).to_iter_dataset())
    assert len(read) == count
    # The dataset adds other_labels: what the video's other questions ask for. Shards of 5
    # split the videos' 3 questions; the builder reads the videos whole across shards.
    expected = {
      r["qid"]: r for r in records.with_other_labels(list(work_records(work_dir, split).values()))
    }
    for record in read:
      assert_same_record(record, expected[record["qid"]])
      others = [r for r in read if r["video_id"] == record["video_id"] and r is not record]
      assert len(others) == 2
      np.testing.assert_array_equal(
        record["other_labels"], np.maximum(others[0]["labels"], others[1]["labels"])
      )
    assert any(record["other_labels"].any() for record in read)
  # And the records are what the items say: the item's question, its candidates as JPEG,
  # labels the needle's ground truth.
  items = {i.qid: i for i in videoqa.load("needle", config.build.root, "train")}
  record = input_pipeline.TfdsSource(result["dataset"], "train", result["data_dir"])[0]
  item = items[record["qid"]]
  assert (record["question"], record["options"], record["answer"]) == (
    item.question,
    list(item.options),
    item.answer,
  )
  candidates = video.decode_candidates(item.video, n=N, size=SIZE)
  np.testing.assert_array_equal(record["timestamps"], candidates.timestamps)
  np.testing.assert_array_equal(
    record["labels"], synthetic.candidate_relevance(item.extra, candidates.frame_indices)
  )
  frames = records.record_frames(record, SIZE)
  # JPEG quality 90 on 32-pixel frames with sharp card edges: a few levels off on average.
  assert np.abs(frames.astype(int) - candidates.frames).mean() < 8


def test_a_restarted_build_redoes_only_unfinished_shards(tmp_path, monkeypatch):
  config = tiny_config(tmp_path)
  calls = []
  real = build.build_shard

  def crash_on_third(items, *args):
    calls.append(items[0].qid)
    if len(calls) == 3:
      raise KeyboardInterrupt  # killed mid-shard: nothing of this shard is kept
    return real(items, *args)

  monkeypatch.setattr(build, "build_shard", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    build.build(config)
  work_dir = os.path.join(config.build.data_dir, "work", config.build.name)
  done = sorted(os.listdir(os.path.join(work_dir, "train")))
  assert done == [f"shard-0000{i}.{ext}" for i in range(2) for ext in ("array_record", "json")]
  calls.clear()
  monkeypatch.setattr(build, "build_shard", lambda *a: calls.append(a[0][0].qid) or real(*a))
  result = build.build(config)
  assert len(calls) == 3  # train's third shard (12 items, 5 per shard) and test's two
  again = input_pipeline.TfdsSource(result["dataset"], "train", result["data_dir"])
  assert sorted(again[i]["qid"] for i in range(len(again))) == sorted(
    i.qid for i in videoqa.load("needle", config.build.root, "train")
  )


def test_skipped_items_are_reported_with_their_reasons(tmp_path, capsys):
  clip = tmp_path / "clip.mp4"
  synthetic.needle_video(clip, num_frames=24, fps=8, size=32, seed=0)
  (tmp_path / "empty.mp4").write_bytes(b"")
  lines = [
    {"qid": "ok", "video": "clip.mp4", "question": "Where?", "answer": "here"},
    {"qid": "gone", "video": "missing.mp4", "question": "Where?", "answer": "x"},
    {"qid": "empty", "video": "empty.mp4", "question": "Where?", "answer": "x"},
    {"qid": "unlabelled", "video": "clip.mp4", "question": "When?", "answer": "now"},
    {"qid": "short", "video": "clip.mp4", "question": "Which?", "answer": "y"},
  ]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  labels = [
    {"benchmark": "jsonl", "qid": q, "labels": [0.5] * N} for q in ("ok", "gone", "empty")
  ] + [{"qid": "short", "labels": [0.5] * 3}]
  (tmp_path / "labels.jsonl").write_text("".join(json.dumps(line) + "\n" for line in labels))
  config = generic_config(tmp_path)
  result = build.build(config)
  reasons = {s["qid"]: s["reason"] for s in result["splits"]["train"]["skipped"]}
  assert result["splits"]["train"]["records"] == 1
  assert sorted(reasons) == ["empty", "gone", "short", "unlabelled"]
  assert reasons["gone"].startswith("missing_video: video") and "missing.mp4" in reasons["gone"]
  assert reasons["empty"].startswith("undecodable video") and "empty file" in reasons["empty"]
  assert reasons["unlabelled"].startswith("no label in")
  assert reasons["short"] == f"its labels are not {N} values in [0, 1]"
  work_dir = os.path.join(config.build.data_dir, "work", config.build.name)
  with open(os.path.join(work_dir, "report.json")) as f:
    assert json.load(f)["train"]["skipped"] == result["splits"]["train"]["skipped"]
  build.print_report(result)
  printed = capsys.readouterr().out
  assert "train: 1 records, 4 items skipped" in printed and "skipped gone: missing_video" in printed
  source = input_pipeline.TfdsSource(result["dataset"], "train", result["data_dir"])
  assert len(source) == 1 and source[0]["qid"] == "ok" and source[0]["benchmark"] == "jsonl"


def run_summary(workdir):
  """(the start event, the last validation line) of a run's metrics.jsonl."""
  metrics = read_metrics(workdir)
  start = next(m for m in metrics if m.get("event") == "start")
  return start, [m for m in metrics if "validation/examples" in m][-1]


@pytest.mark.slow
def test_a_training_run_reads_the_dataset_jpeg_and_visual_tokens(built, tmp_path):
  config, result = built
  common = (
    "--config.data.source=tfds",
    "--config.data.eval_split=test",
    "--config.data.global_batch_size=4",
    "--config.train.num_steps=2",
  )
  jpeg = (
    f"--config.data.tfds_name={result['dataset']}",
    f"--config.data.tfds_dir={result['data_dir']}",
  )
  run_train("configs/stage1.py:tiny", str(tmp_path / "jpeg"), *common, *jpeg)
  start, validation = run_summary(str(tmp_path / "jpeg"))
  assert (
    validation["validation/examples"] == 6.0 and start["visual_cache_encoded"] == 6
  )  # 4 + 2 videos
  # The same items with the frozen tower's tokens stored: the trainer reads them instead of
  # encoding, and refuses tokens of another tower.
  tokens = tiny_config(tmp_path, store="visual_tokens", name="tokens")
  tokens.build.root = config.build.root
  made = build.build(tokens)
  record = input_pipeline.TfdsSource(made["dataset"], "train", made["data_dir"])[0]
  assert record["visual_tokens"].shape == (N, 9, 32) and "video" not in record
  stored = (
    f"--config.data.tfds_name={made['dataset']}",
    f"--config.data.tfds_dir={made['data_dir']}",
  )
  run_train("configs/stage1.py:tiny", str(tmp_path / "tokens"), *common, *stored)
  start, validation = run_summary(str(tmp_path / "tokens"))
  assert validation["validation/examples"] == 6.0
  assert (start["visual_cache_encoded"], start["visual_cache_reused"]) == (0, 0)
  other = run_train(
    "configs/stage1.py:tiny",
    str(tmp_path / "other"),
    *common,
    *stored,
    "--config.seed=1",
    check=False,
  )
  assert other.returncode == 2
  assert "visual tokens were made by the tower" in other.stderr.splitlines()[-1]


def test_a_split_with_every_item_skipped_is_an_error_naming_the_report(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"qid": "1", "video": "gone.mp4", "question": "Q?"}\n')
  (tmp_path / "labels.jsonl").write_text('{"qid": "1", "labels": [0.5]}\n')
  config = generic_config(tmp_path)
  with pytest.raises(build.BuildError, match=r"split train has no records: .*report\.json"):
    build.build(config)


def test_items_added_later_reach_the_dataset(tmp_path):
  synthetic.needle_video(tmp_path / "clip.mp4", num_frames=24, fps=8, size=32, seed=0)
  line = lambda q: (
    json.dumps({"qid": q, "video": "clip.mp4", "question": f"{q}?", "answer": q}) + "\n"
  )
  labels = "".join(json.dumps({"qid": q, "labels": [0.25] * N}) + "\n" for q in "abc")
  (tmp_path / "labels.jsonl").write_text(labels)
  (tmp_path / "train.jsonl").write_text(line("a"))
  config = generic_config(tmp_path)
  first = build.build(config)
  assert len(input_pipeline.TfdsSource(first["dataset"], "train", first["data_dir"])) == 1
  (tmp_path / "train.jsonl").write_text(line("a") + line("b") + line("c"))
  again = build.build(config)
  source = input_pipeline.TfdsSource(again["dataset"], "train", again["data_dir"])
  assert sorted(source[i]["qid"] for i in range(len(source))) == ["a", "b", "c"]
