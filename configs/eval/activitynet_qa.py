"""ActivityNet-QA, open-ended: needs a judge (--config.judge.base_url, .model).

  python -m eval --config=configs/eval/activitynet_qa.py --config.root=/data/activitynet_qa \\
      --config.selector.checkpoint=workdirs/stage2/checkpoints \\
      --config.downstream.openai.base_url=http://host:8000/v1 --config.downstream.openai.model=...
"""

from configs.eval.base import base


def get_config(arg=None):
  del arg
  c = base("activitynet_qa")
  c.ks = (8, 16, 32)
  return c
