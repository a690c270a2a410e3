"""Trains the frame selector (stage 1 or stage 2 of the paper), from one CPU to a TPU pod.

Reads top to bottom: check the config, join the other processes, build the mesh, the model
and the optimizer, fill the visual-token cache, build the data pipeline, resume from the
latest checkpoint, then loop: one jitted step per batch, metrics, evaluation, checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from frameselect_jax import checkpoint as ckpt
from frameselect_jax import (
  errors,
  experiment,
  hf,
  input_pipeline,
  records,
  synthetic,
  text,
  video,
  visual_cache,
)
from frameselect_jax import sharding as shd
from frameselect_jax.models import attention as attention_lib
from train import modeling
from train import step as step_lib
from train.metrics import MetricWriter


class ConfigError(errors.InputError):
  """A configuration that cannot run; raised before any heavy work starts."""


SOURCES = ("synthetic", "needle", "array_record", "tfds")
NEEDLE_SPLITS = ("train", "test")

# --- Configuration checks ---


def parse_task_ratio(text: str) -> tuple[int, int]:
  """'a:b' -> (instruction batches, importance batches) per cycle."""
  try:
    a, b = (int(x) for x in str(text).split(":"))
  except ValueError:
    raise ConfigError(
      f"train.task_ratio must look like 'instruction:importance' (e.g. 1:1), got {text!r}"
    ) from None
  if a < 0 or b < 0 or a + b == 0:
    raise ConfigError(f"train.task_ratio {text!r} needs non-negative counts, not both zero")
  return a, b


def task_of_step(step: int, ratio: tuple[int, int]) -> str:
  """Tasks alternate batch by batch: `a` instruction batches, then `b` importance ones."""
  a, b = ratio
  return "instruction" if (step - 1) % (a + b) < a else "importance"


def check_config(config, runtime: bool = True):
  """Everything that can be checked without devices or data. runtime=False (AOT
  compilation) skips what only a real run needs: data files, tokenizer, stage-1 checkpoint."""
  if config.stage not in (1, 2):
    raise ConfigError(f"stage must be 1 or 2, got {config.stage}")
  try:
    selector_cfg = experiment.selector_config(config.model)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"model: {e}") from None
  n = selector_cfg.num_candidates
  ks = tuple(config.validation.ks)
  if not ks or any(not isinstance(k, int) or not 1 <= k <= n for k in ks):
    raise ConfigError(
      f"validation.ks={ks} must be frame budgets in [1, n={n}] (model.num_candidates)"
    )
  if not 0 < config.validation.relevant_label <= 1:
    raise ConfigError(
      f"validation.relevant_label={config.validation.relevant_label} must be in (0, 1]"
    )
  ratio = parse_task_ratio(config.train.task_ratio)
  if config.stage == 2 and ratio[0]:
    raise ConfigError(
      f"stage 2 trains importance prediction only; train.task_ratio "
      f"{config.train.task_ratio!r} asks for instruction batches (use 0:1)"
    )
  if config.train.grad_accum_steps < 1:
    raise ConfigError(f"train.grad_accum_steps must be >= 1, got {config.train.grad_accum_steps}")
  if config.train.lr <= 0:
    raise ConfigError(f"train.lr must be positive, got {config.train.lr}")
  try:
    step_lib.scaled_lr(config.train, config.data.global_batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    step_lib.ImportanceLoss.from_config(config.train)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not runtime:
    return selector_cfg, ratio
  if config.data.source == "array_record" and not config.data.train_path:
    raise ConfigError(
      "data.source='array_record' needs data.train_path (a glob of array_record files)"
    )
  if config.data.source == "tfds" and not config.data.tfds_name:
    raise ConfigError("data.source='tfds' needs data.tfds_name")
  if config.data.source not in SOURCES:
    raise ConfigError(f"unknown data.source {config.data.source!r}; choose one of {SOURCES}")
  if config.data.source == "needle":
    try:
      needle_settings(config).validate()
    except (TypeError, ValueError) as e:
      raise ConfigError(f"data.needle: {e}") from None
    if config.data.needle.backend not in video.BACKENDS:
      raise ConfigError(
        f"data.needle.backend={config.data.needle.backend!r}; choose one of {video.BACKENDS}"
      )
  if not config.data.tokenizer and not config.model.llm_dir:
    raise ConfigError(
      "data.tokenizer is empty and there is no model.llm_dir to take the "
      "tokenizer from; use a built-in one for tiny presets "
      f"({sorted(text.BUILTIN_TOKENIZERS)}) or a tokenizer directory"
    )
  if config.stage == 2:
    if not config.train.init_from:
      raise ConfigError("stage 2 starts from a stage-1 checkpoint: set train.init_from")
    if ckpt.latest_step(config.train.init_from) is None:
      raise ConfigError(
        f"stage 2 needs a stage-1 checkpoint, but train.init_from="
        f"{config.train.init_from!r} holds none (run stage 1 first)"
      )
  return selector_cfg, ratio


def make_mesh(config, devices=None):
  try:
    return shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None


def check_batch(config, mesh, process_count: int):
  batch = config.data.global_batch_size
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % data_parallel:
    raise ConfigError(
      f"data.global_batch_size={batch} is not divisible by the data parallelism "
      f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {data_parallel}"
    )
  if batch % process_count:
    raise ConfigError(
      f"data.global_batch_size={batch} is not divisible by the {process_count} processes"
    )
  accum = config.train.grad_accum_steps
  if (batch // data_parallel) % accum:
    raise ConfigError(
      f"per-device batch {batch // data_parallel} is not divisible by "
      f"train.grad_accum_steps={accum}"
    )


# --- Processes, data, tokenizer ---


def setup_distributed(config):
  d = config.distributed
  if not d.initialize:
    return
  if d.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no-op on TPU/GPU
    jax.distributed.initialize(
      coordinator_address=d.coordinator_address,
      num_processes=d.num_processes,
      process_id=d.process_id,
    )
  else:
    jax.distributed.initialize()  # TPU pods and SLURM/Kubernetes: detected from the environment


def load_tokenizer(config):
  name = config.data.tokenizer or config.model.llm_dir
  tok = text.builtin_tokenizer(name)
  if tok is not None:
    return tok, tok.eos_token_id
  tok = hf.load_tokenizer(name)
  if tok.eos_token_id is None:
    raise ConfigError(f"tokenizer {name!r} has no eos token")
  return tok, tok.eos_token_id


def needle_settings(config) -> synthetic.NeedleSettings:
  fields = {f.name for f in dataclasses.fields(synthetic.NeedleSettings)}
  return synthetic.NeedleSettings(**{k: v for k, v in config.data.needle.items() if k in fields})


def needle_directory(config, workdir: str) -> str:
  if config.data.needle.dir:
    return os.path.abspath(config.data.needle.dir)
  key = visual_cache.fingerprint(settings=dataclasses.asdict(needle_settings(config)))
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "needle_data", key)


def write_needle_data(config, workdir: str) -> str:
  """Process 0 writes the needle benchmark (or finds it written); the others wait for it."""
  root = needle_directory(config, workdir)
  if jax.process_index() == 0:
    splits = {"train": config.data.needle.train_videos, "test": config.data.needle.test_videos}
    synthetic.write_needle_benchmark(
      root, splits, needle_settings(config), progress=config.log.progress
    )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("needle benchmark written")
  return root


def check_output_directories(config, workdir):
  """Every folder the run writes can be made and written, before anything is."""
  try:
    errors.check_can_create(workdir, "workdir")
    if config.data.cache_visual_tokens:
      errors.check_can_create(cache_base(config, workdir), "visual-token cache")
    if config.data.source == "needle":
      errors.check_can_create(needle_directory(config, workdir), "needle benchmark folder")
  except errors.InputError as e:
    raise ConfigError(str(e)) from None


def make_sources(config, selector_cfg, workdir):
  d = config.data
  n, size = selector_cfg.num_candidates, selector_cfg.vision.image_size
  if d.source == "synthetic":
    make = functools.partial(synthetic.needle_records, num_candidates=n, image_size=size)
    train = make(d.synthetic_train_videos, seed=d.synthetic_seed)
    held_out = make(d.synthetic_eval_videos, seed=d.synthetic_seed + 1_000_003)
    return input_pipeline.InMemorySource(train), input_pipeline.InMemorySource(held_out)
  if d.source == "needle":
    root = write_needle_data(config, workdir)
    show = config.log.progress and jax.process_index() == 0
    return tuple(
      input_pipeline.needle_source(root, split, n, size, backend=d.needle.backend, progress=show)
      for split in NEEDLE_SPLITS
    )
  if d.source == "array_record":
    train = open_array_records(d.train_path, "data.train_path")
    held_out = open_array_records(d.eval_path, "data.eval_path") if d.eval_path else None
    return train, held_out
  train = open_tfds(d.tfds_name, d.train_split, d.tfds_dir)
  held_out = open_tfds(d.tfds_name, d.eval_split, d.tfds_dir) if d.eval_split else None
  return train, held_out


def open_array_records(pattern, flag):
  try:
    return input_pipeline.ArrayRecordSource(pattern)
  except FileNotFoundError as e:
    raise ConfigError(f"{flag}={pattern!r}: {e} ({_what_is_there(pattern)})") from None
  except (RuntimeError, ValueError, OSError) as e:  # array_record's reader: RuntimeError
    raise ConfigError(
      f"{flag}={pattern!r}: not a readable array_record file ({errors.one_line(e)})"
    ) from None


def _what_is_there(pattern):
  folder = os.path.dirname(os.path.abspath(str(pattern).split(",")[0]))
  if not os.path.isdir(folder):
    existing = folder
    while not os.path.isdir(existing):
      existing = os.path.dirname(existing)
    return f"{folder} does not exist; {existing} does"
  found = sorted(f for f in os.listdir(folder) if f.endswith(".array_record"))
  if not found:
    return f"{folder} holds no .array_record files"
  listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
  return f"{folder} holds {listed}"


def open_tfds(name, split, data_dir):
  try:
    return input_pipeline.TfdsSource(name, split, data_dir)
  except Exception as e:  # tfds raises its own types for unknown names, splits, folders
    raise ConfigError(
      f"data.tfds_name={name!r} split {split!r}"
      + (f" in {data_dir}" if data_dir else "")
      + f": cannot open it ({errors.one_line(e)})"
    ) from None


def check_sources(sources, transform):
  """Turns the first record of each split into an example before any step runs, so data that
  cannot fit the model (another candidate count or image size, no question, prompts over the
  configured length, a foreign tokenizer) fails now, naming the split, not mid-training."""
  for name, source in zip(("training", "held-out"), sources):
    if source is None:
      continue
    if len(source) == 0:
      raise ConfigError(f"the {name} split is empty")
    try:
      record = source[0]
    except Exception as e:  # a corrupt file: msgpack, array_record or tfds errors
      raise ConfigError(
        f"the {name} split's first record cannot be read: {errors.one_line(e)} ({source!r})"
      ) from None
    try:
      transform(record)
    except (ValueError, KeyError) as e:
      raise ConfigError(f"the {name} split does not fit this config: {e}") from None


def example_spec(config, selector_cfg) -> input_pipeline.ExampleSpec:
  return input_pipeline.ExampleSpec(
    num_candidates=selector_cfg.num_candidates,
    image_size=selector_cfg.vision.image_size,
    tokens_per_frame=selector_cfg.tokens_per_frame,
    vision_width=selector_cfg.vision.hidden_size,
    max_question_length=config.data.max_question_length,
    max_instruction_length=config.data.max_instruction_length,
    visual_dtype=config.model.dtype,
  )


def local_to_global(batch: dict, shardings: dict) -> dict:
  """Each process's rows -> one global array per field (batch axis over data x fsdp)."""
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in shardings
  }


