"""python -m data.build --config=configs/build.py[:arg] [--config.some.field=value]

Turns a benchmark's items (frameselect_jax.videoqa) and their labels (the needle benchmark's
ground truth, or a pseudo-label JSONL) into a TFDS dataset of training records
(frameselect_jax.records) in array_record form, which the trainer reads with
`data.source=tfds` through `tfds.data_source` and grain (no TensorFlow needed, to build or
to read).

Two steps, so that a killed build restarts where it stopped:
1. Work shards: the items of each split, `build.shard_size` at a time, are decoded
   (`video.decode_candidates`, the n candidates over the item's span), labelled and stored
   (JPEG bytes, or the frozen tower's pooled visual tokens) in
   <work_dir>/<split>/shard-NNNNN.array_record, each written whole, then marked done by its
   report (shard-NNNNN.json: what it holds, what it skipped and why). Done shards are never
   redone; a work dir built with other settings is refused.
2. The TFDS builder (`FrameselectRecords`, config `build.name`) reads the work shards into
   <data_dir>/frameselect_records/<name>/<version>/: the dataset is
   `frameselect_records/<name>`.

Every item that does not become a record is reported with its reason (a missing video, an
answer not among the options, no label, an undecodable video), on the console and in
<work_dir>/report.json.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from frameselect_jax import (
  errors,
  experiment,
  jsonl,
  records,
  synthetic,
  video,
  videoqa,
  visual_cache,
)

STORES = ("jpeg", "visual_tokens")
LABEL_FIELDS = ("labels", "spatial", "temporal")
SKIP_LISTED = 20  # skipped items printed one by one; the rest are counted (all are in the report)


class BuildError(errors.InputError):
  pass


# --- Labels ---


def ground_truth_labels(item: videoqa.Item, candidates: video.Candidates) -> dict:
  """The needle benchmark's relevance of each candidate."""
  if "needle" not in item.extra:
    raise LookupError("no ground truth (build.labels='ground_truth' is for the needle benchmark)")
  return {"labels": synthetic.candidate_relevance(item.extra, candidates.frame_indices)}


class LabelFile:
  """Pseudo-labels (one file, or several separated by commas), one JSONL line per item:
  benchmark, qid, labels (float[n] in [0, 1], the combined label), optional spatial and
  temporal (float[n]) and timestamps (the candidates' seconds they were made for, checked
  against the ones decoded here)."""

  def __init__(self, paths: str):
    self.path = paths
    self.by_key = {}
    for path in paths.split(","):  # one file per split or shard is fine
      if not os.path.isfile(path):
        raise BuildError(f"build.labels={path!r}: no such file")
      try:
        lines = jsonl.read(path)
      except (jsonl.JsonlError, UnicodeDecodeError) as e:
        raise BuildError(f"build.labels: {e}") from None
      for number, line in enumerate(lines, start=1):
        if "qid" not in line or "labels" not in line:
          raise BuildError(f"{path}: line {number}: needs 'qid' and 'labels'")
        self.by_key[(str(line.get("benchmark", "")), str(line["qid"]))] = line

  def __call__(self, item: videoqa.Item, candidates: video.Candidates) -> dict:
    line = self.by_key.get((item.benchmark, item.qid)) or self.by_key.get(("", item.qid))
    if line is None:
      raise LookupError(f"no label in {self.path}")
    n = len(candidates.valid)
    out = {}
    for name in ("labels", "spatial", "temporal"):
      if line.get(name) is None:
        continue
      values = np.asarray(line[name], np.float32)
      if values.shape != (n,) or not np.all((values >= 0) & (values <= 1)):
        raise LookupError(f"its {name} are not {n} values in [0, 1]")
      out[name] = values * candidates.valid
    if line.get("timestamps") is not None:
      made_for = np.asarray(line["timestamps"], np.float32)
      if made_for.shape != (n,) or not np.allclose(made_for, candidates.timestamps, atol=1e-3):
        raise LookupError("its labels were made for other candidate timestamps")
    return out


