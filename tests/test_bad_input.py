"""Every failure a user can cause ends in one line that names it: a matrix of commands and bad
inputs, each run as a subprocess. Each must exit with status 2, print exactly one `error:` line
(the last on stderr) naming the input, show no traceback, and leave nothing behind in the
folder it was pointed at."""

import os
import shutil
import subprocess
import sys

import pytest
from train_testlib import REPO, env, run_train

from frameselect_jax import records, synthetic

TRAIN = [sys.executable, "-m", "train"]
STAGE1 = [*TRAIN, "--config=configs/stage1.py:tiny", "--config.log.progress=False"]
STAGE2 = [
  *TRAIN,
  "--config=configs/stage2.py:tiny",
  "--config.log.progress=False",
  "--config.train.num_steps=2",
]
COMPILE = [sys.executable, "-m", "train.compile", "--config=configs/stage1.py:tiny"]
PLAN = [sys.executable, "-m", "train.plan", "--config=configs/stage2.py:tiny"]
SELECT = [sys.executable, "-m", "frameselect_jax.cli", "select"]
BUILD = [sys.executable, "-m", "data.build", "--config=configs/build.py:tiny,benchmark=jsonl"]


LABEL = [sys.executable, "-m", "data.label"]
EVAL = [sys.executable, "-m", "eval"]


def eval_argv(i, o, *changes):
  """python -m eval over the inputs' generic items, writing under the fresh output folder."""
  return [
    *EVAL,
    "--config=configs/eval/jsonl.py",
    f"--config.root={i}/items.jsonl",
    f"--config.output={o}/eval",
    "--config.strategies=uniform",
    *changes,
  ]


def label_argv(i, o, *changes):
  """data.label over the inputs' generic items, writing under the fresh output folder."""
  return [
    *LABEL,
    "--config=configs/label.py:benchmark=jsonl",
    f"--config.label.root={i}/items.jsonl",
    f"--config.label.output={o}/labels/labels.jsonl",
    *changes,
  ]


def build_argv(i, o, *changes):
  """data.build over the inputs' generic items, writing under the fresh output folder."""
  return [
    *BUILD,
    f"--config.build.root={i}/items.jsonl",
    f"--config.build.labels={i}/labels.jsonl",
    f"--config.build.data_dir={o}/tfds",
    *changes,
  ]


SMALL_RUN = (
  "--config.train.num_steps=2",
  "--config.data.global_batch_size=4",
  "--config.data.synthetic_train_videos=8",
  "--config.data.synthetic_eval_videos=2",
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """What the cases point at: a stage-1 checkpoint (2 steps of the tiny config), damaged
  copies of it, a video, a corrupt dataset and one whose records lack their question."""
  root = tmp_path_factory.mktemp("inputs")
  run_train("configs/stage1.py:tiny", str(root / "stage1"), *SMALL_RUN)
  step_dir = root / "stage1" / "checkpoints" / "2"
  # Damaged copies: array files overwritten (a bad disk), metadata cut short (a killed copy).
  shutil.copytree(root / "stage1", root / "damaged_arrays")
  for path in (root / "damaged_arrays" / "checkpoints" / "2" / "params").glob("ocdbt.*/d/*"):
    path.write_bytes(os.urandom(100))
  shutil.copytree(root / "stage1", root / "damaged_metadata")
  metadata = root / "damaged_metadata" / "checkpoints" / "2" / "params" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:20])
  assert step_dir.is_dir()
  (root / "random.array_record").write_bytes(os.urandom(5000))
  made = synthetic.needle_records(4, 16, 56, seed=0)
  for r in made:
    del r["question"]
  records.write_array_record(str(root / "no_question.array_record"), made)
  synthetic.needle_video(root / "clip.mp4", num_frames=24, fps=8, size=64, seed=0)
  (root / "a_folder.mp4").mkdir()
  (root / "not_a_folder").write_text("a file where a workdir should go")
  (root / "items.jsonl").write_text('{"qid": "1", "video": "clip.mp4", "question": "Where?"}\n')
  (root / "labels.jsonl").write_text('{"qid": "1", "labels": [0.5]}\n')
  (root / "bad_items.jsonl").write_text('{"qid": "1", "video": "clip.mp4"}\n')
  (root / "other_work").mkdir()
  (root / "other_work" / "manifest.json").write_text('{"fingerprint": "another build"}')
  return root


