"""Video-question pairs from the released annotation files of video-QA benchmarks.

  items = videoqa.load("nextqa", root, split="val")        # videos_dir=... when they sit elsewhere
  items.problems                                            # [Problem(qid, kind, reason), ...]

One loader per benchmark, each reading the files exactly as the benchmark releases them,
laid out under `root` as they come (the loader's docstring says where they are published and
how they sit). Training data, pseudo-labels and the evaluation harness all read items
through here, so the three agree on what a question is.

Nothing is silently dropped. An item whose video is missing, whose answer is not among its
options, or which has no public answer is still returned, and a `Problem` naming it is added
to `items.problems` (`items.usable()` leaves those out; a harness decides). A file that does
not parse, or an entry without a field it needs, raises `AnnotationError` naming the file,
the row and the field.

Pure Python (json, csv; pyarrow for Video-MME's parquet): no JAX.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import json
import os
from typing import Callable, Iterable

from frameselect_jax.errors import InputError

# Problem kinds.
MISSING_VIDEO = "missing_video"
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
NO_ANSWER = "no_answer"  # kept, but cannot be scored
PROBLEM_KINDS = (MISSING_VIDEO, ANSWER_NOT_IN_OPTIONS, NO_ANSWER)


class AnnotationError(InputError):
  """An annotation file that does not parse, or an entry that lacks a field or has a bad one."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One question about one video.

  video is the resolved path (a file, or for a few MVBench tasks a folder of frames); span
  [start_s, end_s) in seconds of that video, or None for the whole video. options are the
  texts without letters, empty for an open-ended question; answer_index is 0-based, None for
  an open-ended question or one without a public answer. category holds the annotation's own
  breakdown fields; extra holds what the benchmark gives beyond these fields (the needle
  benchmark's ground truth, a generic line's other keys).
  """

  benchmark: str
  qid: str
  video: str
  question: str
  options: tuple[str, ...] = ()
  answer_index: int | None = None
  answer: str | None = None
  start_s: float | None = None
  end_s: float | None = None
  duration_s: float | None = None
  category: dict = dataclasses.field(default_factory=dict)
  video_id: str = ""  # the benchmark's id of the video; questions about one video share it
  frame_rate: float | None = None  # a folder of frames: the rate they were taken at (fps)
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def span(self) -> tuple[float, float] | None:
    """(start_s, end_s) for `video.decode_candidates(span=...)`, None for the whole video."""
    if self.start_s is None and self.end_s is None:
      return None
    return (self.start_s or 0.0, self.end_s if self.end_s is not None else float("inf"))

  @property
  def open_ended(self) -> bool:
    return not self.options

  @property
  def scorable(self) -> bool:
    """Has an answer to score against: an option index, or the text of an open answer."""
    return self.answer_index is not None if self.options else bool(self.answer)

  def to_json(self) -> dict:
    """The item as a line of the generic `jsonl` format (video as resolved, absolute)."""
    line = {
      "benchmark": self.benchmark,
      "qid": self.qid,
      "video_id": self.video_id,
      "video": self.video,
      "question": self.question,
      "options": list(self.options),
      "answer": self.answer,
      "answer_index": self.answer_index,
      "start_s": self.start_s,
      "end_s": self.end_s,
      "duration_s": self.duration_s,
      "frame_rate": self.frame_rate,
      "category": dict(self.category),
    }
    return {**self.extra, **line}


@dataclasses.dataclass(frozen=True)
class Problem:
  """Why one item cannot be used as it is (kind: one of PROBLEM_KINDS)."""

  benchmark: str
  qid: str
  kind: str
  reason: str


class Items(list):
  """A list of Item, with the problems found while loading them (`problems`)."""

  def __init__(self, items: Iterable[Item] = (), problems: Iterable[Problem] = ()):
    super().__init__(items)
    self.problems = list(problems)

  def problem_counts(self) -> dict[str, int]:
    """kind -> how many items have it."""
    return dict(collections.Counter(p.kind for p in self.problems))

  def usable(self, scorable: bool = True) -> "Items":
    """The items without a missing video or a wrong answer (and, when scorable, with an
    answer to score against); the problems carry over."""
    bad = {p.qid for p in self.problems if p.kind != NO_ANSWER}
    keep = [i for i in self if i.qid not in bad and (i.scorable or not scorable)]
    return Items(keep, self.problems)

  def summary(self) -> str:
    """'1234 items; 3 missing_video, 1 no_answer' (what a report prints)."""
    counts = self.problem_counts()
    text = ", ".join(f"{counts[k]} {k}" for k in PROBLEM_KINDS if k in counts)
    return f"{len(self)} items" + (f"; {text}" if text else "")


# --- Reading fields, with errors naming file, row and field ---


class _Rows:
  """Checked access to one file's entries: every error names the file, the row, the field."""

  def __init__(self, path: str, row_name: str = "entry"):
    self.path, self.row_name = path, row_name

  def error(self, row, message: str) -> AnnotationError:
    return AnnotationError(f"{self.path}: {self.row_name} {row}: {message}")

  def get(self, entry, row, name: str, kind=str, optional: bool = False):
    if not isinstance(entry, dict):
      raise self.error(row, f"expected an object, got {type(entry).__name__}")
    value = entry.get(name)
    if value is None or (kind is not str and value == ""):
      if optional:
        return None
      raise self.error(row, f"field {name!r} is missing")
    try:
      if kind is str:
        if isinstance(value, (dict, list)):
          raise ValueError
        return str(value)
      if kind is int:
        if isinstance(value, bool) or float(value) != int(float(value)):
          raise ValueError
        return int(float(value))
      if kind is float:
        return float(value)
      if kind is list:
        if hasattr(value, "tolist"):  # a pyarrow / numpy array
          value = value.tolist()
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
          raise ValueError
        return [str(v) for v in value]
    except (TypeError, ValueError):
      pass
    raise self.error(row, f"field {name!r} must be {_KIND_NAMES[kind]}, got {value!r}")


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list of strings"}