def validation_batches(source, transform, spec, cached, global_batch, process_index, process_count):
  """The held-out split in global batches, one pass, in order; the last batch is padded with
  weight-0 examples so every process runs the same number of steps."""
  size = len(source)
  local = global_batch // process_count
  steps = math.ceil(size / global_batch)

  def local_batch(s):
    start = s * global_batch + process_index * local
    rows = [
      transform(source[i]) if i < size else input_pipeline.empty_example(spec, cached)
      for i in range(start, start + local)
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  dataset = grain.MapDataset.range(steps).map(local_batch)
  return steps, dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))


# --- Stage 2 starts from stage 1 ---


def start_from_stage1(config, params, frozen, param_shardings, frozen_shardings):
  """Reads every top-level module stage 1 trained from train.init_from: into the trainables
  when stage 2 trains it too, into the frozen weights otherwise. Those (a backbone trained
  from scratch in stage 1) are returned as `inherited` too, for stage 2's checkpoints to
  carry: inference rebuilds the model from one checkpoint. Returns (params, frozen,
  inherited)."""
  try:
    saved = ckpt.saved_tree(config.train.init_from) or {}
    trained = [k for k in config.train.trainable if k in saved]
    kept_frozen = [k for k in saved if k not in config.train.trainable and k in frozen]
    stage1 = {k: params[k] for k in trained}
    abstract = modeling.abstract_of(stage1, {k: param_shardings[k] for k in trained})
    restored, step = ckpt.restore_params(config.train.init_from, abstract)
    inherited = {}
    if kept_frozen:
      old = {k: frozen[k] for k in kept_frozen}
      abstract = modeling.abstract_of(old, {k: frozen_shardings[k] for k in kept_frozen})
      inherited, _ = ckpt.restore_params(config.train.init_from, abstract, step)
  except (ValueError, OSError) as e:  # another model's, or a damaged checkpoint
    raise ConfigError(
      f"train.init_from={config.train.init_from!r}: cannot start stage 2 from it: "
      f"{errors.one_line(e, limit=400)}"
    ) from None
  logging.info(
    "stage 2: %s (trained) and %s (frozen) from %s step %d",
    sorted(restored),
    sorted(inherited),
    config.train.init_from,
    step,
  )
  return {**params, **restored}, {**frozen, **inherited}, inherited


