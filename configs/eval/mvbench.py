"""MVBench (20 tasks).

  python -m eval --config=configs/eval/mvbench.py --config.root=/data/mvbench \\
      --config.selector.checkpoint=workdirs/stage2/checkpoints \\
      --config.downstream.openai.base_url=http://host:8000/v1 --config.downstream.openai.model=...
"""

from configs.eval.base import base


def get_config(arg=None):
  del arg
  c = base("mvbench")
  return c
