"""MLVU dev (multiple choice; the open-ended tasks need a judge).

  python -m eval --config=configs/eval/mlvu.py --config.root=/data/mlvu \\
      --config.selector.checkpoint=workdirs/stage2/checkpoints \\
      --config.downstream.openai.base_url=http://host:8000/v1 --config.downstream.openai.model=...
"""

from configs.eval.base import base


def get_config(arg=None):
  del arg
  c = base("mlvu")
  return c