def _read_json(path: str, expect: type):
  if not os.path.isfile(path):
    raise AnnotationError(f"{path}: no such annotation file ({_listing(os.path.dirname(path))})")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise AnnotationError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, expect):
    raise AnnotationError(
      f"{path}: expected a JSON {'list' if expect is list else 'object'}, got {type(data).__name__}"
    )
  return data


def _listing(folder: str) -> str:
  if not os.path.isdir(folder):
    return f"{folder} does not exist"
  names = sorted(os.listdir(folder))
  if not names:
    return f"{folder} is empty"
  shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
  return f"{folder} holds {shown}"


class _Builder:
  """Collects items and their problems; checks qids are unique and videos exist."""

  def __init__(self, benchmark: str):
    self.benchmark = benchmark
    self.items: list[Item] = []
    self.problems: list[Problem] = []
    self.seen: dict[str, str] = {}

  def add(self, rows: _Rows, row, item: Item, *, video_is_folder: bool = False):
    if item.qid in self.seen:
      raise rows.error(row, f"qid {item.qid!r} repeats {self.seen[item.qid]}")
    self.seen[item.qid] = f"{rows.row_name} {row}"
    if not item.question.strip():
      raise rows.error(row, "the question is empty")
    exists = os.path.isdir if video_is_folder else os.path.isfile
    if not exists(item.video):
      what = "frame folder" if video_is_folder else "video"
      self.problem(item.qid, MISSING_VIDEO, f"{what} {item.video} does not exist")
    if item.options:
      index = item.answer_index
      if index is None and item.answer is None:
        self.problem(item.qid, NO_ANSWER, "the annotation gives no answer")
      elif index is None or not 0 <= index < len(item.options):
        told = f"answer {item.answer!r}" if index is None else f"answer index {index}"
        self.problem(
          item.qid,
          ANSWER_NOT_IN_OPTIONS,
          f"{told} is not among its {len(item.options)} options",
        )
        item = dataclasses.replace(item, answer_index=None)
    elif not item.answer:
      self.problem(item.qid, NO_ANSWER, "the annotation gives no answer")
    self.items.append(item)

  def problem(self, qid, kind, reason):
    self.problems.append(Problem(self.benchmark, qid, kind, reason))

  def result(self) -> Items:
    return Items(self.items, self.problems)


