"""Training records: the array_record source round-trips the schema, and the per-process
pipeline reads disjoint blocks whose union is the single-process batch, in a seeded order
that resumes from its saved position, with or without grain worker processes."""

import grain
import numpy as np
import pytest
from train_testlib import losses, run_train

from frameselect_jax import input_pipeline, records, synthetic


def test_array_record_source_round_trips_records(tmp_path):
  recs = synthetic.needle_records(4, 8, 16, seed=1)
  recs[0]["options"] = ["frame 1", "frame 5"]
  path = records.write_array_record(str(tmp_path / "train.array_record"), recs)
  source = input_pipeline.ArrayRecordSource(str(tmp_path / "*.array_record"))
  assert len(source) == len(recs) == 8 and source.paths == [path]
  for got, want in zip((source[i] for i in range(len(source))), recs):
    assert set(got) == set(want)
    for key in ("frames", "timestamps", "valid", "labels", "spatial", "temporal"):
      np.testing.assert_array_equal(got[key], want[key])
      assert got[key].dtype == np.asarray(want[key]).dtype
    assert (got["video_id"], got["question"], got["answer"], list(got["options"])) == (
      want["video_id"],
      want["question"],
      want["answer"],
      list(want["options"]),
    )


def test_jpeg_frames_round_trip_and_padding_stays_empty():
  frames = np.repeat(np.repeat(np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3) * 5, 4, 1), 4, 2)
  frames = np.concatenate([frames, 255 - frames, frames])  # (3, 16, 16, 3)
  valid = np.array([True, True, False])
  jpegs = records.encode_jpeg_frames(frames, valid, quality=95)
  assert jpegs[2] == b"" and all(j[:2] == b"\xff\xd8" for j in jpegs[:2])
  back = records.decode_jpeg_frames(jpegs, valid, 16)
  assert np.abs(back[:2].astype(int) - frames[:2]).mean() < 4  # lossy, but close
  assert not back[2].any()
  resized = records.decode_jpeg_frames(jpegs, valid, 8)
  assert resized.shape == (3, 8, 8, 3)


def test_needle_labels_point_at_the_named_square():
  recs = synthetic.needle_records(3, 16, 32, seed=0)
  for r in recs:
    color = r["question"].split()[3]
    on = np.flatnonzero(r["temporal"])
    rgb = np.array(synthetic.NEEDLE_COLORS[color])
    best = int(np.argmax(r["labels"]))
    assert best in on and r["valid"][on].all()
    # the whole square shows only on the best frame
    hits = (np.abs(r["frames"].astype(int) - rgb).sum(-1) < 30).sum(axis=(1, 2))
    assert hits[best] == hits.max() > 0
    assert np.all(r["labels"][~r["valid"]] == 0)


def test_make_example_rejects_overlong_prompts_and_foreign_tokens():
  from frameselect_jax.text import ByteTokenizer

  rec = synthetic.needle_records(1, 8, 16, seed=0)[0]
  spec = input_pipeline.ExampleSpec(
    8, 16, 9, 32, max_question_length=20, max_instruction_length=200
  )
  with pytest.raises(
    ValueError, match="question prompt has .* tokens, more than the configured maximum 20"
  ):
    input_pipeline.make_example(rec, spec, ByteTokenizer(), eos_id=257, vocab_size=1024)
  spec = input_pipeline.ExampleSpec(
    8, 16, 9, 32, max_question_length=200, max_instruction_length=200
  )
  with pytest.raises(ValueError, match="does not match the LLM"):
    input_pipeline.make_example(rec, spec, ByteTokenizer(), eos_id=257, vocab_size=100)
  example = input_pipeline.make_example(rec, spec, ByteTokenizer(), eos_id=257, vocab_size=1024)
  answer = example["text_ids"][example["answer_mask"] == 1]
  assert ByteTokenizer().decode(answer[:-1]).strip() == rec["answer"] and answer[-1] == 257


