"""A second question about the same video, with its pooled visual tokens cached, against
scoring that question from scratch (decode + SigLIP encode + LLM score + selection).

The vision tower's output depends only on the video, so FrameSelector caches it: every
question after the first costs one LLM pass. Prints both times and the ratio cached /
from scratch (target <= 0.2) for two random-weight configs:
  tiny   the CPU test preset (n=128): here decoding dominates everything
  base   SigLIP base/16 at 224 px with a small LLM (n=32), sized so that the ViT:LLM compute
         split is close to the paper's so400m/384 + Qwen2.5-1.5B at n=128 (analytic FLOPs
         printed for both), i.e. what the cache saves in a real deployment.
Compilation is excluded (each path runs once first). Run: python benchmarks/bench_cache.py
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flax import nnx  # noqa: E402

from frameselect_jax import (  # noqa: E402
  experiment,  # noqa: E402
  synthetic,
  text,
  video,
)
from frameselect_jax.api import FrameSelector  # noqa: E402
from frameselect_jax.models import presets  # noqa: E402
from frameselect_jax.models.attention import attention_pairs  # noqa: E402
from frameselect_jax.models.qwen2 import Qwen2Config  # noqa: E402
from frameselect_jax.models.selector import Selector, SelectorConfig  # noqa: E402
from train import flops  # noqa: E402

QUESTIONS = ("When does the red square appear?", "Where is the red square in the frame?")

# Qwen2.5-0.5B's width and heads, 6 blocks (scores are read after the 5th, which computes the
# score query's row alone): the LLM's share of the FLOPs stays close to the paper's setting.
SMALL_LLM = Qwen2Config(
  vocab_size=4096,
  hidden_size=896,
  intermediate_size=4864,
  num_hidden_layers=6,
  num_attention_heads=14,
  num_key_value_heads=2,
  tie_word_embeddings=True,
)


def configs(which):
  out = {}
  if which in ("all", "tiny"):
    out["tiny"] = experiment.selector_config(dict(llm="tiny", vision="tiny", num_candidates=128))
  if which in ("all", "base"):
    out["base"] = SelectorConfig(
      vision=presets.preset(presets.SIGLIP, "siglip-base-patch16-224"),
      llm=SMALL_LLM,
      num_candidates=32,
    ).validate()
  return out


def llm_flops(llm, seq_len):
  """Forward FLOPs of the score pass (train/flops.py's per-block counts): the blocks before
  the penultimate over every token, the penultimate for the score query's row alone plus K
  and V for every token."""
  frozen, _, per_pair = flops.llm_block_flops(llm)
  keys_values, _, _ = flops.llm_block_flops(llm, keys_values_only=True)
  full = seq_len * frozen + per_pair * attention_pairs(seq_len)[0]
  row = seq_len * keys_values + (frozen - keys_values) + per_pair * seq_len
  layers = llm.num_hidden_layers
  return max(layers - 2, 0) * full + (row if layers >= 2 else 0)


def describe(name, cfg, question_tokens):
  seq = cfg.num_visual_tokens + question_tokens + 1
  vit, llm = flops.vision_tower_flops(cfg.vision, cfg.num_candidates), llm_flops(cfg.llm, seq)
  v, l = cfg.vision, cfg.llm
  print(
    f"config {name}: n={cfg.num_candidates}, {cfg.tokens_per_frame} tokens/frame, "
    f"SigLIP {v.num_hidden_layers}x{v.hidden_size} @ {v.image_size}px/{v.patch_size}, "
    f"LLM {l.num_hidden_layers}x{l.hidden_size} (MLP {l.intermediate_size}, "
    f"{l.num_attention_heads}/{l.num_key_value_heads} heads), sequence {seq} tokens"
  )
  print(
    f"  analytic matmul FLOPs: ViT {vit / 1e9:.1f} G, LLM score pass {llm / 1e9:.1f} G "
    f"(LLM share {llm / (vit + llm):.3f})"
  )


def best_of(repeats, fn):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def bench(name, cfg, path, repeats):
  selector = FrameSelector(
    Selector(cfg, rngs=nnx.Rngs(0)),
    text.ByteTokenizer(),
    description=f"random {name}",
    trained=False,
  )
  prompt_tokens = len(text.question_prompt(QUESTIONS[1]).encode())
  describe(name, cfg, prompt_tokens)
  # Compile both paths first (same shapes as the timed calls).
  selector.select(path, QUESTIONS[0])
  selector.select(path, QUESTIONS[1])

  def from_scratch():
    selector.clear_cache()
    selector.select(path, QUESTIONS[1])

  def cached():
    selector.select(path, QUESTIONS[1])

  scratch = best_of(repeats, from_scratch)
  decode = best_of(
    repeats, lambda: video.decode_candidates(path, n=cfg.num_candidates, size=cfg.vision.image_size)
  )
  calls = selector.encode_calls
  warm = best_of(2 * repeats, cached)
  assert selector.encode_calls == calls  # the cached path never touched the vision tower
  print(
    f"  from scratch (decode + encode + score + select): {scratch * 1e3:9.1f} ms "
    f"(decode alone {decode * 1e3:.1f} ms)"
  )
  print(f"  second question, cached tokens (score + select): {warm * 1e3:9.1f} ms")
  print(f"  ratio cached / from scratch: {warm / scratch:.3f}  (target <= 0.2)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="all", choices=("all", "tiny", "base"))
  parser.add_argument("--repeats", type=int, default=3, help="timed runs (minimum is printed)")
  args = parser.parse_args()
  # The paper's setting, for comparison: so400m/384 x 128 frames, Qwen2.5-1.5B.
  paper = experiment.selector_config(dict(llm="qwen2.5-1.5b", vision="siglip-so400m-patch14-384"))
  describe("paper (not run)", paper, 60)
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "video.mp4")
    start = time.perf_counter()
    synthetic.needle_video(path, num_frames=480, fps=24, size=(360, 640), needle_len=12)
    print(f"video: 20 s, 24 fps, 640x360 H.264 (written in {time.perf_counter() - start:.1f} s)")
    for name, cfg in configs(args.config).items():
      bench(name, cfg, path, args.repeats)


if __name__ == "__main__":
  main()
