"""python -m data.label --config=configs/label.py[:arg] [--shard=i/N]
python -m data.label merge --inputs=a.jsonl,b.jsonl[,...] --output=labels.jsonl

Pseudo-labels for every item of a benchmark (frameselect_jax.videoqa): each item's n
candidates are decoded (`video.decode_candidates`, over its span), labelled (data/labelers.py)
and written as one JSONL line, whole and flushed as soon as the item finishes:

  benchmark, qid, video, span, n, timestamps, valid, spatial, temporal, labels (combined),
  temporal_indices, seconds, calls

Resumable: a restarted run skips the items already in the output (a half line left by a
killed writer is cut off first), so nothing is lost or written twice, even after SIGKILL.
One run at a time per output: a second one is refused (an flock on <output>.lock, released
by the system when its holder dies). Items that fail (the server keeps failing, the text
LLM's answer cannot be read twice, the time limit) are listed in <output>.failures.jsonl and
retried by the next run; items that cannot be labelled at all (a missing or undecodable
video) are skipped with their reason. The run exits with status 1 when the failed fraction
exceeds label.max_failure_fraction.

--shard=i/N labels every N-th item from the i-th into <output stem>.shard-i-of-N.jsonl:
many hosts against a pool of servers (vLLM, SGLang do the heavy work); `merge` joins them.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data import labelers
from frameselect_jax import errors, jsonl, mllm, video, videoqa

KINDS = ("oracle", "spatial", "temporal", "spatial+temporal")
BACKENDS = ("openai", "transformers")


class LabelConfigError(errors.InputError):
  pass


def output_path(config, shard) -> str:
  c = config.label
  path = c.output or os.path.join("labels", f"{c.benchmark}-{c.split or 'default'}.jsonl")
  i, n = shard
  if n > 1:
    stem = path[:-6] if path.endswith(".jsonl") else path
    path = f"{stem}.shard-{i}-of-{n}.jsonl"
  return os.path.abspath(path)


def hold_lock(path: str):
  """An exclusive flock on <path>.lock for this process's lifetime, or LabelConfigError."""
  lock = open(path + ".lock", "a+")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.close()
    raise LabelConfigError(
      f"another labelling run is writing {path} (it holds {path}.lock); wait for it, or write "
      f"elsewhere with --config.label.output"
    ) from None
  return lock


# --- Backends and labellers from the config ---


def make_backend(server, fallback=None, environment=False):
  """The OpenAI-compatible backend of a server section; the multimodal LLM's (environment
  True) falls back to $OPENAI_BASE_URL and $OPENAI_MODEL, the text LLM's to the former."""
  base_url = server.base_url or (os.environ.get("OPENAI_BASE_URL", "") if environment else "")
  model = server.model or (os.environ.get("OPENAI_MODEL", "") if environment else "")
  if not base_url and fallback is not None:
    return fallback
  if not base_url or not model:
    raise LabelConfigError(
      "label.openai needs base_url and model (the multimodal LLM's server; or set "
      "$OPENAI_BASE_URL and $OPENAI_MODEL)"
    )
  return mllm.OpenAIBackend(
    base_url,
    model,
    server.api_key or None,
    timeout_s=server.timeout_s,
    retries=server.retries,
    backoff_s=server.backoff_s,
    concurrency=server.concurrency,
    top_logprobs=server.top_logprobs,
  )


def make_labelers(config, caption_cache_path):
  """[labeller, ...] and the backends whose usage the cost line counts."""
  c = config.label
  if c.kinds not in KINDS:
    raise LabelConfigError(f"label.kinds={c.kinds!r}; choose one of {KINDS}")
  if c.kinds == "oracle":
    o = c.oracle
    return [labelers.OracleLabeler(o.spatial_noise, o.temporal_flip, o.seed)], []
  if c.backend not in BACKENDS:
    raise LabelConfigError(f"label.backend={c.backend!r}; choose one of {BACKENDS}")
  if c.backend == "openai":
    vlm = make_backend(c.openai, environment=True)
  else:
    t = c.transformers
    vlm = mllm.TransformersBackend(
      t.model_dir,
      device=t.device,
      dtype=t.dtype,
      batch_size=t.batch_size,
      reasoning_tokens=t.reasoning_tokens,
    )
  out, backends = [], [vlm]
  if "spatial" in c.kinds:
    out.append(labelers.SpatialLabeler(vlm, c.prompts.spatial, c.spatial_tokens))
  if "temporal" in c.kinds:
    text_llm = make_backend(c.text_llm, fallback=vlm)
    if text_llm is not vlm:
      backends.append(text_llm)
    out.append(
      labelers.TemporalLabeler(
        vlm,
        text_llm,
        labelers.CaptionCache(caption_cache_path),
        dict(c.prompts),
        c.caption_tokens,
        c.answer_tokens,
      )
    )
  return out, backends