def _answer_among(options: list[str], answer: str | None) -> int | None:
  """The index of the answer text among the options; None when it is not there (the item
  then gets an answer_not_in_options problem, or no_answer when there is no answer)."""
  stripped = [o.strip() for o in options]
  return (
    stripped.index(answer.strip()) if answer is not None and answer.strip() in stripped else None
  )


def _with_answer_text(item_kwargs: dict) -> dict:
  options, index = item_kwargs["options"], item_kwargs.get("answer_index")
  if item_kwargs.get("answer") is None and index is not None and 0 <= index < len(options):
    item_kwargs["answer"] = options[index]
  return item_kwargs


# --- The benchmarks ---


def load_nextqa(root: str, split: str, videos_dir: str | None = None) -> Items:
  """NExT-QA multiple choice (github.com/doc-doc/NExT-QA; annotations in its dataset/nextqa/).

  root/{train,val,test}.csv (columns video, frame_count, width, height, question, answer,
  qid, type, a0..a4; answer is an index into a0..a4), root/map_vid_vidorID.json (video id ->
  '0101/2909445186'); videos at videos_dir (default root/NExTVideo)/<that>.mp4. The qid is
  '<video>_<qid>'; category {'type': CW|CH|TN|TC|TP|DC|DL|DO}. No duration field.
  """
  path = os.path.join(root, f"{split}.csv")
  if not os.path.isfile(path):
    raise AnnotationError(f"{path}: no such annotation file ({_listing(root)})")
  mapping = _read_json(os.path.join(root, "map_vid_vidorID.json"), dict)
  videos_dir = videos_dir or os.path.join(root, "NExTVideo")
  rows = _Rows(path, "line")
  out = _Builder("nextqa")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    needed = ["video", "question", "answer", "qid", "type"] + [f"a{i}" for i in range(5)]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
      raise AnnotationError(f"{path}: line 1: the header lacks columns {missing}")
    for line, entry in enumerate(reader, start=2):
      video_id = rows.get(entry, line, "video")
      if video_id not in mapping:
        raise rows.error(line, f"field 'video': {video_id!r} is not in map_vid_vidorID.json")
      options = [rows.get(entry, line, f"a{i}") for i in range(5)]
      out.add(
        rows,
        line,
        Item(
          **_with_answer_text(
            dict(
              benchmark="nextqa",
              qid=f"{video_id}_{rows.get(entry, line, 'qid')}",
              video=os.path.join(videos_dir, f"{mapping[video_id]}.mp4"),
              video_id=video_id,
              question=rows.get(entry, line, "question"),
              options=tuple(options),
              answer_index=rows.get(entry, line, "answer", int),
              category={"type": rows.get(entry, line, "type")},
            )
          )
        ),
      )
  return out.result()


def load_egoschema(root: str, split: str, videos_dir: str | None = None) -> Items:
  """EgoSchema (github.com/egoschema/EgoSchema): root/questions.json, a list of q_uid,
  question, 'option 0'..'option 4'; root/subset_answers.json, q_uid -> answer index, public
  for the 500-question subset only; videos at videos_dir (default root/videos)/<q_uid>.mp4.

  split 'subset': the questions with public answers; 'full': all of them, the others kept
  with answer_index None and a no_answer problem (unscorable here; the benchmark's server
  scores them).
  """
  path = os.path.join(root, "questions.json")
  questions = _read_json(path, list)
  answers_path = os.path.join(root, "subset_answers.json")
  answers = _read_json(answers_path, dict)
  answer_rows = _Rows(answers_path, "entry")
  videos_dir = videos_dir or os.path.join(root, "videos")
  rows = _Rows(path)
  out = _Builder("egoschema")
  for row, entry in enumerate(questions):
    qid = rows.get(entry, row, "q_uid")
    if split == "subset" and qid not in answers:
      continue
    index = answer_rows.get(answers, repr(qid), qid, int) if qid in answers else None
    out.add(
      rows,
      row,
      Item(
        **_with_answer_text(
          dict(
            benchmark="egoschema",
            qid=qid,
            video=os.path.join(videos_dir, f"{qid}.mp4"),
            video_id=qid,
            question=rows.get(entry, row, "question"),
            options=tuple(rows.get(entry, row, f"option {i}") for i in range(5)),
            answer_index=index,
          )
        )
      ),
    )
  return out.result()