# --- Visual-token cache ---


def fill_visual_cache(
  config, selector_cfg, graphdef, params, frozen, train_indices, sources, cache_dir, spec
):
  """Encodes the candidates of every record this process will read that the cache lacks, once
  per distinct content key, with the frozen tower on the local devices (each process computes
  only what it needs; writes are atomic). A source that is None (its records carry their
  tokens) is skipped. Returns (cache, encoded, reused, keys): keys[j] maps each record index
  of sources[j] that was hashed to its content key."""
  cache = visual_cache.VisualTokenCache(cache_dir)
  train_source, eval_source = sources
  wanted = [(0, i) for i in sorted(set(train_indices))] if train_source is not None else []
  if eval_source is not None:
    wanted += [(1, i) for i in range(len(eval_source))]
  ids, reused, keys = {}, set(), ({}, {})
  for j, i in tqdm(
    wanted,
    desc="hashing candidates",
    disable=not (config.log.progress and jax.process_index() == 0),
    leave=False,
  ):
    source = sources[j]
    key = keys[j][i] = visual_cache.content_key(source[i], spec.image_size)
    if key in ids or key in reused:
      continue
    if cache.load(key) is not None:
      reused.add(key)
    else:
      ids[key] = (source, i)
  # Gathering the tower below is collective: every process takes part when any one needs it.
  needed = len(ids)
  if jax.process_count() > 1:
    needed = int(np.sum(multihost_utils.process_allgather(np.int32(len(ids)))))
  if not needed:
    return cache, 0, len(reused), keys
  # The tower's weights, whole on this host (they may be sharded over other processes).
  local_device = jax.local_devices()[0]
  gather = lambda tree: jax.tree.map(
    lambda x: jax.device_put(
      np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if not x.is_fully_addressable
      else jax.device_get(x),
      local_device,
    ),
    tree,
  )
  vision = gather(frozen["vision_tower"])
  other = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
    {k: v for k, v in frozen.items() if k != "vision_tower"},
  )
  params_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

  @jax.jit
  def encode(vision, frames):
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    model = step_lib.merge_model(
      graphdef, zeros(params_abstract), {**zeros(other), "vision_tower": vision}
    )
    return model.encode_frames(video.normalize(frames))

  videos = (
    (vid, lambda s=s, i=i: records.record_frames(s[i], spec.image_size))
    for vid, (s, i) in ids.items()
  )
  encoded, _ = visual_cache.fill(
    cache,
    videos,
    lambda frames: encode(vision, frames),
    total=len(ids),
    show_progress=config.log.progress and jax.process_index() == 0,
  )
  return cache, encoded, len(reused), keys


