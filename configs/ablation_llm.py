"""LLM-size ablation of the paper (0.5B 46.4, 1.5B 47.2, 7B 47.9): one run per size and stage.

python -m train --config=configs/ablation_llm.py:llm=0.5b,stage=1
python -m train --config=configs/ablation_llm.py:llm=0.5b,stage=2
(tiny: random tiny models of the same structure on CPU)
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, llm="1.5b", stage=2, tiny=False)
  return common.base(stage=args.stage, llm=args.llm, tiny=args.tiny)
