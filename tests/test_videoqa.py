"""videoqa: each benchmark's released annotation format, read field by field from fixtures
shaped like the real files (a few rows each) with tiny generated videos."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from frameselect_jax import synthetic, video, videoqa


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """A 2 s, 8 fps, 32x32 mp4 whose frame i is uniformly grey level 20 * i."""
  path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
  frames = np.stack([np.full((32, 32, 3), 12 * i, np.uint8) for i in range(16)])
  synthetic.write_video(path, frames, fps=8)
  return path


def place(clip, *paths):
  for path in paths:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copy(clip, path)


def write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def problems(items):
  return {(p.qid, p.kind) for p in items.problems}


def test_nextqa(tmp_path, clip):
  root = str(tmp_path)
  header = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type"]
  header += [f"a{i}" for i in range(5)]
  rows = [
    [
      "2909445186",
      1323,
      640,
      480,
      "why did the boy fall",
      2,
      4,
      "CW",
      "a",
      "b",
      "slipped",
      "d",
      "e",
    ],
    ["2909445186", 1323, 640, 480, "what next", 0, 7, "TN", "run", "b", "c", "d", "e"],
    ["4882821564", 900, 640, 360, "how many dogs", 1, 0, "DC", "1", "2", "3", "4", "5"],
    ["4882821564", 900, 640, 360, "where", 7, 1, "DL", "a", "b", "c", "d", "e"],
  ]
  with open(tmp_path / "val.csv", "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])
  write_json(
    tmp_path / "map_vid_vidorID.json", {"2909445186": "0101/2909445186", "4882821564": "0002/x"}
  )
  place(clip, os.path.join(root, "NExTVideo", "0101", "2909445186.mp4"))
  items = videoqa.load("nextqa", root, split="val")
  assert len(items) == 4
  first = items[0]
  assert first == videoqa.Item(
    benchmark="nextqa",
    qid="2909445186_4",
    video=os.path.join(root, "NExTVideo", "0101", "2909445186.mp4"),
    question="why did the boy fall",
    options=("a", "b", "slipped", "d", "e"),
    answer_index=2,
    answer="slipped",
    category={"type": "CW"},
    video_id="2909445186",
  )
  assert first.span is None and first.duration_s is None and first.scorable
  assert problems(items) == {
    ("4882821564_0", "missing_video"),
    ("4882821564_1", "missing_video"),
    ("4882821564_1", "answer_not_in_options"),
  }
  assert items[3].answer_index is None and not items[3].scorable
  assert [i.qid for i in items.usable()] == ["2909445186_4", "2909445186_7"]
  assert items.summary() == "4 items; 2 missing_video, 1 answer_not_in_options"


def test_egoschema_keeps_unanswered_questions_as_unscorable(tmp_path, clip):
  root = str(tmp_path)
  questions = [
    {
      "q_uid": uid,
      "google_drive_id": "x",
      "question": f"what did c do {uid}",
      **{f"option {i}": f"opt{i}" for i in range(5)},
    }
    for uid in ("u1", "u2", "u3")
  ]
  write_json(tmp_path / "questions.json", questions)
  write_json(tmp_path / "subset_answers.json", {"u1": 3, "u3": 9})
  place(clip, *(os.path.join(root, "videos", f"{u}.mp4") for u in ("u1", "u2", "u3")))
  full = videoqa.load("egoschema", root, split="full")
  assert [i.qid for i in full] == ["u1", "u2", "u3"]
  assert full[0].options == ("opt0", "opt1", "opt2", "opt3", "opt4")
  assert (full[0].answer_index, full[0].answer) == (3, "opt3")
  assert full[0].video == os.path.join(root, "videos", "u1.mp4")
  assert full[1].answer_index is None and not full[1].scorable
  assert problems(full) == {("u2", "no_answer"), ("u3", "answer_not_in_options")}
  subset = videoqa.load("egoschema", root, split="subset")
  assert [i.qid for i in subset] == ["u1", "u3"]
  assert [i.qid for i in full.usable(scorable=False)] == ["u1", "u2"]


def test_activitynet_qa_joins_answers_and_finds_the_extension(tmp_path, clip):
  root = str(tmp_path)
  write_json(
    tmp_path / "test_q.json",
    [
      {"video_name": "abc", "question": "what color is the car", "question_id": "v_abc_0"},
      {"video_name": "def", "question": "is he running", "question_id": "v_def_1"},
      {"video_name": "ghi", "question": "how many", "question_id": "v_ghi_2"},
    ],
  )
  write_json(
    tmp_path / "test_a.json",
    [
      {"answer": "yes", "type": 3, "question_id": "v_def_1"},
      {"answer": "red", "type": 4, "question_id": "v_abc_0"},
      {"answer": "2", "type": 7, "question_id": "v_ghi_2"},
    ],
  )
  place(clip, os.path.join(root, "videos", "v_abc.mp4"))
  shutil.copy(clip, os.path.join(root, "videos", "v_def.webm"))  # the name is what is looked up
  items = videoqa.load("activitynet_qa", root, split="test")
  assert [(i.qid, i.answer, i.category["type"]) for i in items] == [
    ("v_abc_0", "red", "Color"),
    ("v_def_1", "yes", "Yes/No"),
    ("v_ghi_2", "2", "Number"),
  ]
  assert items[1].video.endswith("v_def.webm") and items[1].open_ended and items[1].scorable
  assert items[0].options == () and items[0].answer_index is None
  assert problems(items) == {("v_ghi_2", "missing_video")}


def test_longvideobench(tmp_path, clip):
  root = str(tmp_path)
  entry = {
    "video_id": "86CxyhFV9MI",
    "id": "86CxyhFV9MI_0",
    "video_path": "86CxyhFV9MI.mp4",
    "question": "What is the man holding?",
    "candidates": ["a cup", "a phone", "a book"],
    "correct_choice": 1,
    "duration": 17.5,
    "duration_group": 15,
    "question_category": "S2E",
    "topic_category": "NP-News-Programs",
    "level": "L1-Perception",
  }
  write_json(tmp_path / "lvb_val.json", [entry, {**entry, "id": "x_1", "correct_choice": 3}])
  place(clip, os.path.join(root, "videos", "86CxyhFV9MI.mp4"))
  items = videoqa.load("longvideobench", root)  # split defaults to val
  first = items[0]
  assert (first.qid, first.answer_index, first.answer, first.duration_s) == (
    "86CxyhFV9MI_0",
    1,
    "a phone",
    17.5,
  )
  assert first.options == ("a cup", "a phone", "a book")
  assert first.category == {
    "duration_group": "15",
    "question_category": "S2E",
    "topic_category": "NP-News-Programs",
    "level": "L1-Perception",
  }
  assert first.video_id == "86CxyhFV9MI"
  assert problems(items) == {("x_1", "answer_not_in_options")}


def videomme_rows():
  base = {
    "video_id": "001",
    "duration": "short",
    "domain": "Knowledge",
    "sub_category": "Humanity & History",
    "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
    "videoID": "fFjv93ACGo8",
    "task_type": "Counting Problem",
  }
  options = ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are equal."]
  return [
    {
      **base,
      "question_id": "001-1",
      "question": "Which is most?",
      "options": options,
      "answer": "C",
    },
    {**base, "question_id": "001-2", "question": "And?", "options": options, "answer": "E"},
  ]


@pytest.mark.parametrize("form", ["parquet", "json"])
def test_videomme_strips_letters(tmp_path, clip, form):
  root = str(tmp_path)
  os.makedirs(tmp_path / "videomme")
  if form == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
      pa.Table.from_pylist(videomme_rows()), tmp_path / "videomme" / "test-00000-of-00001.parquet"
    )
  else:
    write_json(tmp_path / "videomme" / "test.json", videomme_rows())
  place(clip, os.path.join(root, "data", "fFjv93ACGo8.mp4"))
  items = videoqa.load("videomme", root)
  assert items[0].options == ("Apples.", "Candles.", "Berries.", "The three kinds are equal.")
  assert (items[0].answer_index, items[0].answer, items[0].qid) == (2, "Berries.", "001-1")
  assert items[0].category == {
    "duration": "short",
    "domain": "Knowledge",
    "sub_category": "Humanity & History",
    "task_type": "Counting Problem",
  }
  assert items[0].video == os.path.join(root, "data", "fFjv93ACGo8.mp4")
  assert problems(items) == {("001-2", "answer_not_in_options")}


def test_mlvu_multiple_choice_and_open_ended(tmp_path, clip):
  root = str(tmp_path)
  write_json(
    tmp_path / "json" / "1_plotQA.json",
    [
      {
        "video": "movie101_66.mp4",
        "duration": 246,
        "question": "What color is the main male character in the video?",
        "candidates": ["Yellow", "Red", "Green", "Blue"],
        "answer": "Yellow",
        "question_type": "plotQA",
      },
      {
        "video": "movie101_66.mp4",
        "duration": 246,
        "question": "Who?",
        "candidates": ["x", "y"],
        "answer": "z",
        "question_type": "plotQA",
      },
    ],
  )
  write_json(
    tmp_path / "json" / "9_summary.json",
    [
      {
        "video": "s1.mp4",
        "duration": 600,
        "question": "Please summarize this video.",
        "answer": "A man cooks.",
        "question_type": "summary",
      }
    ],
  )
  place(
    clip,
    os.path.join(root, "video", "1_plotQA", "movie101_66.mp4"),
    os.path.join(root, "video", "9_summary", "s1.mp4"),
  )
  items = videoqa.load("mlvu", root)
  by_qid = {i.qid: i for i in items}
  mc = by_qid["1_plotQA/0"]
  assert (mc.answer_index, mc.answer, mc.duration_s) == (0, "Yellow", 246.0)
  assert mc.category == {"task": "plotQA", "question_type": "plotQA"}
  assert mc.video_id == "1_plotQA/movie101_66.mp4"
  summary = by_qid["9_summary/0"]
  assert summary.open_ended and summary.answer == "A man cooks." and summary.scorable
  assert summary.video == os.path.join(root, "video", "9_summary", "s1.mp4")
  assert problems(items) == {("1_plotQA/1", "answer_not_in_options")}


def test_mvbench_bounds_and_frame_folders(tmp_path, clip):
  root = str(tmp_path)
  write_json(
    tmp_path / "json" / "action_sequence.json",
    [
      {
        "video": "ZS9XR.mp4",
        "question": "What happened after the person took the food?",
        "candidates": ["Ate the medicine.", "Tidied up the blanket."],
        "answer": "Ate the medicine.",
        "start": 0.5,
        "end": 1.5,
      }
    ],
  )
  write_json(
    tmp_path / "json" / "episodic_reasoning.json",
    [
      {
        "video": "castle_s07e04_seg02_clip_14",
        "question": "Why?",
        "candidates": ["a", "b", "c"],
        "answer": "c",
        "start": 1.0,
        "end": 3.0,
      }
    ],
  )
  write_json(
    tmp_path / "json" / "action_antonym.json",
    [{"video": "166583.webm", "question": "What?", "candidates": ["p", "q"], "answer": "q"}],
  )
  place(clip, os.path.join(root, "video", "star", "Charades_v1_480", "ZS9XR.mp4"))
  folder = os.path.join(root, "video", "tvqa", "frames_fps3_hq", "castle_s07e04_seg02_clip_14")
  os.makedirs(folder)
  from PIL import Image

  for i in range(1, 13):  # 4 s at 3 fps; names sort by number, not by text
    Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(os.path.join(folder, f"{i}.jpg"))
  items = {i.qid: i for i in videoqa.load("mvbench", root)}
  bounded = items["action_sequence/0"]
  assert bounded.span == (0.5, 1.5) and bounded.answer_index == 0
  assert bounded.category == {"task": "action_sequence"}
  frames = items["episodic_reasoning/0"]
  assert frames.video == folder and frames.frame_rate == 3.0 and frames.span == (1.0, 3.0)
  assert items["action_antonym/0"].span is None
  problems_found = problems(videoqa.load("mvbench", root))
  assert problems_found == {("action_antonym/0", "missing_video")}
  # The candidates of a bounded item come from its span only, in seconds of the video.
  candidates = video.decode_candidates(bounded.video, n=4, size=16, span=bounded.span)
  assert np.all((candidates.timestamps >= 0.5) & (candidates.timestamps < 1.5))
  assert candidates.frame_indices.tolist() == [5, 7, 9, 11]  # frames 4..11, centred
  # A frame folder decodes the same way: frames 3..8 are shown in [1, 3) s at 3 fps.
  candidates = video.decode_candidates(
    frames.video, n=3, size=8, span=frames.span, frame_rate=frames.frame_rate
  )
  assert candidates.frame_indices.tolist() == [4, 6, 8]
  np.testing.assert_allclose(candidates.timestamps, [4 / 3, 2.0, 8 / 3], rtol=1e-6)
  # File i.jpg is frame i - 1 (level 20 * i); JPEG is lossy, a few levels off.
  np.testing.assert_allclose(candidates.frames.mean(axis=(1, 2, 3)), [100, 140, 180], atol=3)
  with pytest.raises(video.VideoError, match="frame_rate"):
    video.decode_candidates(frames.video, n=3, size=8)


def test_jsonl_generic_format_round_trips(tmp_path, clip):
  place(clip, str(tmp_path / "v" / "a.mp4"))
  lines = [
    {
      "qid": "1",
      "video": "v/a.mp4",
      "question": "Which?",
      "options": ["x", "y"],
      "answer": "y",
      "start_s": 0.25,
      "end_s": 1.0,
      "category": {"kind": "demo"},
      "source": "mine",
    },
    {"qid": "2", "video": "v/a.mp4", "question": "What?", "answer": "a dog"},
    {"qid": "3", "video": "v/b.mp4", "question": "Q", "options": ["x"], "answer_index": 4},
  ]
  (tmp_path / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  items = videoqa.load("jsonl", str(tmp_path))
  assert items[0].answer_index == 1 and items[0].span == (0.25, 1.0)
  assert items[0].extra == {"source": "mine"} and items[0].category == {"kind": "demo"}
  assert items[0].video == str(tmp_path / "v" / "a.mp4")
  assert items[1].open_ended and items[1].answer == "a dog"
  assert problems(items) == {("3", "missing_video"), ("3", "answer_not_in_options")}
  # Any benchmark's items written as generic lines read back equal.
  again = tmp_path / "again.jsonl"
  again.write_text("".join(json.dumps(i.to_json()) + "\n" for i in items))
  assert list(videoqa.load("jsonl", str(again))) == list(items)


def test_needle_benchmark_reads_as_a_benchmark(tmp_path):
  settings = synthetic.NeedleSettings(duration_s=4.0, fps=8, size=32, needles=2, distractors=1)
  synthetic.write_needle_benchmark(str(tmp_path), {"train": 2, "test": 1}, settings, progress=False)
  train = videoqa.load("needle", str(tmp_path), "train")
  test = videoqa.load("needle", str(tmp_path), "test")
  assert len(train) == 4 and len(test) == 2 and not train.problems
  assert not {i.video for i in train} & {i.video for i in test}
  item = train[0]
  assert item.benchmark == "needle" and len(item.options) == 4
  assert item.options[item.answer_index] == item.answer == item.extra["needle"]["symbol"]
  assert item.question == f"Which symbol is on the {item.extra['needle']['color']} card?"
  # The ground truth marks exactly the candidates that show the needle's frames.
  candidates = video.decode_candidates(item.video, n=32, size=32)
  relevance = synthetic.candidate_relevance(item.extra, candidates.frame_indices)
  start, stop = item.extra["needle"]["frames"]
  assert relevance.sum() == stop - start
  box = item.extra["needle"]["box"]
  shown = candidates.frames[relevance > 0][:, box[0] : box[2], box[1] : box[3]]
  rgb = np.asarray(synthetic.NEEDLE_COLORS[item.extra["needle"]["color"]])
  corner = shown[:, 1, 1].astype(int)  # a card corner: the colour, away from the symbol
  assert np.all(np.abs(corner - rgb).max(axis=-1) < 40)


@pytest.mark.parametrize(
  "name, files, message",
  [
    ("nextqa", {"val.csv": "video,question\n1,q\n", "map_vid_vidorID.json": "{}"}, "header"),
    (
      "longvideobench",
      {"lvb_val.json": json.dumps([{"id": "a", "video_path": "a.mp4", "candidates": []}])},
      r"lvb_val.json: entry 0: field 'question' is missing",
    ),
    (
      "longvideobench",
      {
        "lvb_val.json": json.dumps(
          [{"id": "a", "video_path": "v", "question": "q", "candidates": "abc"}]
        )
      },
      r"entry 0: field 'candidates' must be a list of strings",
    ),
    ("egoschema", {"questions.json": "[{", "subset_answers.json": "{}"}, "not valid JSON"),
    (
      "jsonl",
      {"test.jsonl": '{"qid": "1", "video": "a", "question": "q"}\n{"qid": "1"}\n'},
      r"test.jsonl: line 2: field 'video' is missing",
    ),
    (
      "jsonl",
      {
        "test.jsonl": json.dumps({"qid": "1", "video": "a", "question": "q"})
        + "\n"
        + json.dumps({"qid": "1", "video": "a", "question": "q2"})
        + "\n"
      },
      r"line 2: qid '1' repeats line 1",
    ),
    (
      "jsonl",
      {
        "test.jsonl": json.dumps(
          {
            "qid": "1",
            "video": "a",
            "question": "q",
            "options": ["x", "y"],
            "answer": "x",
            "answer_index": 1,
          }
        )
      },
      "disagree",
    ),
    ("mvbench", {"json/made_up.json": "[]"}, "unknown MVBench task 'made_up'"),
    ("videomme", {"videomme/other.txt": ""}, r"neither test-\*.parquet nor test.json"),
  ],
)
def test_malformed_files_name_file_row_and_field(tmp_path, name, files, message):
  for relative, content in files.items():
    os.makedirs(os.path.dirname(tmp_path / relative), exist_ok=True)
    (tmp_path / relative).write_text(content)
  with pytest.raises(videoqa.AnnotationError, match=message):
    videoqa.load(name, str(tmp_path))


def test_unknown_benchmark_and_split(tmp_path):
  with pytest.raises(videoqa.AnnotationError, match="known: nextqa, egoschema"):
    videoqa.load("nextqq", str(tmp_path))
  with pytest.raises(videoqa.AnnotationError, match="nextqa has splits val, test, train"):
    videoqa.load("nextqa", str(tmp_path), split="dev")
  with pytest.raises(videoqa.AnnotationError, match="no such annotation file"):
    videoqa.load("nextqa", str(tmp_path), split="val")
  assert set(videoqa.BENCHMARKS) == {
    "nextqa",
    "egoschema",
    "activitynet_qa",
    "longvideobench",
    "videomme",
    "mlvu",
    "mvbench",
    "jsonl",
    "needle",
  }


def test_mvbench_video_revision_uses_the_cut_clips_without_bounds(tmp_path, clip):
  root = str(tmp_path)
  write_json(
    tmp_path / "json" / "action_sequence.json",
    [
      {
        "video": "ZS9XR_0.5_1.5.mp4",
        "question": "What happened after the person took the food?",
        "candidates": ["Ate the medicine.", "Tidied up the blanket."],
        "answer": "Tidied up the blanket.",
        "start": 0.5,
        "end": 1.5,
      }
    ],
  )
  place(clip, os.path.join(root, "star", "Charades_segment", "ZS9XR_0.5_1.5.mp4"))
  (item,) = videoqa.load("mvbench", root)
  assert item.video == os.path.join(root, "star", "Charades_segment", "ZS9XR_0.5_1.5.mp4")
  assert item.span is None and item.answer_index == 1
  assert not videoqa.load("mvbench", root).problems
