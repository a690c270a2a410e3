"""The input pipeline: record sources, record -> fixed-shape example, and the deterministic,
per-process grain batching the trainer reads.

A source is anything with `__len__` and `__getitem__(int) -> record` (grain's
RandomAccessDataSource protocol): `InMemorySource`, `ArrayRecordSource`, `TfdsSource`.
`make_example` turns a record (`frameselect_jax.records`) into fixed-shape arrays;
`global_batches` makes the deterministic, resumable, per-process grain pipeline.
"""

from __future__ import annotations

import dataclasses
import glob
from typing import Any, Callable, Sequence

import grain
import ml_dtypes
import numpy as np
from absl import flags

from frameselect_jax import records
from frameselect_jax.text import instruction_prompt, question_prompt

# --- Sources ---


class InMemorySource:
  """A list of records as a grain random-access source."""

  def __init__(self, items: Sequence[dict]):
    self.records = list(items)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]

  def __repr__(self):
    return f"InMemorySource({len(self)} records)"


class ArrayRecordSource:
  """Records from array_record files (a glob pattern or a list of paths)."""

  def __init__(self, paths: str | Sequence[str]):
    files = sorted(glob.glob(paths)) if isinstance(paths, str) else list(paths)
    if not files:
      raise FileNotFoundError(f"no array_record files match {paths!r}")
    self.paths = files
    self.source = grain.sources.ArrayRecordDataSource(files)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return records.deserialize_record(self.source[index])

  def __repr__(self):
    return f"ArrayRecordSource({len(self)} records in {len(self.paths)} files)"


def needle_source(
  root: str,
  split: str,
  num_candidates: int,
  image_size: int,
  *,
  backend: str = "auto",
  progress: bool = True,
) -> InMemorySource:
  """Training records of one split of the needle benchmark (`synthetic.write_needle_benchmark`).

  Each video's n candidates are decoded once through `video.decode_candidates`, as any
  user's video is, and shared by its questions; a question's labels are 1 on the candidates
  that show its needle (the ground truth), 0 elsewhere; its `other_labels` mark the
  candidates that show the video's other needles.
  """
  from tqdm import tqdm

  from frameselect_jax import synthetic, video, videoqa

  items = videoqa.load("needle", root, split)
  decoded = {}
  out = []
  for item in tqdm(items, desc=f"decoding needle {split}", disable=not progress, leave=False):
    if item.video_id not in decoded:
      decoded[item.video_id] = video.decode_candidates(
        item.video, n=num_candidates, size=image_size, backend=backend
      )
    candidates = decoded[item.video_id]
    out.append(
      {
        "video_id": item.video_id,
        "qid": item.qid,
        "frames": candidates.frames,
        "timestamps": candidates.timestamps,
        "valid": candidates.valid,
        "question": item.question,
        "options": list(item.options),
        "answer": item.answer,
        "labels": synthetic.candidate_relevance(item.extra, candidates.frame_indices),
      }
    )
  return InMemorySource(records.with_other_labels(out))