def label_source(config):
  if config.build.labels == "ground_truth":
    return ground_truth_labels
  if not config.build.labels:
    raise BuildError("build.labels is empty: give a pseudo-label JSONL, or 'ground_truth'")
  return LabelFile(config.build.labels)


# --- Candidates -> stored form ---


def tower_encoder(config, selector_cfg):
  """uint8 frames [n, S, S, 3] -> the frozen tower's pooled tokens [n, g*g, D], float32, as
  the trainer computes them (weights in model.frozen_dtype), and the tower's fingerprint."""
  import jax
  from flax import nnx

  model = experiment.build_model(config)
  graphdef, state = nnx.split(model)
  cast = experiment.frozen_dtype(config.model.frozen_dtype)
  state = jax.tree.map(lambda x: x.astype(cast(x)), state)

  @jax.jit
  def encode(state, frames):
    return nnx.merge(graphdef, state).encode_frames(video.normalize(frames[None]))[0]

  fingerprint = visual_cache.tower_fingerprint(config.model, selector_cfg, config.seed)
  return (lambda frames: np.asarray(encode(state, frames), np.float32)), fingerprint


# --- Step 1: work shards ---


def settings_fingerprint(config, selector_cfg) -> str:
  """Everything that changes the records (not where they go, nor the progress bar)."""
  b = config.build
  labels = b.labels
  if labels and labels != "ground_truth":
    labels = [
      [
        f
        for f in visual_cache.directory_identity(os.path.dirname(os.path.abspath(p)))
        if f[0] == os.path.basename(p)
      ]
      for p in b.labels.split(",")
    ]
  parts = dict(
    benchmark=b.benchmark,
    root=os.path.abspath(b.root),
    videos_dir=b.videos_dir,
    labels=labels,
    store=b.store,
    n=selector_cfg.num_candidates,
    image_size=selector_cfg.vision.image_size,
    jpeg_quality=b.jpeg_quality,
    shard_size=b.shard_size,
  )
  if b.store == "visual_tokens":
    parts["tower"] = visual_cache.tower_fingerprint(config.model, selector_cfg, config.seed)
  return visual_cache.fingerprint(**parts)


def order_by_video(items):
  """Items of one video (and span) next to each other, so each is decoded once per shard."""
  first = {}
  for i, item in enumerate(items):
    first.setdefault((item.video, item.span), i)
  return sorted(items, key=lambda item: first[(item.video, item.span)])


def shard_paths(work_dir, split, index):
  stem = os.path.join(work_dir, split, f"shard-{index:05d}")
  return stem + ".array_record", stem + ".json"


