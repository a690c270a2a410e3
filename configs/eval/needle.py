"""The needle benchmark, answered by the pixel reader (eval/needle_reader.py): accuracy then
measures the selection alone. Runs on a CPU.

  python -m eval --config=configs/eval/needle.py:checkpoint=workdirs/needle-stage2/checkpoints
  python -m eval --config=configs/eval/needle.py:random      # a random tiny selector
"""

from configs import common
from configs.eval.base import base


def get_config(arg=None):
  args = common.parse_arg(arg, checkpoint="", random=False)
  c = base("needle", root="data/needle_benchmark", split="test")
  c.num_candidates = 32  # configs/needle.py's selector
  c.ks = (1, 2, 4, 8)
  c.selector.checkpoint = args.checkpoint
  c.selector.random = args.random
  blind = "uniform,random,pixel_diff"  # what needs no selector
  c.strategies = f"{blind},top_k,nms_greedy" if (args.checkpoint or args.random) else blind
  c.decode.image_size = 64  # the videos' own size
  c.downstream.kind = "needle_reader"
  c.downstream.concurrency = 1
  c.downstream.cache = False  # the reader is faster than the cache
  return c
