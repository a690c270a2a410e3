"""NExT-QA multiple choice (val).

  python -m eval --config=configs/eval/nextqa.py --config.root=/data/nextqa \\
      --config.selector.checkpoint=workdirs/stage2/checkpoints \\
      --config.downstream.openai.base_url=http://host:8000/v1 --config.downstream.openai.model=...
"""

from configs.eval.base import base


def get_config(arg=None):
  del arg
  c = base("nextqa")
  c.downstream.template = (
    "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
  )
  return c