ACTIVITYNET_QA_TYPES = (
  "Motion",
  "Spatial",
  "Temporal",
  "Yes/No",
  "Color",
  "Object",
  "Location",
  "Number",
  "Other",
)
ACTIVITYNET_EXTENSIONS = (".mp4", ".webm", ".mkv")


def load_activitynet_qa(root: str, split: str, videos_dir: str | None = None) -> Items:
  """ActivityNet-QA, open-ended (github.com/MILVLG/activitynet-qa; annotations in its
  dataset/): root/{split}_q.json (video_name, question, question_id) joined on question_id
  with root/{split}_a.json (answer, type 0-8); videos at videos_dir (default root/videos)/
  v_<video_name> with extension .mp4, .webm or .mkv. category {'type': Motion, Spatial,
  Temporal, Yes/No, Color, Object, Location, Number or Other}.
  """
  q_path, a_path = (os.path.join(root, f"{split}_{s}.json") for s in ("q", "a"))
  questions, answers = _read_json(q_path, list), _read_json(a_path, list)
  q_rows, a_rows = _Rows(q_path), _Rows(a_path)
  by_id = {}
  for row, entry in enumerate(answers):
    by_id[a_rows.get(entry, row, "question_id")] = (row, entry)
  videos_dir = videos_dir or os.path.join(root, "videos")
  out = _Builder("activitynet_qa")
  for row, entry in enumerate(questions):
    qid = q_rows.get(entry, row, "question_id")
    if qid not in by_id:
      raise q_rows.error(row, f"field 'question_id': {qid!r} has no answer in {a_path}")
    a_row, answer = by_id[qid]
    code = a_rows.get(answer, a_row, "type", int)
    if not 0 <= code < len(ACTIVITYNET_QA_TYPES):
      raise a_rows.error(a_row, f"field 'type' must be a code in 0..8, got {code}")
    name = "v_" + q_rows.get(entry, row, "video_name")
    tried = [os.path.join(videos_dir, name + ext) for ext in ACTIVITYNET_EXTENSIONS]
    found = next((p for p in tried if os.path.isfile(p)), tried[0])
    out.add(
      q_rows,
      row,
      Item(
        benchmark="activitynet_qa",
        qid=qid,
        video=found,
        video_id=name,
        question=q_rows.get(entry, row, "question"),
        answer=a_rows.get(answer, a_row, "answer"),
        category={"type": ACTIVITYNET_QA_TYPES[code]},
      ),
    )
  return out.result()


def load_longvideobench(root: str, split: str, videos_dir: str | None = None) -> Items:
  """LongVideoBench (huggingface.co/datasets/longvideobench/LongVideoBench): root/lvb_val.json
  (split 'val'; 'test' reads lvb_test_wo_gt.json, which has no answers), a list of id,
  video_path, question, candidates, correct_choice (index), duration (s), duration_group,
  question_category, topic_category, level; videos at videos_dir (default root/videos)/
  <video_path>.
  """
  name = {"val": "lvb_val.json", "test": "lvb_test_wo_gt.json"}[split]
  path = os.path.join(root, name)
  entries = _read_json(path, list)
  videos_dir = videos_dir or os.path.join(root, "videos")
  rows = _Rows(path)
  out = _Builder("longvideobench")
  for row, entry in enumerate(entries):
    video_path = rows.get(entry, row, "video_path")
    out.add(
      rows,
      row,
      Item(
        **_with_answer_text(
          dict(
            benchmark="longvideobench",
            qid=rows.get(entry, row, "id"),
            video=os.path.join(videos_dir, video_path),
            video_id=str(entry.get("video_id") or os.path.splitext(video_path)[0]),
            question=rows.get(entry, row, "question"),
            options=tuple(rows.get(entry, row, "candidates", list)),
            answer_index=rows.get(entry, row, "correct_choice", int, optional=True),
            duration_s=rows.get(entry, row, "duration", float, optional=True),
            category={
              k: str(entry[k])
              for k in ("duration_group", "question_category", "topic_category", "level")
              if entry.get(k) is not None
            },
          )
        )
      ),
    )
  return out.result()


