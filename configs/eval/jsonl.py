"""Any data in the generic JSONL format (--config.root=<file.jsonl or folder>).

  python -m eval --config=configs/eval/jsonl.py --config.root=/data/jsonl \\
      --config.selector.checkpoint=workdirs/stage2/checkpoints \\
      --config.downstream.openai.base_url=http://host:8000/v1 --config.downstream.openai.model=...
"""

from configs.eval.base import base


def get_config(arg=None):
  del arg
  c = base("jsonl")
  return c
