"""Tokens-per-frame ablation of the paper (1 token 46.6, 9 tokens 47.2, 25 tokens 47.3).

python -m train --config=configs/ablation_tokens.py:tokens=25,stage=1
python -m train --config=configs/ablation_tokens.py:tokens=25,stage=2
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tokens=9, stage=2, tiny=False)
  return common.base(stage=args.stage, tokens=args.tokens, tiny=args.tiny)
