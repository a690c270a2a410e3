"""EgoSchema (the 500-question subset with answers).

  python -m eval --config=configs/eval/egoschema.py --config.root=/data/egoschema \\
      --config.selector.checkpoint=workdirs/stage2/checkpoints \\
      --config.downstream.openai.base_url=http://host:8000/v1 --config.downstream.openai.model=...
"""

from configs.eval.base import base


def get_config(arg=None):
  del arg
  c = base("egoschema")
  return c