def check_carried_tokens(sources, tower: str) -> tuple[bool, bool]:
  """Which sources' records carry their own visual tokens (a dataset built with them); those
  must come from this run's tower (fingerprint `tower`), else ConfigError."""
  carrying = []
  for name, source in zip(("training", "held-out"), sources):
    record = source[0] if source is not None else {}
    carrying.append("visual_tokens" in record)
    if carrying[-1] and record.get("visual_tower") != tower:
      raise ConfigError(
        f"the {name} split's visual tokens were made by the tower {record.get('visual_tower')!r}, "
        f"not this config's ({tower}): rebuild the dataset with this model config, or store "
        f"JPEG frames"
      )
  return tuple(carrying)


class WithVisualKeys:
  """A source whose records carry `visual_key`, their content key, hashed once when the cache
  was filled: the data path looks tokens up without hashing the frames again."""

  def __init__(self, source, keys: dict, image_size: int):
    self.source, self.keys, self.image_size = source, keys, image_size

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = self.source[index]
    key = self.keys.get(int(index)) or visual_cache.content_key(record, self.image_size)
    return {**record, "visual_key": key}

  def __repr__(self):
    return repr(self.source)


def cache_directory(config, selector_cfg, workdir, inherited_tower=None):
  """<cache_dir>/<fingerprint of the tower>: everything that decides the tokens apart from the
  candidates themselves, which key the files (visual_cache.content_key)."""
  key = visual_cache.tower_fingerprint(config.model, selector_cfg, config.seed, inherited_tower)
  return os.path.join(cache_base(config, workdir), key)


