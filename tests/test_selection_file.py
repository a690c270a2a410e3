"""The selection file: its reader checks every line and names the bad one; its writer leaves
whole lines only; reading it never imports JAX."""

import json
import os
import subprocess
import sys

import pytest

from frameselect_jax import jsonl, selection_file

GOOD = {
  "qid": "q1",
  "video_id": "v1",
  "strategy": "nms_greedy",
  "n": 8,
  "k": 3,
  "indices": [0, 4, 7],
  "timestamps": [0.5, 4.5, 7.5],
  "scores": [0.1, None, 0.3, 0.0, 2.0, -1.0, 0.2, 0.9],
}


def test_round_trip_and_append(tmp_path):
  path = str(tmp_path / "sel.jsonl")
  assert selection_file.write(path, [GOOD]) == 1
  second = dict(GOOD, qid="q2", scores=None)
  del second["scores"]
  assert selection_file.append(path, [second]) == 1
  assert selection_file.read(path) == [GOOD, second]


@pytest.mark.parametrize(
  "change, message",
  [
    ({"indices": [4, 0, 7]}, "sorted and unique"),
    ({"indices": [0, 4, 4]}, "sorted and unique"),
    ({"indices": [0, 4, 8]}, "must lie in [0, n=8)"),
    ({"indices": [-1, 4, 7]}, "must lie in [0, n=8)"),
    ({"timestamps": [0.5, 4.5]}, "2 timestamps for 3 indices"),
    ({"scores": [0.0] * 7}, "scores must be a list of length n=8"),
    ({"k": 2}, "3 indices for k=2"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"qid": ""}, "qid must be a non-empty string"),
    ({"indices": [0, 1.5, 7]}, "indices must be a list of integers"),
  ],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, change, message):
  path = tmp_path / "sel.jsonl"
  lines = [json.dumps(GOOD), "", json.dumps(dict(GOOD, **change))]
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(jsonl.JsonlError) as error:
    selection_file.read(str(path))
  assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_missing_field_and_broken_json_are_named(tmp_path):
  path = tmp_path / "sel.jsonl"
  record = dict(GOOD)
  del record["timestamps"]
  path.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
  with pytest.raises(jsonl.JsonlError, match=r"sel.jsonl:2: missing fields \['timestamps'\]"):
    selection_file.read(str(path))
  path.write_text(json.dumps(GOOD) + '\n{"qid": \n')
  with pytest.raises(jsonl.JsonlError, match=r"sel.jsonl:2: not valid JSON"):
    selection_file.read(str(path))


def test_the_writer_refuses_a_bad_record_and_keeps_the_good_ones(tmp_path):
  path = str(tmp_path / "sel.jsonl")
  with pytest.raises(ValueError, match="sorted and unique"):
    selection_file.write(path, [GOOD, dict(GOOD, qid="q2", indices=[7, 0, 4])])
  assert selection_file.read(path) == [GOOD]


def test_a_half_line_left_by_a_killed_writer_is_cut_before_appending(tmp_path):
  path = tmp_path / "sel.jsonl"
  whole = json.dumps(GOOD) + "\n"
  path.write_text(whole + whole[: len(whole) // 2])  # killed mid-line
  selection_file.append(str(path), [dict(GOOD, qid="q3")])
  assert [r["qid"] for r in selection_file.read(str(path))] == ["q1", "q3"]
  assert path.read_text().endswith("\n")


def test_reading_a_selection_file_does_not_import_jax(tmp_path):
  path = str(tmp_path / "sel.jsonl")
  selection_file.write(path, [GOOD])
  code = (
    "import sys; from frameselect_jax import selection_file; "
    f"selection_file.read({path!r}); "
    "print(sorted(m for m in ('jax', 'flax', 'frameselect_jax.api') if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
  )
  assert out.stdout.strip() == "[]"