# --- The run ---


def load_items(config):
  c = config.label
  try:
    return videoqa.load(c.benchmark, c.root, c.split or None, c.videos_dir or None)
  except videoqa.AnnotationError as e:
    raise LabelConfigError(str(e)) from None


def label_item(item, config, labellers, last: dict) -> dict:
  """One output line; raises video.VideoError (skip) or LabelError / BackendError (fail).
  `last` holds the previous item's candidates: the questions of one video come one after
  another and share them."""
  c = config.label
  start = time.monotonic()
  deadline = start + c.time_limit_s
  key = (item.video, item.span, item.frame_rate)
  if last.get("key") != key:
    last.clear()
    last["candidates"] = video.decode_candidates(
      item.video,
      n=c.num_candidates,
      size=c.image_size,
      backend=c.decoder,
      span=item.span,
      frame_rate=item.frame_rate,
    )
    last["key"] = key  # only once decoded: a video that fails is tried again, and fails again
  candidates = last["candidates"]
  parts = {}
  for labeller in labellers:
    parts.update(labeller(item, candidates, deadline))
  line = {
    "benchmark": item.benchmark,
    "qid": item.qid,
    "video": item.video,
    "span": list(item.span) if item.span else None,
    "n": c.num_candidates,
    "timestamps": candidates.timestamps.tolist(),
    "valid": candidates.valid.tolist(),
  }
  for name in ("spatial", "temporal"):
    if name in parts:
      line[name] = np.round(parts[name], 6).tolist()
  line["labels"] = np.round(
    labelers.combine(parts, c.spatial_weight, c.temporal_weight), 6
  ).tolist()
  if "temporal_indices" in parts:
    line["temporal_indices"] = parts["temporal_indices"]
  line["seconds"] = round(time.monotonic() - start, 3)
  return line


def run(config, shard=(0, 1)) -> dict:
  """Labels this shard's items; returns the summary (counts, reasons, cost)."""
  from tqdm import tqdm

  c = config.label
  if not 0 <= c.max_failure_fraction <= 1:
    raise LabelConfigError(f"label.max_failure_fraction={c.max_failure_fraction} is not in [0, 1]")
  if c.spatial_weight < 0 or c.temporal_weight < 0 or c.spatial_weight + c.temporal_weight == 0:
    raise LabelConfigError("label.spatial_weight and temporal_weight must be >= 0, not both 0")
  output = output_path(config, shard)
  if os.path.isdir(os.path.dirname(output)):
    errors.check_can_write_file(output, "label.output")
  else:
    errors.check_can_create(os.path.dirname(output), "label.output's folder")
  items = load_items(config)
  i, n = shard
  mine = errors.take_shard(items, shard)
  labellers, backends = make_labelers(config, output[:-6] + ".captions.jsonl")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  lock = hold_lock(output)
  try:
    jsonl.drop_partial_line(output)
    open(output, "a").close()  # there from the start, even before the first item is done
    done = (
      {(d["benchmark"], d["qid"]) for d in jsonl.read(output)} if os.path.exists(output) else set()
    )
    problems = collections.defaultdict(list)
    for p in items.problems:
      if p.kind == videoqa.MISSING_VIDEO:  # labels need the frames; answers they do not
        problems[p.qid].append(f"{p.kind}: {p.reason}")
    failures_path = output[:-6] + ".failures.jsonl"
    if os.path.exists(failures_path):
      os.remove(failures_path)  # this run retries them
    counts = collections.Counter()
    skipped, failed, last = [], [], {}
    started = time.monotonic()
    bar = tqdm(mine, desc=f"labels {i}/{n}", disable=not c.progress, unit="item")
    for item in bar:
      if (item.benchmark, item.qid) in done:
        counts["already done"] += 1
      elif item.qid in problems:
        skipped.append({"qid": item.qid, "reason": "; ".join(problems[item.qid])})
      else:
        try:
          line = label_item(item, config, labellers, last)
        except video.VideoError as e:
          skipped.append({"qid": item.qid, "reason": f"undecodable video: {errors.one_line(e)}"})
        except mllm.NoLogprobsError:
          raise
        except (labelers.LabelError, mllm.BackendError, ValueError) as e:
          failure = {"benchmark": item.benchmark, "qid": item.qid, "reason": str(e)}
          failed.append(failure)
          jsonl.append(failures_path, [failure])
        else:
          jsonl.append(output, [line])
          counts["done"] += 1
      bar.set_postfix(done=counts["done"], skipped=len(skipped), failed=len(failed))
    bar.close()
  finally:
    lock.close()
  usage = mllm.Usage()
  for backend in backends:
    usage.add(**backend.usage.as_dict())
  attempted = counts["done"] + len(failed)
  seconds = time.monotonic() - started
  return {
    "output": output,
    "items": len(mine),
    "done": counts["done"],
    "already_done": counts["already done"],
    "skipped": skipped,
    "failed": failed,
    "failed_fraction": len(failed) / attempted if attempted else 0.0,
    "cost": {
      **usage.as_dict(),
      "seconds_per_item": seconds / counts["done"] if counts["done"] else 0.0,
      "retries": sum(getattr(b, "retried", 0) for b in backends),
    },
  }