def load_videomme(root: str, split: str, videos_dir: str | None = None) -> Items:
  """Video-MME (huggingface.co/datasets/lmms-lab/Video-MME): root/videomme/
  test-00000-of-00001.parquet, or the same rows as root/videomme/test.json (a list): columns
  question_id, videoID, duration (short, medium or long), domain, sub_category, task_type,
  question, options ('A. ...'), answer (a letter); videos at videos_dir (default root/data)/
  <videoID>.mp4. Letters are stripped from the options.
  """
  folder = os.path.join(root, "videomme")
  parquets = sorted(glob.glob(os.path.join(folder, f"{split}-*.parquet")))
  if parquets:
    import pyarrow.parquet as pq

    entries, path = [], ",".join(parquets)
    for file in parquets:
      try:
        entries += pq.read_table(file).to_pylist()
      except Exception as e:  # pyarrow's errors: ArrowInvalid, OSError
        raise AnnotationError(f"{file}: not a readable parquet file ({e})") from None
  else:
    path = os.path.join(folder, f"{split}.json")
    if not os.path.isfile(path):
      raise AnnotationError(
        f"{folder}: neither {split}-*.parquet nor {split}.json is there ({_listing(folder)})"
      )
    entries = _read_json(path, list)
  videos_dir = videos_dir or os.path.join(root, "data")
  rows = _Rows(path, "row")
  out = _Builder("videomme")
  for row, entry in enumerate(entries):
    lettered = rows.get(entry, row, "options", list)
    letters, options = [], []
    for text in lettered:
      letter, dot, rest = text.partition(".")
      if not dot or len(letter.strip()) != 1:
        raise rows.error(row, f"field 'options': {text!r} does not start with 'A.'-style letter")
      letters.append(letter.strip().upper())
      options.append(rest.strip())
    answer = rows.get(entry, row, "answer").strip().upper()
    index = letters.index(answer) if answer in letters else None
    video_id = rows.get(entry, row, "videoID")
    out.add(
      rows,
      row,
      Item(
        **_with_answer_text(
          dict(
            benchmark="videomme",
            qid=rows.get(entry, row, "question_id"),
            video=os.path.join(videos_dir, f"{video_id}.mp4"),
            video_id=video_id,
            question=rows.get(entry, row, "question"),
            options=tuple(options),
            answer_index=index,
            answer=None if index is not None else f"letter {answer}",
            category={
              k: str(entry[k])
              for k in ("duration", "domain", "sub_category", "task_type")
              if entry.get(k) is not None
            },
          )
        )
      ),
    )
  return out.result()


def _task_files(folder: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(folder, "*.json")))
  if not files:
    raise AnnotationError(f"{folder}: no task .json files ({_listing(folder)})")
  return files


def _candidates_item(rows: _Rows, row, entry, **fields) -> dict:
  """Fields of an item whose annotation has `candidates` and the answer's text."""
  options = rows.get(entry, row, "candidates", list, optional=True) or []
  answer = rows.get(entry, row, "answer", optional=True)
  return dict(
    question=rows.get(entry, row, "question"),
    options=tuple(options),
    answer=answer,
    answer_index=_answer_among(options, answer) if options else None,
    **fields,
  )


MLVU_OPEN_ENDED = ("sub_scene", "summary")


