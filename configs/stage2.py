"""Stage 2 of the paper (Qwen2.5-1.5B + SigLIP so400m, 128 frames x 9 tokens).

python -m train --config=configs/stage2.py          the paper's setting
python -m train --config=configs/stage2.py:tiny     random tiny models on generated data (CPU)
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False)
  return common.base(stage=2, tiny=args.tiny)