def print_summary(summary: dict) -> None:
  print(
    f"{summary['output']}: {summary['done']} labelled, {summary['already_done']} already "
    f"done, {len(summary['skipped'])} skipped, {len(summary['failed'])} failed "
    f"(of {summary['items']} items)"
  )
  for kind in ("skipped", "failed"):
    reasons = collections.Counter(entry["reason"].split(":")[0] for entry in summary[kind])
    for reason, count in reasons.most_common():
      print(f"  {kind}: {count} x {reason}")
    for entry in summary[kind][:10]:
      print(f"    {entry['qid']}: {entry['reason']}")
  cost = summary["cost"]
  print(
    f"cost: {cost['calls']} calls, {cost['prompt_tokens']} prompt + "
    f"{cost['completion_tokens']} completion tokens, {cost['retries']} retries, "
    f"{cost['seconds_per_item']:.2f} s per item"
  )


# --- Joining shards ---


def merge(inputs, output) -> int:
  """Joins shard outputs into one file (written whole); the same item in two shards must
  carry the same labels. Returns the number of items."""
  if not inputs or not output:
    raise LabelConfigError("merge needs --inputs=a.jsonl,b.jsonl and --output=labels.jsonl")
  errors.check_can_write_file(output, "--output")
  joined = {}
  for path in inputs:
    if not os.path.isfile(path):
      raise LabelConfigError(f"--inputs: {path}: no such file")
    try:
      lines = jsonl.read(path)
    except jsonl.JsonlError:
      jsonl.drop_partial_line(path)  # a shard killed mid-line
      lines = jsonl.read(path)
    for line in lines:
      key = (line["benchmark"], line["qid"])
      if key in joined and joined[key]["labels"] != line["labels"]:
        raise LabelConfigError(f"{path}: {key} is in another shard with other labels")
      joined[key] = line
  errors.write_atomically(output, "".join(json.dumps(v) + "\n" for v in joined.values()))
  return len(joined)


def main(argv):
  if argv[1:] == ["merge"]:
    try:
      count = merge(flags.FLAGS.inputs, flags.FLAGS.output)
    except errors.InputError as e:
      errors.exit_with(str(e))
    print(f"{flags.FLAGS.output}: {count} items from {len(flags.FLAGS.inputs)} files")
    return
  if argv[1:]:
    errors.exit_with(f"unknown command {' '.join(argv[1:])!r}; the only one is 'merge'")
  if flags.FLAGS.config is None:
    errors.exit_with("--config is required (configs/label.py[:arg])")
  try:
    summary = run(flags.FLAGS.config, errors.parse_shard(flags.FLAGS.shard))
  except errors.InputError as e:
    errors.exit_with(str(e))
  print_summary(summary)
  sys.stdout.flush()
  if summary["failed_fraction"] > flags.FLAGS.config.label.max_failure_fraction:
    print(
      f"error: {len(summary['failed'])} items failed ({summary['failed_fraction']:.1%}), more "
      f"than label.max_failure_fraction={flags.FLAGS.config.label.max_failure_fraction}",
      file=sys.stderr,
    )
    sys.exit(1)


def define_flags():
  """Defined only when the command runs (data.build and data.label both have --config)."""
  config_flags.DEFINE_config_file("config", None, "Labelling config (configs/label.py[:arg]).")
  flags.DEFINE_string("shard", "0/1", "i/N: label every N-th item, from the i-th.")
  flags.DEFINE_list("inputs", [], "merge: the shard outputs to join.")
  flags.DEFINE_string("output", "", "merge: the joined output.")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