def load_mlvu(root: str, split: str = "dev", videos_dir: str | None = None) -> Items:
  """MLVU dev set (huggingface.co/datasets/MLVU/MVLU; github.com/JUNJIE99/MLVU): root/json/
  <n>_<task>.json (1_plotQA ... 9_summary), lists of video, duration, question, candidates,
  answer (the text), question_type; videos at videos_dir (default root/video)/<n>_<task>/
  <video>. The open-ended tasks (sub_scene, summary) have no candidates: open-ended items.
  qid '<n>_<task>/<row>'; category {'task', 'question_type'}.
  """
  del split  # the dev set is the released one with answers
  videos_dir = videos_dir or os.path.join(root, "video")
  out = _Builder("mlvu")
  for path in _task_files(os.path.join(root, "json")):
    task_file = os.path.splitext(os.path.basename(path))[0]  # e.g. 1_plotQA
    task = task_file.split("_", 1)[-1]
    rows = _Rows(path)
    for row, entry in enumerate(_read_json(path, list)):
      fields = _candidates_item(
        rows,
        row,
        entry,
        benchmark="mlvu",
        qid=f"{task_file}/{row}",
        video=os.path.join(videos_dir, task_file, rows.get(entry, row, "video")),
        video_id=f"{task_file}/{rows.get(entry, row, 'video')}",
        duration_s=rows.get(entry, row, "duration", float, optional=True),
        category={"task": task, "question_type": str(entry.get("question_type", task))},
      )
      if task in MLVU_OPEN_ENDED:
        fields.update(options=(), answer_index=None)
        if "scoring_points" in entry:  # sub_scene: what a judge scores the answer on
          fields["extra"] = {"scoring_points": entry["scoring_points"]}
      out.add(rows, row, Item(**fields))
  return out.result()


# MVBench (huggingface.co/datasets/OpenGVLab/MVBench), main branch: task -> (video folder
# under video/, candidates are a folder of frames, questions are bounded by start/end).
MVBENCH_TASKS = {
  "action_sequence": ("star/Charades_v1_480", False, True),
  "action_prediction": ("star/Charades_v1_480", False, True),
  "action_antonym": ("ssv2_video", False, False),
  "fine_grained_action": ("Moments_in_Time_Raw/videos", False, False),
  "unexpected_action": ("FunQA_test/test", False, False),
  "object_existence": ("clevrer/video_validation", False, False),
  "object_interaction": ("star/Charades_v1_480", False, True),
  "object_shuffle": ("perception/videos", False, False),
  "moving_direction": ("clevrer/video_validation", False, False),
  "action_localization": ("sta/sta_video", False, True),
  "scene_transition": ("scene_qa/video", False, False),
  "action_count": ("perception/videos", False, False),
  "moving_count": ("clevrer/video_validation", False, False),
  "moving_attribute": ("clevrer/video_validation", False, False),
  "state_change": ("perception/videos", False, False),
  "fine_grained_pose": ("nturgbd", False, False),
  "character_order": ("perception/videos", False, False),
  "egocentric_navigation": ("vlnqa", False, False),
  "episodic_reasoning": ("tvqa/frames_fps3_hq", True, True),
  "counterfactual_inference": ("clevrer/video_validation", False, False),
}
MVBENCH_FRAME_FPS = 3.0  # tvqa's frame folders: frames_fps3_hq
# The dataset's `video` revision ships the bounded clips pre-cut, and tvqa as mp4, in folders
# at the top level (no video/): these replace the main branch's folders there.
MVBENCH_SEGMENT_FOLDERS = {
  "star/Charades_v1_480": "star/Charades_segment",
  "sta/sta_video": "sta/sta_video_segment",
  "tvqa/frames_fps3_hq": "tvqa/video_fps3_hq_segment",
  "ssv2_video": "ssv2_video_mp4",
  "nturgbd": "nturgbd_convert",
}