def _cases():
  """(name, argv given the inputs folder and a fresh output folder, what the line must name)."""
  return [
    # python -m train
    (
      "no such dataset",
      lambda i, o: [
        *STAGE1,
        f"--workdir={o}/run",
        "--config.data.source=array_record",
        "--config.data.train_path=/nope/x.array_record",
      ],
      "data.train_path='/nope/x.array_record'",
    ),
    (
      "corrupt dataset",
      lambda i, o: [
        *STAGE1,
        f"--workdir={o}/run",
        "--config.data.source=array_record",
        f"--config.data.train_path={i}/random.array_record",
      ],
      "random.array_record",
    ),
    (
      "records without a question",
      lambda i, o: [
        *STAGE1,
        f"--workdir={o}/run",
        "--config.data.source=array_record",
        f"--config.data.train_path={i}/no_question.array_record",
      ],
      "lacks fields ['question']",
    ),
    (
      "a hard-negative weight without other questions",
      lambda i, o: [*STAGE1, f"--workdir={o}/run", "--config.train.other_question_weight=10"],
      "the training records have no other_labels",
    ),
    (
      "label smoothing out of range",
      lambda i, o: [*STAGE1, f"--workdir={o}/run", "--config.train.label_smoothing=1.5"],
      "train.label_smoothing must be in [0, 1)",
    ),
    (
      "a learning-rate scaling without its reference batch",
      lambda i, o: [*STAGE1, f"--workdir={o}/run", "--config.train.lr_scaling=sqrt"],
      "needs train.lr_reference_batch >= 1",
    ),
    ("unwritable workdir", lambda i, o: [*STAGE1, "--workdir=/proc/nope"], "/proc/nope"),
    (
      "workdir is a file",
      lambda i, o: [*STAGE1, f"--workdir={i}/not_a_folder"],
      "not_a_folder: exists and is not a directory",
    ),
    (
      "unwritable cache folder",
      lambda i, o: [*STAGE1, f"--workdir={o}/run", "--config.data.cache_dir=/proc/cache"],
      "/proc/cache",
    ),
    (
      "no such config field",
      lambda i, o: [*STAGE1, f"--workdir={o}/run", "--config.train.lrr=0.1"],
      "--config.train.lrr=0.1: the config has no field 'train.lrr'; did you mean 'lr'?",
    ),
    (
      "malformed override",
      lambda i, o: [*STAGE1, f"--workdir={o}/run", "--config.train.lr=fast"],
      "--config.train.lr=fast",
    ),
    (
      "no such config file",
      lambda i, o: [*TRAIN, "--config=configs/nope.py", f"--workdir={o}/run"],
      "configs/nope.py",
    ),
    (
      "unknown config argument",
      lambda i, o: [*TRAIN, "--config=configs/needle.py:stages=2", f"--workdir={o}/run"],
      "unknown config argument 'stages'",
    ),
    (
      "missing stage-1 checkpoint",
      lambda i, o: [*STAGE2, f"--workdir={o}/run", f"--config.train.init_from={i}/nothing"],
      "train.init_from=",
    ),
    (
      "damaged checkpoint arrays",
      lambda i, o: [
        *STAGE2,
        f"--workdir={o}/run",
        f"--config.train.init_from={i}/damaged_arrays/checkpoints",
      ],
      "damaged_arrays/checkpoints/2/params: cannot read its arrays",
    ),
    (
      "damaged checkpoint metadata",
      lambda i, o: [
        *STAGE2,
        f"--workdir={o}/run",
        f"--config.train.init_from={i}/damaged_metadata/checkpoints",
      ],
      "damaged_metadata/checkpoints/2/params: cannot read its metadata",
    ),
    (
      "resuming from a damaged checkpoint",
      lambda i, o: [*STAGE1, f"--workdir={i}/damaged_arrays", *SMALL_RUN],
      "damaged_arrays/checkpoints/2: cannot restore it",
    ),
    (
      "checkpoint of another model size",
      lambda i, o: [
        *STAGE2,
        f"--workdir={o}/run",
        f"--config.train.init_from={i}/stage1/checkpoints",
        "--config.model.num_candidates=8",
      ],
      "parameter ['score_head']['linear_2']['bias'] has shape (16,), the model expects (8,)",
    ),
    # python -m train.compile
    (
      "unknown topology",
      lambda i, o: [*COMPILE, "--topology=v9z:3x3"],
      "--topology=v9z:3x3: unknown chip 'v9z'; known: v4, v5e, v5p, v6e",
    ),
    ("topology without a grid", lambda i, o: [*COMPILE, "--topology=v5e"], "--topology=v5e"),
    (
      "report into a missing folder",
      lambda i, o: [*COMPILE, "--topology=v5e:2x2", f"--json_out={i}/nothing/report.json"],
      "nothing/report.json: the folder",
    ),
    # python -m train.plan
    ("plan without topologies", lambda i, o: [*PLAN, f"--out={o}/p"], "--topologies is required"),
    (
      "plan mesh not data:fsdp:tensor",
      lambda i, o: [*PLAN, "--topologies=v5e:2x2", "--meshes=4x1x1", f"--out={o}/p"],
      "--meshes: '4x1x1' is not data:fsdp:tensor",
    ),
    (
      "plan mesh the topology cannot have",
      lambda i, o: [*PLAN, "--topologies=v5e:2x2", "--meshes=3:1:1", f"--out={o}/p"],
      "--meshes: none of ['3x1x1'] is allowed on v5e:2x2 (4 chips)",
    ),
    (
      "plan unknown remat policy",
      lambda i, o: [*PLAN, "--topologies=v5e:2x2", "--remats=block,fast", f"--out={o}/p"],
      "--remats: 'fast' is none of",
    ),
    (
      "plan headroom of all the HBM",
      lambda i, o: [*PLAN, "--topologies=v5e:2x2", "--headroom=1", f"--out={o}/p"],
      "--headroom=1.0 must be in [0, 1)",
    ),
    (
      "plan no compile jobs",
      lambda i, o: [*PLAN, "--topologies=v5e:2x2", "--jobs=0", f"--out={o}/p"],
      "--jobs=0 must be at least 1",
    ),
    (
      "plan unknown topology",
      lambda i, o: [*PLAN, "--topologies=v5e:2x2,v9z:3x3", f"--out={o}/p"],
      "--topology=v9z:3x3: unknown chip 'v9z'",
    ),
    # frameselect select
    (
      "video path is a folder",
      lambda i, o: [*SELECT, f"{i}/a_folder.mp4", "Where is the red card?"],
      "a_folder.mp4: not a regular file",
    ),
    (
      "plot into a folder",
      lambda i, o: [*SELECT, f"{i}/clip.mp4", "Where?", "-n", "16", f"--plot={i}/a_folder.mp4"],
      "--plot",
    ),
    (
      "missing checkpoint",
      lambda i, o: [*SELECT, f"{i}/clip.mp4", "Where?", f"--checkpoint={i}/nothing"],
      "nothing",
    ),
    (
      "damaged checkpoint",
      lambda i, o: [*SELECT, f"{i}/clip.mp4", "Where?", f"--checkpoint={i}/damaged_arrays"],
      "cannot read its arrays",
    ),
    # python -m data.build
    (
      "unknown benchmark",
      lambda i, o: build_argv(i, o, "--config.build.benchmark=nextqq"),
      "build.benchmark='nextqq'; known: nextqa",
    ),
    (
      "no annotation file",
      lambda i, o: build_argv(i, o, f"--config.build.root={i}/nothing.jsonl"),
      "nothing.jsonl: does not exist",
    ),
    (
      "an item without its question",
      lambda i, o: build_argv(i, o, f"--config.build.root={i}/bad_items.jsonl"),
      "bad_items.jsonl: line 1: field 'question' is missing",
    ),
    (
      "no label file",
      lambda i, o: build_argv(i, o, f"--config.build.labels={i}/nothing.jsonl"),
      "build.labels=",
    ),
    (
      "unknown store",
      lambda i, o: build_argv(i, o, "--config.build.store=png"),
      "build.store='png'; choose one of ('jpeg', 'visual_tokens')",
    ),
    (
      "work dir of another build",
      lambda i, o: build_argv(i, o, f"--config.build.work_dir={i}/other_work"),
      "other_work holds work shards built with other settings",
    ),
    # python -m data.label
    (
      "unknown label kind",
      lambda i, o: label_argv(i, o, "--config.label.kinds=visual"),
      "label.kinds='visual'; choose one of",
    ),
    (
      "no server for the labels",
      lambda i, o: label_argv(i, o),
      "label.openai needs base_url and model",
    ),
    ("a shard that is not one", lambda i, o: label_argv(i, o, "--shard=3/2"), "--shard='3/2'"),
    (
      "no items to label",
      lambda i, o: label_argv(i, o, f"--config.label.root={i}/nothing"),
      "nothing: does not exist",
    ),
    (
      "merge of a missing shard",
      lambda i, o: [*LABEL, "merge", f"--inputs={i}/nothing.jsonl", f"--output={o}/m.jsonl"],
      "nothing.jsonl: no such file",
    ),
    # python -m eval
    (
      "unknown strategy",
      lambda i, o: eval_argv(i, o, "--config.strategies=uniform,best"),
      "unknown strategy 'best'",
    ),
    (
      "a frame budget over n",
      lambda i, o: eval_argv(i, o, "--config.ks=(8,999)"),
      "ks=[8, 999] must be frame budgets in [1, n=128]",
    ),
    (
      "selector strategies without a selector",
      lambda i, o: eval_argv(i, o, "--config.strategies=nms_greedy"),
      "top_k and nms_greedy need a selector",
    ),
    (
      "no benchmark folder",
      lambda i, o: eval_argv(i, o, f"--config.root={i}/nothing"),
      "nothing: does not exist",
    ),
    (
      "a selection file that is not there",
      lambda i, o: eval_argv(i, o, f"--config.strategies=file:{i}/nothing.jsonl"),
      "strategy file:",
    ),
    ("an eval shard that is not one", lambda i, o: eval_argv(i, o, "--shard=1/1"), "--shard='1/1'"),
  ]


def _tree(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name, argv, names", _cases(), ids=[c[0] for c in _cases()])
def test_a_user_mistake_is_one_line_and_status_2(inputs, tmp_path, name, argv, names):
  before = _tree(inputs)
  proc = subprocess.run(
    argv(inputs, tmp_path),
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=180,
  )
  stderr_lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error_lines = [line for line in stderr_lines if "error:" in line]
  assert len(error_lines) == 1 and error_lines[0] == stderr_lines[-1], proc.stderr[-3000:]
  assert error_lines[0].startswith(("error: ", "config error: ")), error_lines[0]
  assert names in error_lines[0], error_lines[0]
  # Nothing left half-written: no workdir, no cache or data folder beside it, inputs unchanged.
  assert _tree(tmp_path) == [] and _tree(inputs) == before