def cache_base(config, workdir):
  if config.data.cache_dir:
    return os.path.abspath(config.data.cache_dir)
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "visual_cache")


# --- The run ---


def run(config, workdir: str | None = None) -> dict:
  """Trains one stage; returns a summary (final step, last losses, last evaluation)."""
  workdir = os.path.abspath(workdir or config.workdir)
  selector_cfg, ratio = check_config(config)
  check_output_directories(config, workdir)
  setup_distributed(config)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_chief = process_index == 0
  mesh = make_mesh(config)
  check_batch(config, mesh, process_count)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  cached = bool(config.data.cache_visual_tokens)
  spec = example_spec(config, selector_cfg)
  tokenizer, eos_id = load_tokenizer(config)

  # Data: this process's share of every global batch, in a seeded order.
  train_source, eval_source = make_sources(config, selector_cfg, workdir)
  check_sources(
    (train_source, eval_source),
    functools.partial(
      input_pipeline.make_example,
      spec=spec,
      tokenizer=tokenizer,
      eos_id=eos_id,
      vocab_size=selector_cfg.llm.vocab_size,
    ),
  )
  if config.train.other_question_weight != 1 and "other_labels" not in train_source[0]:
    raise ConfigError(
      f"train.other_question_weight={config.train.other_question_weight} weighs the "
      "candidates that a video's other questions ask for, but the training records have no "
      "other_labels (python -m data.build writes them; records.with_other_labels makes them)"
    )
  if not cached and any(
    s is not None and "visual_tokens" in s[0] for s in (train_source, eval_source)
  ):
    raise ConfigError(
      "the records carry visual tokens instead of frames, so the tower cannot run on them: "
      "set data.cache_visual_tokens=True (and leave vision_tower out of train.trainable)"
    )
  global_batch = config.data.global_batch_size
  steps_per_epoch = len(train_source) // global_batch
  if steps_per_epoch < 1:
    raise ConfigError(
      f"the training split has {len(train_source)} records, fewer than one "
      f"global batch of {global_batch}"
    )
  total_steps = config.train.num_steps or config.train.epochs * steps_per_epoch
  epochs_needed = math.ceil(total_steps / steps_per_epoch) + 1
  batching = functools.partial(
    input_pipeline.global_batches,
    global_batch_size=global_batch,
    process_index=process_index,
    process_count=process_count,
    seed=config.data.shuffle_seed,
    num_epochs=epochs_needed,
  )

  # Model and optimizer: trainables in fp32 with optimizer state; the rest frozen.
  graphdef, params, frozen, param_shardings, frozen_shardings = modeling.prepare(
    config, mesh, rules
  )
  inherited = {}
  if config.stage == 2:
    params, frozen, inherited = start_from_stage1(
      config, params, frozen, param_shardings, frozen_shardings
    )
  tx, schedule = step_lib.make_optimizer(config.train, total_steps, config.data.global_batch_size)
  opt_shardings = step_lib.opt_state_shardings(tx, params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  # Visual tokens: computed once per video and read from disk instead of running the ViT.
  vision_abstract = None
  cache_counts = {}  # for the metrics' start event
  transform_kw = dict(
    spec=spec, tokenizer=tokenizer, eos_id=eos_id, vocab_size=selector_cfg.llm.vocab_size
  )
  if cached:
    index_batches = batching(grain.MapDataset.range(len(train_source)))
    train_indices = [
      int(i) for s in range(min(total_steps, len(index_batches))) for i in index_batches[s]
    ]
    cache_dir = cache_directory(config, selector_cfg, workdir, inherited.get("vision_tower"))
    carrying = check_carried_tokens((train_source, eval_source), os.path.basename(cache_dir))
    cache, encoded, reused, keys = fill_visual_cache(
      config,
      selector_cfg,
      graphdef,
      params,
      frozen,
      train_indices,
      tuple(None if c else s for s, c in zip((train_source, eval_source), carrying)),
      cache_dir,
      spec,
    )
    logging.info("visual-token cache %s: %d videos encoded, %d reused", cache_dir, encoded, reused)
    cache_counts = dict(visual_cache_encoded=encoded, visual_cache_reused=reused)
    vision_abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen["vision_tower"]
    )
    frozen = {k: v for k, v in frozen.items() if k != "vision_tower"}
    frozen_shardings = {k: v for k, v in frozen_shardings.items() if k != "vision_tower"}
    if not carrying[0]:
      train_source = WithVisualKeys(train_source, keys[0], spec.image_size)
    if eval_source is not None and not carrying[1]:
      eval_source = WithVisualKeys(eval_source, keys[1], spec.image_size)
    transform_kw["visual_lookup"] = lambda record: cache.get(record["visual_key"])
  transform = functools.partial(input_pipeline.make_example, **transform_kw)
  train_data = batching(grain.MapDataset.source(train_source).map(transform))
  data_iterator = input_pipeline.to_iterator(
    train_data, num_threads=config.data.num_threads, worker_count=config.data.worker_count
  )

  # Resume from the latest checkpoint of this workdir, if any.
  checkpointer = ckpt.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_every=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  start_step = checkpointer.latest_step() or 0
  if start_step:
    try:
      params, opt_state, meta = checkpointer.restore(
        start_step,
        abstract_params=modeling.abstract_of(params, param_shardings),
        abstract_opt_state=modeling.abstract_of(opt_state, opt_shardings),
        data_iterator=data_iterator,
      )
    except ckpt.DamagedCheckpointError as e:
      raise ConfigError(
        f"{e}; to resume from an earlier step, remove this one; to start afresh, use "
        "another workdir"
      ) from None
    if meta.get("config_stage") != config.stage:
      raise ConfigError(
        f"{workdir} holds a stage-{meta.get('config_stage')} checkpoint; "
        f"this config is stage {config.stage}"
      )

  # One jitted step per task, explicit shardings, donated params and optimizer state.
  try:
    attention = attention_lib.causal_attention_for(
      config.model.attention, mesh, jax.default_backend()
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None
  tasks = [t for t, count in zip(step_lib.TASKS, ratio) if count]
  train_steps, fields = {}, {}
  for task in tasks:
    fields[task] = step_lib.step_fields(task, cached)
    train_steps[task] = step_lib.jit_train_step(
      step_lib.make_train_step(
        graphdef,
        tx,
        task=task,
        accum_steps=config.train.grad_accum_steps,
        vision_abstract=vision_abstract,
        mesh=mesh,
        attention=attention,
        importance_loss=step_lib.ImportanceLoss.from_config(config.train),
      ),
      param_shardings=param_shardings,
      frozen_shardings=frozen_shardings,
      opt_shardings=opt_shardings,
      batch_shardings=step_lib.batch_shardings(mesh, spec, fields[task]),
      mesh=mesh,
    )
  validation_fields = step_lib.step_fields("importance", cached)
  validation_step = step_lib.jit_validation_step(
    step_lib.make_validation_step(
      graphdef,
      ks=tuple(config.validation.ks),
      relevant_label=config.validation.relevant_label,
      vision_abstract=vision_abstract,
      attention=attention,
    ),
    param_shardings=param_shardings,
    frozen_shardings=frozen_shardings,
    batch_shardings=step_lib.batch_shardings(mesh, spec, validation_fields),
    mesh=mesh,
  )

  def validate(params):
    """validation/*: BCE, and recall@k and hit@k of NMS over the scores, of uniform sampling
    and of NMS over the labels (the ceiling), over the held-out examples with a relevant
    candidate (validation/scored of validation/examples); where the records have
    other_labels, other_question_hit@k over validation/other_questions of them."""
    if eval_source is None or len(eval_source) == 0:
      return {}
    steps, batches = validation_batches(
      eval_source, transform, spec, cached, global_batch, process_index, process_count
    )
    limit = config.validation.max_batches or steps
    totals = {}
    for s, batch in enumerate(batches):
      if s >= limit:
        break
      out = jax.device_get(
        validation_step(
          params,
          frozen,
          local_to_global(
            {k: batch[k] for k in validation_fields},
            step_lib.batch_shardings(mesh, spec, validation_fields),
          ),
        )
      )
      for key, value in out.items():
        totals[key] = totals.get(key, 0.0) + float(value)
    scored = max(totals["scored"], 1.0)
    results = {
      "validation/bce": totals["bce_sum"] / max(totals["bce_count"], 1.0),
      "validation/examples": totals["examples"],
      "validation/scored": totals["scored"],
    }
    others = totals["other_questions"]  # 0 unless the records have other_labels
    if others:
      results["validation/other_questions"] = others
    for key, value in totals.items():
      if "other_question_" in key:
        if others:
          results[f"validation/{key}"] = value / others
      elif "_at_" in key:
        results[f"validation/{key}"] = value / scored
    return results

  writer = MetricWriter(workdir, enabled=is_chief)
  writer.event(
    "resume" if start_step else "start",
    step=start_step,
    total_steps=total_steps,
    devices=jax.device_count(),
    processes=process_count,
    mesh=dict(mesh.shape),
    trainable_params=modeling.count_params(params),
    frozen_params=modeling.count_params(frozen),
    cached_visual_tokens=cached,
    **cache_counts,
  )
  if is_chief:
    logging.info(
      "stage %d: %d steps (%d per epoch), mesh %s, %d trainable / %d frozen params",
      config.stage,
      total_steps,
      steps_per_epoch,
      dict(mesh.shape),
      modeling.count_params(params),
      modeling.count_params(frozen),
    )
    if start_step:
      logging.info(
        "resumed from the checkpoint of step %d in %s",
        start_step,
        os.path.join(workdir, "checkpoints"),
      )

  # Preemption: SIGTERM asks for a checkpoint at the end of the current step.
  stop = {"requested": False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

  meta = {"config": config.to_json(), "config_stage": config.stage, "total_steps": total_steps}
  last = {}
  pending = []  # (step, task, metrics on device): read one step late, so the host
  clock = [time.perf_counter()]  # never stalls the device queue

  def drain():
    """Reads finished steps' metrics; stops the run at the first non-finite one."""
    while pending:
      step, task, metrics = pending.pop(0)
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      step_time, clock[0] = now - clock[0], now
      loss = float(metrics["loss"])
      if not math.isfinite(loss) or not bool(metrics["params_finite"]):
        checkpointer.wait()
        raise FloatingPointError(
          f"non-finite training state at step {step} ({task} loss {loss}, gradient norm "
          f"{float(metrics['grad_norm'])}); the last good checkpoint is step "
          f"{checkpointer.latest_step()} in {checkpointer.directory}"
        )
      last.update({"loss": loss, f"loss/{task}": loss})
      values = {
        "loss": loss,
        f"loss/{task}": loss,
        "lr": float(schedule(step - 1)),
        "grad_norm": float(metrics["grad_norm"]),
        "step_time_s": step_time,
        "examples_per_s": global_batch / step_time,
      }
      if step % config.log.every_steps == 0 or step == total_steps:
        writer.scalars(step, values)
      progress.set_postfix(loss=f"{loss:.4f}", task=task[:5], refresh=False)
      progress.update(1)

  def save(step, force=False):
    drain()  # never checkpoint a state whose loss was not checked
    checkpointer.save(
      step,
      params=params,
      opt_state=opt_state,
      data_iterator=data_iterator,
      meta={**meta, "step": step},
      inherited=inherited,
      force=force,
    )

  progress = tqdm(
    total=total_steps,
    initial=start_step,
    desc=f"stage {config.stage}",
    disable=not (is_chief and config.log.progress),
    dynamic_ncols=True,
  )
  preempted = False
  done = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      task = task_of_step(step, ratio)
      local = next(data_iterator)
      batch = local_to_global(
        {k: local[k] for k in fields[task]}, step_lib.batch_shardings(mesh, spec, fields[task])
      )
      params, opt_state, metrics = train_steps[task](params, frozen, opt_state, batch)
      if len(pending) > 0:
        drain()
      pending.append((step, task, metrics))
      done = step
      stop_now = stop["requested"]
      if process_count > 1:  # every process must stop at the same step
        stop_now = bool(multihost_utils.process_allgather(np.array(stop_now)).any())
      if stop_now:
        save(step, force=True)
        checkpointer.wait()
        writer.event("preempted", step=step)
        preempted = True
        break
      if step % config.checkpoint.every_steps == 0 or step == total_steps:
        save(step, force=True)
      every = config.validation.every_steps
      if (every and step % every == 0) or step == total_steps:
        drain()
        results = validate(params)
        if results:
          writer.scalars(step, results)
          last.update(results)
    drain()
  finally:
    progress.close()
    signal.signal(signal.SIGTERM, previous_handler)
    data_iterator.close()  # stops grain's worker processes
    checkpointer.close()
    writer.flush()
    writer.close()
  return {"step": done, "total_steps": total_steps, "preempted": preempted, **last}


def exit_code_for_preemption() -> int:
  return 128 + signal.SIGTERM