def load_mvbench(root: str, split: str = "test", videos_dir: str | None = None) -> Items:
  """MVBench: root/json/<task>.json for the 20 tasks of MVBENCH_TASKS, lists of video,
  question, candidates, answer (the text), and start/end in seconds for the bounded tasks.

  Two layouts, told apart by root/video:
  - the main branch: videos at videos_dir (default root/video)/<the task's folder>/<video>;
    bounded items get start_s/end_s; episodic_reasoning ships folders of frames at 3 fps
    (the item's video is the folder, its frame_rate 3);
  - the `video` revision (no root/video): pre-cut clips in MVBENCH_SEGMENT_FOLDERS at the
    top level (videos_dir default root); they are the bounded span already, so no span.
  qid '<task>/<row>'; category {'task'}.
  """
  del split  # one released split
  segments = videos_dir is None and not os.path.isdir(os.path.join(root, "video"))
  videos_dir = videos_dir or os.path.join(root, "video" if not segments else "")
  out = _Builder("mvbench")
  folder = os.path.join(root, "json")
  for path in _task_files(folder):
    task = os.path.splitext(os.path.basename(path))[0]
    if task not in MVBENCH_TASKS:
      raise AnnotationError(f"{path}: unknown MVBench task {task!r}; known: {list(MVBENCH_TASKS)}")
    prefix, frame_folder, bounded = MVBENCH_TASKS[task]
    if segments:
      prefix = MVBENCH_SEGMENT_FOLDERS.get(prefix, prefix)
      frame_folder = bounded = False
    rows = _Rows(path)
    for row, entry in enumerate(_read_json(path, list)):
      start = end = None
      if bounded:
        start = rows.get(entry, row, "start", float, optional=True)
        end = rows.get(entry, row, "end", float, optional=True)
        if start is not None and end is not None and not 0 <= start < end:
          raise rows.error(row, f"fields 'start', 'end': need 0 <= start < end, got {start}, {end}")
      name = rows.get(entry, row, "video")
      item = _candidates_item(
        rows,
        row,
        entry,
        benchmark="mvbench",
        qid=f"{task}/{row}",
        video=os.path.join(videos_dir, prefix, name),
        video_id=f"{prefix}/{name}",
        start_s=start,
        end_s=end,
        category={"task": task},
        frame_rate=MVBENCH_FRAME_FPS if frame_folder else None,
      )
      out.add(rows, row, Item(**item), video_is_folder=frame_folder)
  return out.result()


GENERIC_FIELDS = (
  "qid",
  "video",
  "video_id",
  "question",
  "options",
  "answer",
  "answer_index",
  "start_s",
  "end_s",
  "duration_s",
  "frame_rate",
  "category",
  "benchmark",
)


def load_jsonl(
  root: str, split: str = "test", videos_dir: str | None = None, benchmark: str = "jsonl"
) -> Items:
  """The generic format, for anyone's data: root is a .jsonl file, or a folder holding
  <split>.jsonl. One object per line: qid, video (relative to videos_dir, default the file's
  folder, or absolute), question; optional options (texts), answer, answer_index (0-based;
  derived from answer when only the text is given), start_s, end_s (seconds), duration_s,
  category (a dict), video_id, frame_rate (when video is a folder of frames). Other keys
  are kept in the item's extra.
  """
  path = root if root.endswith(".jsonl") else os.path.join(root, f"{split}.jsonl")
  if not os.path.isfile(path):
    raise AnnotationError(f"{path}: no such file ({_listing(os.path.dirname(path) or '.')})")
  base = videos_dir or os.path.dirname(os.path.abspath(path))
  rows = _Rows(path, "line")
  out = _Builder(benchmark)
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        raise rows.error(line_number, f"not valid JSON ({e.msg})") from None
      out.add(rows, line_number, _generic_item(rows, line_number, entry, base, benchmark))
  return out.result()