class TfdsSource:
  """A split of a TFDS dataset in array_record form (data/build.py writes them), read with
  `tfds.data_source`: no TensorFlow, random access, records as `frameselect_jax.records`
  has them."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds

    self.name, self.split = name, split
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return records.from_tfds(self.source[index])

  def __repr__(self):
    return f"TfdsSource({self.name}, {self.split}: {len(self)} records)"


# --- Record -> fixed-shape arrays ---


def _encode(tokenizer, text):
  return list(tokenizer.encode(text, add_special_tokens=False))


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What `make_example` produces; shared by the pipeline, the train step and AOT compile."""

  num_candidates: int
  image_size: int
  tokens_per_frame: int
  vision_width: int
  max_question_length: int
  max_instruction_length: int
  visual_dtype: str = "float32"  # dtype of cached visual tokens fed to the step

  def shapes(self, cached: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
    """field -> (shape without batch, dtype) of one example."""
    n = self.num_candidates
    out = {
      "valid": ((n,), np.bool_),
      "labels": ((n,), np.float32),
      "other_labels": ((n,), np.float32),
      "question_ids": ((self.max_question_length,), np.int32),
      "question_mask": ((self.max_question_length,), np.int32),
      "text_ids": ((self.max_instruction_length,), np.int32),
      "text_mask": ((self.max_instruction_length,), np.int32),
      "answer_mask": ((self.max_instruction_length,), np.int32),
      "weight": ((), np.float32),
    }
    if cached:
      dtype = ml_dtypes.bfloat16 if self.visual_dtype == "bfloat16" else np.dtype(self.visual_dtype)
      out["visual"] = ((n, self.tokens_per_frame, self.vision_width), dtype)
    else:
      out["frames"] = ((n, self.image_size, self.image_size, 3), np.uint8)
    return out


def make_example(
  record: dict,
  spec: ExampleSpec,
  tokenizer,
  *,
  eos_id: int,
  vocab_size: int,
  visual_lookup: Callable[[dict], np.ndarray] | None = None,
) -> dict:
  """One record -> fixed-shape numpy arrays for both training tasks.

  question_ids/mask: the selector prompt, right-padded. text_ids/mask: instruction prompt,
  answer and eos, right-padded; answer_mask marks the answer and eos tokens (the targets of
  the instruction loss). With `visual_lookup` (record -> tokens), the cached pooled tokens of
  the record's candidates replace the frames; so do the tokens a record carries itself
  (`visual_tokens`).
  """
  records.check_record(record, spec.num_candidates)
  valid = np.asarray(record["valid"], bool)
  options = record.get("options") or ()
  question_tokens = _encode(tokenizer, question_prompt(record["question"], options))
  prompt = _encode(tokenizer, instruction_prompt(record["question"], options))
  answer = _encode(tokenizer, " " + record["answer"].strip()) + [eos_id]
  for name, tokens, limit in (
    ("question prompt", question_tokens, spec.max_question_length),
    ("instruction prompt + answer", prompt + answer, spec.max_instruction_length),
  ):
    if len(tokens) > limit:
      raise ValueError(
        f"record {record['video_id']!r}: {name} has {len(tokens)} tokens, more "
        f"than the configured maximum {limit}"
      )
    if max(tokens) >= vocab_size:
      raise ValueError(
        f"token id {max(tokens)} >= vocab_size {vocab_size}: the tokenizer does not match the LLM"
      )
  other = record.get("other_labels", np.zeros(spec.num_candidates, np.float32))
  q_ids = np.zeros(spec.max_question_length, np.int32)
  q_ids[: len(question_tokens)] = question_tokens
  text = prompt + answer
  t_ids = np.zeros(spec.max_instruction_length, np.int32)
  t_ids[: len(text)] = text
  answer_mask = np.zeros(spec.max_instruction_length, np.int32)
  answer_mask[len(prompt) : len(text)] = 1
  example = {
    "valid": valid,
    "labels": np.where(valid, np.asarray(record["labels"], np.float32), 0.0).astype(np.float32),
    "other_labels": np.where(valid, np.asarray(other, np.float32), 0.0).astype(np.float32),
    "question_ids": q_ids,
    "question_mask": (np.arange(spec.max_question_length) < len(question_tokens)).astype(np.int32),
    "text_ids": t_ids,
    "text_mask": (np.arange(spec.max_instruction_length) < len(text)).astype(np.int32),
    "answer_mask": answer_mask,
    "weight": np.float32(1.0),
  }
  tokens = record.get("visual_tokens")
  if visual_lookup is not None or tokens is not None:
    visual = np.asarray(tokens) if tokens is not None else visual_lookup(record)
    shape, dtype = spec.shapes(cached=True)["visual"]
    if visual.shape != shape:
      raise ValueError(
        f"cached visual tokens of {record['video_id']!r} have shape {visual.shape}, "
        f"expected {shape}: they were made for another model config"
      )
    example["visual"] = np.asarray(visual).astype(dtype)
  else:
    example["frames"] = records.record_frames(record, spec.image_size)
  return example


def empty_example(spec: ExampleSpec, cached: bool) -> dict:
  """An all-zero example with weight 0 (pads the last validation batch)."""
  return {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.shapes(cached).items()}


# --- grain pipeline ---


def global_batches(
  dataset: grain.MapDataset,
  *,
  global_batch_size: int,
  process_index: int,
  process_count: int,
  seed: int | None,
  num_epochs: int | None,
) -> grain.MapDataset:
  """Deterministic, per-process batches of a random-access dataset.

  The order is a seeded permutation, reshuffled every epoch (seed None: file order, one
  pass). Global batch s holds elements [s*B, (s+1)*B) of that order; process p reads only
  its block [s*B + p*B/P, s*B + (p+1)*B/P), so the union over processes is the same batch
  a single process would read. Everything is lazy: a process loads only its records.
  """
  if global_batch_size % process_count:
    raise ValueError(
      f"global batch {global_batch_size} is not divisible by the {process_count} processes"
    )
  local = global_batch_size // process_count
  if seed is not None:
    dataset = dataset.shuffle(seed=seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  dataset = dataset.batch(local, drop_remainder=True)
  return dataset[process_index::process_count]


def to_iterator(
  dataset: grain.MapDataset, num_threads: int = 2, prefetch: int = 4, worker_count: int = 0
):
  """A checkpointable grain iterator; worker processes when worker_count > 0."""
  iter_ds = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  )
  if worker_count > 0:
    # grain's workers read absl flags; outside an absl program nothing has parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)
