"""Building a TFDS dataset of training records: `python -m data.build --config=configs/build.py`.

  python -m data.build --config=configs/build.py:tiny                      # the needle benchmark
  python -m data.build --config=configs/build.py:benchmark=nextqa \
      --config.build.root=/data/nextqa --config.build.labels=labels/nextqa.jsonl \
      --config.build.splits=train,val
  python -m data.build --config=configs/build.py:tiny,store=visual_tokens

The model section is the one the trainer will use: it decides n (model.num_candidates), the
image size of the stored frames (the vision tower's input) and, for store=visual_tokens, the
tower whose pooled tokens are stored (the trainer refuses tokens of another tower).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, benchmark="needle", store="jpeg", tiny=False, llm="1.5b")
  # The model section of the training configs (configs/stage1.py, stage2.py, same arg).
  c = common.base(stage=1, llm=args.llm, tiny=args.tiny, name=f"build-{args.benchmark}")
  needle = args.benchmark == "needle"

  c.build = ml_collections.ConfigDict()
  c.build.benchmark = args.benchmark  # a frameselect_jax.videoqa benchmark
  c.build.root = "data/needle_benchmark" if needle else ""  # its folder (or .jsonl file)
  c.build.videos_dir = ""  # when the videos sit outside root ("" : the benchmark's layout)
  c.build.splits = ("train", "test") if needle else ("train",)
  # "ground_truth" (the needle benchmark), or a pseudo-label JSONL (data/label.py writes it)
  c.build.labels = "ground_truth" if needle else ""
  c.build.generate_needle = needle  # write the needle benchmark into root first (or reuse it)
  c.build.store = args.store  # jpeg | visual_tokens
  c.build.jpeg_quality = 90
  c.build.name = f"{args.benchmark}_{args.store}" + ("_tiny" if args.tiny else "")
  c.build.data_dir = "tfds_data"  # the dataset: <data_dir>/frameselect_records/<name>
  c.build.work_dir = ""  # work shards; default <data_dir>/work/<name>
  c.build.shard_size = 64  # items per work shard (the unit a restarted build redoes)
  c.build.backend = "auto"  # video decoder
  c.build.progress = True

  c.needle = common.needle_settings()  # the needle benchmark's look and size
  if args.tiny:
    c.needle.train_videos, c.needle.test_videos = 16, 8
    c.needle.duration_s, c.needle.size = 4.0, 32
    c.build.shard_size = 8
  for section in ("data", "train", "checkpoint", "validation", "log", "mesh", "distributed"):
    del c[section]
  return c
