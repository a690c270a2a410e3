"""The shared base of every experiment config (big_vision style: get_config(arg) -> ConfigDict).

An experiment file calls `base(stage=..., **args)` and changes what differs. `arg` is a
comma-separated list of `key=value` or bare flags, e.g. `--config=configs/stage2.py:tiny`
or `--config=configs/ablation_llm.py:llm=0.5b,stage=1`. Any field can then be overridden
on the command line: `--config.train.lr=2e-5`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from frameselect_jax.sharding import LOGICAL_RULES
from frameselect_jax.synthetic import NeedleSettings

LLM_PRESETS = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "7b": "qwen2.5-7b", "tiny": "tiny"}
VISION_PRESET = "siglip-so400m-patch14-384"
TOKENS_TO_GRID = {1: 1, 4: 2, 9: 3, 16: 4, 25: 5}
# Attention and MLP projections of every LLM block (paths inside `Selector.llm`).
LORA_PATTERN = r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"


BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_arg(arg: str | None, **defaults):
  """'a=1,b=x,tiny' -> ConfigDict(a=1, b='x', tiny=True), typed like the defaults."""
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not _:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      value = True
    elif kind is bool:
      if value.lower() not in BOOLEANS:
        raise ValueError(
          f"config argument {key!r} is a boolean; {value!r} is none of {sorted(BOOLEANS)}"
        )
      value = BOOLEANS[value.lower()]
    else:
      value = kind(value)
    out[key] = value
  return out


def base(
  *, stage: int, llm: str = "1.5b", tokens: int = 9, tiny: bool = False, name: str = ""
) -> ml_collections.ConfigDict:
  if llm not in LLM_PRESETS:
    raise ValueError(f"unknown LLM size {llm!r}; choose one of {sorted(LLM_PRESETS)}")
  if tokens not in TOKENS_TO_GRID:
    raise ValueError(f"tokens per frame must be a square in {sorted(TOKENS_TO_GRID)}, got {tokens}")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.name = name or f"stage{stage}-{llm}-{tokens}tok" + ("-tiny" if tiny else "")
  c.workdir = f"workdirs/{c.name}"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.llm = "tiny" if tiny else LLM_PRESETS[llm]
  c.model.vision = "tiny" if tiny else VISION_PRESET
  c.model.llm_dir = ""  # Hugging Face directory; empty: random init (tiny, AOT)
  c.model.vision_dir = ""
  c.model.num_candidates = 16 if tiny else 128
  c.model.pool_grid = TOKENS_TO_GRID[tokens]
  c.model.dtype = "bfloat16"  # compute dtype; trainable params stay float32
  c.model.frozen_dtype = "bfloat16"  # storage of the frozen backbone (halves its memory)
  # Activation checkpointing per block: none, block, save_attn_mlp or save_projections
  # (models/layers.py).
  c.model.remat = "none" if tiny else "block"
  c.model.score_head = "query_mlp"
  # Causal attention: the Pallas flash kernel on TPU (auto), XLA's everywhere else.
  c.model.attention = "auto"  # auto | xla | flash

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 4 if tiny else 16
  c.lora.alpha = 8.0 if tiny else 32.0
  c.lora.pattern = LORA_PATTERN

  c.data = ml_collections.ConfigDict()
  # synthetic (frame arrays, unit tests) | needle (generated videos) | array_record | tfds
  c.data.source = "synthetic" if tiny else "array_record"
  c.data.train_path = ""  # array_record glob of training records
  c.data.eval_path = ""  # array_record glob of held-out records
  c.data.tfds_name = ""
  c.data.tfds_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.synthetic_train_videos = 64
  c.data.synthetic_eval_videos = 16
  c.data.synthetic_seed = 0
  # data.source=needle: the needle benchmark (frameselect_jax.synthetic.NeedleSettings),
  # written once to needle.dir (default <workdir>/../needle_data/<fingerprint>) and decoded
  # through frameselect_jax.video like any video. Held-out: its test split.
  c.data.needle = needle_settings()
  c.data.tokenizer = "byte" if tiny else ""  # "byte", a directory, or "" for model.llm_dir
  c.data.max_question_length = 160 if tiny else 96
  c.data.max_instruction_length = 160 if tiny else 128
  c.data.global_batch_size = 8 if tiny else 128
  c.data.cache_visual_tokens = True
  c.data.cache_dir = ""  # default: <workdir>/../visual_cache/<fingerprint>
  c.data.shuffle_seed = 0
  c.data.num_threads = 2
  c.data.worker_count = 0  # grain worker processes (0: threads in this process)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 2 if stage == 1 else 5
  c.train.num_steps = 0  # > 0 overrides epochs
  c.train.lr = 1e-4 if stage == 1 else 1e-5
  c.train.schedule = "cosine"  # cosine | constant
  c.train.warmup_fraction = 0.03
  c.train.end_lr_fraction = 0.0
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip_norm = 1.0
  c.train.grad_accum_steps = 1
  # Scale train.lr from the batch it was tuned at to data.global_batch_size: none (off),
  # linear or sqrt (step.scaled_lr).
  c.train.lr_scaling = "none"
  c.train.lr_reference_batch = 0
  # > 1: a candidate that another question about the video asks for (records'
  # other_labels) weighs this much more as a negative; 1 is the paper's plain BCE.
  c.train.other_question_weight = 1.0
  # > 0: add this much of a listwise (softmax) ranking term to the BCE (step.importance_sums);
  # 0 is the paper's plain BCE.
  c.train.listwise_weight = 0.0
  # > 0: the BCE's targets become labels (1 - e) + e / 2, so every negative settles at one
  # finite logit (step.ImportanceLoss); 0 is the paper's plain BCE.
  c.train.label_smoothing = 0.0
  # Stage 1 alternates the two tasks batch by batch: instruction:importance batches.
  c.train.task_ratio = "1:1" if stage == 1 else "0:1"
  # Trainable top-level modules; stage 2 adds the LoRA adapters.
  c.train.trainable = ("projector", "score_query", "score_head")
  c.train.init_from = (
    ""
    if stage == 1
    else f"workdirs/stage1-{llm}-{tokens}tok" + ("-tiny" if tiny else "") + "/checkpoints"
  )

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50 if tiny else 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # Validation on the held-out split during training (the evaluation harness is eval/).
  c.validation = ml_collections.ConfigDict()
  c.validation.every_steps = 50 if tiny else 1000  # 0: only at the end
  c.validation.ks = (2, 4) if tiny else (4, 8)  # frame budgets: recall@k and hit@k
  c.validation.relevant_label = 0.5  # a candidate is relevant when its label is >= this
  c.validation.max_batches = 0  # 0: the whole held-out split

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 1 if tiny else 10
  c.log.progress = True

  c.mesh = ml_collections.ConfigDict()
  # The backbone is frozen and stored in bf16 (3.1 GB for 1.5B): replicate it and split only
  # the batch (no weight all-gathers). 7B (15 GB) does not fit a v5e chip whole: FSDP.
  c.mesh.data = 1 if llm == "7b" and not tiny else -1
  c.mesh.fsdp = -1 if llm == "7b" and not tiny else 1
  c.mesh.tensor = 1
  c.mesh.rules = tuple(LOGICAL_RULES)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  c.distributed.coordinator_address = ""  # empty: auto-detect (TPU pods)
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def needle_settings(**changes) -> ml_collections.ConfigDict:
  """data.needle: where the needle benchmark goes, its split sizes and its look."""
  c = ml_collections.ConfigDict(dataclasses.asdict(NeedleSettings(**changes)))
  c.dir = ""
  c.train_videos = 256
  c.test_videos = 64
  c.backend = "auto"  # video decoder (frameselect_jax.video.BACKENDS)
  return c