def build_shard(items, config, selector_cfg, labels, encoder, paths) -> dict:
  """Decodes, labels and writes one work shard; returns its report."""
  b = config.build
  n, size = selector_cfg.num_candidates, selector_cfg.vision.image_size
  out, skipped, decoded = [], [], {}
  for item in items:
    key = (item.video, item.span)
    try:
      if key not in decoded:
        decoded[key] = video.decode_candidates(
          item.video,
          n=n,
          size=size,
          backend=b.backend,
          span=item.span,
          frame_rate=item.frame_rate,
        )
      candidates = decoded[key]
    except (video.VideoError, ValueError) as e:
      decoded[key] = None
      skipped.append({"qid": item.qid, "reason": f"undecodable video: {errors.one_line(e)}"})
      continue
    if candidates is None:
      skipped.append({"qid": item.qid, "reason": "undecodable video (see its first question)"})
      continue
    try:
      found = labels(item, candidates)
    except LookupError as e:
      skipped.append({"qid": item.qid, "reason": str(e.args[0])})
      continue
    record = {
      "video_id": item.video_id or item.video,
      "qid": item.qid,
      "benchmark": item.benchmark,
      "timestamps": candidates.timestamps,
      "valid": candidates.valid,
      "question": item.question,
      "options": list(item.options),
      "answer": item.answer or "",
      **found,
    }
    if b.store == "jpeg":
      record["video"] = records.encode_jpeg_frames(
        candidates.frames, candidates.valid, quality=b.jpeg_quality
      )
    else:
      encode, tower = encoder
      record["visual_tokens"] = encode(candidates.frames)
      record["visual_tower"] = tower
    out.append(records.check_record(record, n))
  data_path, report_path = paths
  os.makedirs(os.path.dirname(data_path), exist_ok=True)
  tmp = f"{data_path}.tmp-{os.getpid()}"
  try:
    records.write_array_record(tmp, out)
    os.replace(tmp, data_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  fields = [f for f in LABEL_FIELDS if out and all(f in r for r in out)]
  report = {
    "records": len(out),
    "skipped": skipped,
    "qids": [item.qid for item in items],
    "label_fields": fields if out else None,  # None: no record to say
  }
  errors.write_atomically(report_path, json.dumps(report))
  return report


def load_items(config) -> dict:
  """{split: its items} (videoqa), or BuildError naming the file and row at fault."""
  b = config.build
  try:
    return {
      split: videoqa.load(b.benchmark, b.root, split, b.videos_dir or None) for split in b.splits
    }
  except videoqa.AnnotationError as e:
    raise BuildError(str(e)) from None


def write_work_shards(config, selector_cfg, work_dir, items_of, labels) -> dict:
  """Step 1 for every split; returns ({split: {"records", "skipped": [...], "shards",
  "label_fields"}}, a fingerprint of the shards' contents)."""
  from tqdm import tqdm

  b = config.build
  manifest_path = os.path.join(work_dir, "manifest.json")
  fingerprint = settings_fingerprint(config, selector_cfg)
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      existing = json.load(f).get("fingerprint")
    if existing != fingerprint:
      raise BuildError(
        f"build.work_dir {work_dir} holds work shards built with other settings (benchmark, "
        f"labels, store, candidates or shard size differ); use another build.name or work_dir"
      )
  else:
    os.makedirs(work_dir, exist_ok=True)
    manifest = {"fingerprint": fingerprint, "settings": b.to_dict()}
    errors.write_atomically(manifest_path, json.dumps(manifest, indent=1))
  encoder = tower_encoder(config, selector_cfg) if b.store == "visual_tokens" else None
  summary, contents = {}, []
  for split in b.splits:
    items = items_of[split]
    problems = {}
    for p in items.problems:
      problems.setdefault(p.qid, []).append(f"{p.kind}: {p.reason}")
    usable = [i for i in items if i.qid not in problems]
    skipped = [{"qid": q, "reason": "; ".join(r)} for q, r in problems.items()]
    ordered = order_by_video(usable)
    shards = [ordered[i : i + b.shard_size] for i in range(0, len(ordered), b.shard_size)]
    written, fields = 0, list(LABEL_FIELDS)
    bar = tqdm(total=len(ordered), desc=f"{split} records", disable=not b.progress, unit="item")
    for index, shard in enumerate(shards):
      paths = shard_paths(work_dir, split, index)
      report = None
      if os.path.exists(paths[1]) and os.path.exists(paths[0]):
        with open(paths[1]) as f:
          report = json.load(f)
        if report.get("qids") != [item.qid for item in shard]:
          report = None  # the items changed under the same settings: redo this shard
      if report is None:
        report = build_shard(shard, config, selector_cfg, labels, encoder, paths)
      written += report["records"]
      skipped += report["skipped"]
      if report["label_fields"] is not None:
        fields = [f for f in fields if f in report["label_fields"]]
      contents.append([split, index, report["qids"], report["records"]])
      bar.update(len(shard))
      bar.set_postfix(written=written, skipped=len(skipped))
    bar.close()
    for index in range(len(shards), 10**6):  # shards of an earlier, longer item list
      stale = shard_paths(work_dir, split, index)
      if not os.path.exists(stale[0]):
        break
      for path in stale:
        if os.path.exists(path):
          os.remove(path)
    summary[split] = {
      "records": written,
      "skipped": skipped,
      "shards": len(shards),
      "label_fields": fields,
    }
  errors.write_atomically(os.path.join(work_dir, "report.json"), json.dumps(summary, indent=1))
  # Names what the shards hold: a TFDS dataset generated from other contents is regenerated.
  return summary, visual_cache.fingerprint(settings=fingerprint, contents=contents)


# --- Step 2: the TFDS dataset ---


@dataclasses.dataclass(eq=False)
class RecordsConfig(tfds.core.BuilderConfig):
  work_dir: str = ""
  splits: tuple = ()
  num_candidates: int = 0
  store: str = "jpeg"
  tokens_shape: tuple = ()  # (tokens per frame, vision width) when store is visual_tokens
  label_fields: tuple = ("labels",)


class FrameselectRecords(tfds.core.GeneratorBasedBuilder):
  """Training records of frameselect_jax (the schema of frameselect_jax/records.py)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "First version.",
    "1.1.0": "other_labels: the candidates the video's other questions ask for.",
  }
  # Nothing is downloaded. (Looking for a checksums file beside this module would need
  # importlib_resources, which tfds does not declare.)
  url_infos = None

  def _info(self):
    c = self.builder_config
    n = c.num_candidates
    features = {
      "video_id": tfds.features.Text(),
      "qid": tfds.features.Text(),
      "benchmark": tfds.features.Text(),
      "question": tfds.features.Text(),
      "options": tfds.features.Sequence(tfds.features.Text()),
      "answer": tfds.features.Text(),
      "timestamps": tfds.features.Tensor(shape=(n,), dtype=np.float32),
      "valid": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
    }
    for name in (*c.label_fields, "other_labels"):
      features[name] = tfds.features.Tensor(shape=(n,), dtype=np.float32)
    if c.store == "jpeg":  # JPEG bytes per candidate, empty for padding
      features["video"] = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
    else:
      features["visual_tokens"] = tfds.features.Tensor(shape=(n, *c.tokens_shape), dtype=np.float32)
      features["visual_tower"] = tfds.features.Text()
    return tfds.core.DatasetInfo(
      builder=self,
      description="Video-question training records of frameselect_jax (data/build.py).",
      features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.builder_config.splits}

  def _generate_examples(self, split):
    from array_record.python.array_record_module import ArrayRecordReader

    folder = os.path.join(self.builder_config.work_dir, split)
    fields = set(self._info().features.keys())

    def in_order():
      for name in sorted(os.listdir(folder)):
        if name.endswith(".array_record"):
          reader = ArrayRecordReader(os.path.join(folder, name))
          yield from (records.deserialize_record(data) for data in reader.read_all())
          reader.close()

    # The questions of one video lie next to each other (order_by_video), across shards too:
    # each video's records are read together to mark the candidates its other questions ask for.
    for _, group in itertools.groupby(in_order(), key=lambda record: record["video_id"]):
      for record in records.with_other_labels(list(group)):
        yield f"{record['benchmark']}/{record['qid']}", {k: record[k] for k in fields}


def build(config) -> dict:
  """Both steps; returns {"dataset", "data_dir", "splits": {split: counts}}."""
  b = config.build
  if b.store not in STORES:
    raise BuildError(f"build.store={b.store!r}; choose one of {STORES}")
  if b.shard_size < 1:
    raise BuildError(f"build.shard_size must be >= 1, got {b.shard_size}")
  if not b.splits:
    raise BuildError("build.splits is empty")
  if b.benchmark not in videoqa.BENCHMARKS:
    raise BuildError(f"build.benchmark={b.benchmark!r}; known: {', '.join(videoqa.BENCHMARKS)}")
  if not b.root:
    raise BuildError("build.root is empty: the folder (or .jsonl file) of the benchmark")
  try:
    selector_cfg = experiment.selector_config(config.model)
  except (ValueError, FileNotFoundError) as e:
    raise BuildError(f"model: {e}") from None
  data_dir = os.path.abspath(b.data_dir)
  work_dir = os.path.abspath(b.work_dir or os.path.join(data_dir, "work", b.name))
  errors.check_can_create(data_dir, "build.data_dir")
  errors.check_can_create(work_dir, "build.work_dir")
  labels = label_source(config)
  if b.benchmark == "needle" and b.generate_needle:
    try:
      settings = synthetic.NeedleSettings(
        **{k: v for k, v in config.needle.items() if k in NEEDLE_FIELDS}
      ).validate()
    except (TypeError, ValueError) as e:
      raise BuildError(f"needle: {e}") from None
    errors.check_can_create(b.root, "build.root")
    counts = {"train": config.needle.train_videos, "test": config.needle.test_videos}
    try:
      synthetic.write_needle_benchmark(b.root, counts, settings, progress=b.progress)
    except ValueError as e:  # a folder holding a needle benchmark with other settings
      raise BuildError(f"build.root: {e}") from None
  summary, contents = write_work_shards(config, selector_cfg, work_dir, load_items(config), labels)
  builder = FrameselectRecords(
    data_dir=data_dir,
    config=RecordsConfig(
      name=b.name,
      description=f"{b.benchmark} ({', '.join(b.splits)}), candidates as {b.store}; "
      f"work shards {contents}",
      work_dir=work_dir,
      splits=tuple(b.splits),
      num_candidates=selector_cfg.num_candidates,
      store=b.store,
      tokens_shape=(selector_cfg.tokens_per_frame, selector_cfg.vision.hidden_size),
      label_fields=tuple(
        f for f in LABEL_FIELDS if all(f in summary[s]["label_fields"] for s in b.splits)
      ),
    ),
    file_format="array_record",
  )
  empty = [s for s in b.splits if not summary[s]["records"]]
  if empty:
    raise BuildError(
      f"split {empty[0]} has no records: every item was skipped "
      f"(reasons in {os.path.join(work_dir, 'report.json')})"
    )
  stale_since_built(builder)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(verify_ssl=False, try_download_gcs=False)
  )
  return {"dataset": f"frameselect_records/{b.name}", "data_dir": data_dir, "splits": summary}


def stale_since_built(builder) -> None:
  """Removes a generated dataset of this name whose work shards have changed since (TFDS would
  reuse it as it is)."""
  import shutil

  info = os.path.join(builder.data_dir, "dataset_info.json")
  if os.path.exists(info):
    with open(info) as f:
      built_from = json.load(f).get("configDescription")
    if built_from != builder.builder_config.description:
      shutil.rmtree(builder.data_dir)


NEEDLE_FIELDS = {f.name for f in dataclasses.fields(synthetic.NeedleSettings)}


def print_report(result: dict) -> None:
  for split, counts in result["splits"].items():
    skipped = counts["skipped"]
    print(f"{split}: {counts['records']} records, {len(skipped)} items skipped")
    for entry in skipped[:SKIP_LISTED]:
      print(f"  skipped {entry['qid']}: {entry['reason']}")
    if len(skipped) > SKIP_LISTED:
      print(f"  ... and {len(skipped) - SKIP_LISTED} more (all in report.json)")
  print(
    f"dataset {result['dataset']} in {result['data_dir']}: train with --config.data.source=tfds "
    f"--config.data.tfds_name={result['dataset']} --config.data.tfds_dir={result['data_dir']}"
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # tfds logs every step, and its custom-config notice
  try:
    result = build(flags.FLAGS.config)
  except errors.InputError as e:
    errors.exit_with(str(e))
  print_report(result)
  sys.stdout.flush()


def define_flags():
  """Defined only when the command runs (data.build and data.label both have --config)."""
  config_flags.DEFINE_config_file("config", None, "Build config (configs/build.py[:arg]).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