def test_processes_read_disjoint_blocks_of_the_same_global_batches():
  size, batch, epochs = 20, 8, 3
  single = input_pipeline.global_batches(
    grain.MapDataset.range(size),
    global_batch_size=batch,
    process_index=0,
    process_count=1,
    seed=7,
    num_epochs=epochs,
  )
  parts = [
    input_pipeline.global_batches(
      grain.MapDataset.range(size),
      global_batch_size=batch,
      process_index=p,
      process_count=4,
      seed=7,
      num_epochs=epochs,
    )
    for p in range(4)
  ]
  assert len(single) == size * epochs // batch
  for step in range(len(single)):
    blocks = [list(parts[p][step]) for p in range(4)]
    assert sum(blocks, []) == list(single[step])  # process p holds rows [2p, 2p + 2)
  # every epoch is a fresh permutation of all records
  order = np.concatenate([single[s] for s in range(len(single))])
  assert sorted(order[:size]) == list(range(size)) and list(order[:size]) != list(
    order[size : 2 * size]
  )


def test_iterator_resumes_from_its_saved_position():
  dataset = input_pipeline.global_batches(
    grain.MapDataset.range(50),
    global_batch_size=4,
    process_index=0,
    process_count=1,
    seed=0,
    num_epochs=2,
  )
  it = input_pipeline.to_iterator(dataset)
  [next(it) for _ in range(5)]
  state = it.get_state()
  rest = [next(it).tolist() for _ in range(5)]
  again = input_pipeline.to_iterator(dataset)
  again.set_state(state)
  assert [next(again).tolist() for _ in range(5)] == rest


def test_a_video_path_instead_of_frames_is_a_clear_error():
  record = synthetic.needle_records(1, 8, 16, seed=0)[0]
  record = {k: v for k, v in record.items() if k != "frames"}
  record["video"] = "/videos/clip.mp4"
  with pytest.raises(ValueError, match="list of JPEG bytes.*got str"):
    records.record_frames(record, 16)


def test_worker_processes_give_the_same_batches_and_resume():
  """data.worker_count > 0: grain worker processes yield the in-process batches, in order,
  and an iterator restored from a saved state continues where it was."""
  dataset = input_pipeline.global_batches(
    grain.MapDataset.range(40),
    global_batch_size=4,
    process_index=0,
    process_count=1,
    seed=3,
    num_epochs=1,
  )
  in_process = [b.tolist() for b in input_pipeline.to_iterator(dataset)]
  workers = input_pipeline.to_iterator(dataset, worker_count=2)
  first = [next(workers).tolist() for _ in range(4)]
  state = workers.get_state()
  assert first + [b.tolist() for b in workers] == in_process
  again = input_pipeline.to_iterator(dataset, worker_count=2)
  again.set_state(state)
  assert [b.tolist() for b in again] == in_process[4:]


def test_training_with_grain_worker_processes_matches_in_process_loading(tmp_path):
  in_process, workers = str(tmp_path / "in_process"), str(tmp_path / "workers")
  run_train("configs/stage1.py:tiny", in_process, "--config.train.num_steps=4")
  run_train(
    "configs/stage1.py:tiny", workers, "--config.train.num_steps=4", "--config.data.worker_count=2"
  )
  assert losses(workers) == losses(in_process) and len(losses(in_process)) == 4


def test_other_labels_are_what_the_other_questions_of_the_same_video_ask_for():
  times = np.arange(4, dtype=np.float32)

  def record(video, labels, timestamps=times):
    return {"video_id": video, "timestamps": timestamps, "labels": np.float32(labels)}

  group = [
    record("a", [1, 0, 0, 0]),
    record("b", [0, 0, 0, 1]),  # another video: not counted for a
    record("a", [0, 0.5, 0, 0]),
    record("a", [0, 0.25, 0, 0.75]),
    record("a", [0, 0, 1, 0], timestamps=times + 10),  # another span of a: other candidates
  ]
  out = records.with_other_labels(group)
  np.testing.assert_array_equal(out[0]["other_labels"], [0, 0.5, 0, 0.75])
  np.testing.assert_array_equal(out[2]["other_labels"], [1, 0.25, 0, 0.75])
  np.testing.assert_array_equal(out[3]["other_labels"], [1, 0.5, 0, 0])
  for alone in (1, 4):  # the only question of its video (and candidates)
    np.testing.assert_array_equal(out[alone]["other_labels"], np.zeros(4))
  assert all(o["labels"] is g["labels"] for o, g in zip(out, group))  # copies, labels kept
  assert "other_labels" not in group[0]