def _generic_item(rows: _Rows, row, entry, base: str, benchmark: str) -> Item:
  options = rows.get(entry, row, "options", list, optional=True) or []
  answer = rows.get(entry, row, "answer", optional=True)
  index = rows.get(entry, row, "answer_index", int, optional=True)
  if options and index is None:
    index = _answer_among(options, answer)
  elif options and answer is not None and 0 <= index < len(options):
    if options[index].strip() != answer.strip():
      raise rows.error(
        row,
        f"fields 'answer' and 'answer_index' disagree: option {index} is "
        f"{options[index]!r}, answer is {answer!r}",
      )
  category = entry.get("category") or {}
  if not isinstance(category, dict):
    raise rows.error(row, f"field 'category' must be an object, got {category!r}")
  start = rows.get(entry, row, "start_s", float, optional=True)
  end = rows.get(entry, row, "end_s", float, optional=True)
  if start is not None and end is not None and not 0 <= start < end:
    raise rows.error(
      row, f"fields 'start_s', 'end_s': need 0 <= start_s < end_s, got {start}, {end}"
    )
  video = rows.get(entry, row, "video")
  return Item(
    **_with_answer_text(
      dict(
        benchmark=str(entry.get("benchmark") or benchmark),
        qid=rows.get(entry, row, "qid"),
        video=video if os.path.isabs(video) else os.path.join(base, video),
        video_id=str(entry.get("video_id") or video),
        question=rows.get(entry, row, "question"),
        options=tuple(options),
        answer=answer,
        answer_index=index if options else None,
        start_s=start,
        end_s=end,
        duration_s=rows.get(entry, row, "duration_s", float, optional=True),
        frame_rate=rows.get(entry, row, "frame_rate", float, optional=True),
        category=category,
        extra={k: v for k, v in entry.items() if k not in GENERIC_FIELDS},
      )
    )
  )


def load_needle(root: str, split: str = "test", videos_dir: str | None = None) -> Items:
  """The synthetic needle benchmark, as `synthetic.write_needle_benchmark` writes it: the
  generic format, root/<split>.jsonl, videos under root/videos. Each item's extra holds the
  ground truth: 'needle' (its source frames, seconds, box, colour, symbol), 'fps' and
  'num_frames' (`synthetic.candidate_relevance(item.extra, frame_indices)`)."""
  return load_jsonl(root, split, videos_dir, benchmark="needle")


LOADERS: dict[str, Callable[..., Items]] = {
  "nextqa": load_nextqa,
  "egoschema": load_egoschema,
  "activitynet_qa": load_activitynet_qa,
  "longvideobench": load_longvideobench,
  "videomme": load_videomme,
  "mlvu": load_mlvu,
  "mvbench": load_mvbench,
  "jsonl": load_jsonl,
  "needle": load_needle,
}
BENCHMARKS = tuple(LOADERS)
# The first split is the default: the one results are reported on.
SPLITS = {
  "nextqa": ("val", "test", "train"),
  "egoschema": ("subset", "full"),
  "activitynet_qa": ("test", "val", "train"),
  "longvideobench": ("val", "test"),
  "videomme": ("test",),
  "mlvu": ("dev",),
  "mvbench": ("test",),
  "jsonl": None,  # any name: <split>.jsonl
  "needle": None,
}


def load(
  benchmark: str, root: str, split: str | None = None, videos_dir: str | None = None
) -> Items:
  """The items of one split of a benchmark (see BENCHMARKS and SPLITS; split None takes the
  benchmark's first split, the one results are reported on, or 'test'). Raises
  AnnotationError for an unknown benchmark or split, a missing or malformed file."""
  if benchmark not in LOADERS:
    raise AnnotationError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
  splits = SPLITS[benchmark]
  if split is None:
    split = splits[0] if splits else "test"
  if splits is not None and split not in splits:
    raise AnnotationError(f"{benchmark} has splits {', '.join(splits)}; got {split!r}")
  root = os.fspath(root)
  if not os.path.exists(root):
    what = "folder, or .jsonl file" if benchmark == "jsonl" else "folder"
    raise AnnotationError(f"{root}: does not exist (the {benchmark} {what})")
  if videos_dir is not None and not os.path.isdir(videos_dir):
    raise AnnotationError(f"videos_dir {videos_dir}: no such folder")
  return LOADERS[benchmark](root, split, videos_dir)
