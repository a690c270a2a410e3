"""Selector scoring forward, one question, n=128 candidates (1152 visual tokens + question):
JAX (jitted, this CPU) against the transformers PyTorch model with identical config and weights.

Prints milliseconds per forward for both and the ratio JAX / PyTorch (target <= 1.0), after
checking that both give the same scores. Our scoring pass computes only the score query's row
in the last block it runs (nothing reads the other rows); the PyTorch model computes every row.
A second table compares the blocks alone, every row on both sides (no shortcut): the speed of
the kernels themselves. Run: python benchmarks/bench_selector.py
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from frameselect_jax import hf  # noqa: E402
from frameselect_jax.models import presets  # noqa: E402
from frameselect_jax.models.selector import Selector, SelectorConfig  # noqa: E402

NUM_CANDIDATES, POOL_GRID, VISION_WIDTH, QUESTION_LEN = 128, 3, 1152, 32

SHAPES = {
  "4 layers x 512": dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
  ),
  "2 layers x 1536 (1.5B width)": dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=2,
    num_attention_heads=12,
    num_key_value_heads=2,
  ),
}


def build_pair(shape: dict, workdir: str):
  """A random transformers Qwen2 saved and loaded into our Selector, plus a torch scorer that
  uses the very same weights (projector and score head copied from ours)."""
  from transformers import Qwen2Config, Qwen2ForCausalLM

  torch.manual_seed(0)
  hf_cfg = Qwen2Config(vocab_size=4096, tie_word_embeddings=True, rope_theta=1e6, **shape)
  torch_llm = Qwen2ForCausalLM(hf_cfg).eval()
  torch_llm.save_pretrained(workdir)
  llm = hf.load_qwen2(workdir)
  cfg = SelectorConfig(
    vision=presets.SIGLIP["siglip-so400m-patch14-384"],
    llm=llm.config,
    num_candidates=NUM_CANDIDATES,
    pool_grid=POOL_GRID,
  )
  selector = Selector(cfg, rngs=nnx.Rngs(0))
  selector.llm = llm
  del selector.vision_tower  # the scoring pass starts from cached visual tokens

  t = lambda x: torch.from_numpy(np.asarray(x).copy())
  linear = lambda dense: _torch_linear(t(dense.kernel[...]), t(dense.bias[...]))
  projector = torch.nn.Sequential(
    linear(selector.projector.linear_1), torch.nn.GELU(), linear(selector.projector.linear_2)
  )
  head_norm = torch_llm.model.norm.__class__(hf_cfg.hidden_size, eps=hf_cfg.rms_norm_eps)
  head_norm.weight.data = t(selector.score_head.norm.weight[...])
  head = torch.nn.Sequential(
    head_norm,
    linear(selector.score_head.linear_1),
    torch.nn.GELU(),
    linear(selector.score_head.linear_2),
  )
  query = t(selector.score_query[...])
  # Scores are read after the penultimate block: drop the last block and the final norm.
  torch_llm.model.layers = torch_llm.model.layers[:-1]
  torch_llm.model.norm = torch.nn.Identity()

  @torch.inference_mode()
  def torch_blocks(seq):
    return torch_llm.model(inputs_embeds=seq).last_hidden_state

  @torch.inference_mode()
  def torch_score(visual_tokens, question_ids):
    visual = projector(visual_tokens).reshape(1, -1, hf_cfg.hidden_size)
    question = torch_llm.model.embed_tokens(question_ids)
    seq = torch.cat([visual, question, query[None, None]], dim=1)
    hidden = torch_llm.model(inputs_embeds=seq).last_hidden_state
    return head(hidden[:, -1])

  return selector, torch_score, torch_blocks


def _torch_linear(kernel, bias):
  layer = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
  layer.weight.data, layer.bias.data = kernel.T.contiguous(), bias
  return layer


def timed(fn, repeats):
  fn()  # warm-up (compilation for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
    f"torch {torch.__version__} "
    f"({torch.get_num_threads()} threads); n={NUM_CANDIDATES} x {POOL_GRID}x{POOL_GRID} tokens "
    f"+ {QUESTION_LEN} question tokens + 1 query"
  )
  header = f"{'LLM':<30} {'JAX ms':>9} {'PyTorch ms':>11} {'JAX/PyTorch':>12} {'max |diff|':>11}"
  row = lambda name, a, b, diff: f"{name:<30} {a:>9.1f} {b:>11.1f} {a / b:>12.2f} {diff:>11.2e}"
  scoring, blocks = [], []
  rng = np.random.default_rng(0)
  visual = rng.standard_normal((1, NUM_CANDIDATES, POOL_GRID**2, VISION_WIDTH)).astype(np.float32)
  ids = rng.integers(0, 4096, (1, QUESTION_LEN)).astype(np.int32)
  for name, shape in SHAPES.items():
    with tempfile.TemporaryDirectory() as workdir:
      selector, torch_score, torch_blocks = build_pair(shape, workdir)
    graphdef, state = nnx.split(selector)
    mask = jnp.ones((1, QUESTION_LEN), jnp.int32)
    jax_score = jax.jit(lambda s, v, i: nnx.merge(graphdef, s).score(v, i, mask))
    v_jax, i_jax = jnp.asarray(visual), jnp.asarray(ids)
    v_torch, i_torch = torch.from_numpy(visual), torch.from_numpy(ids.astype(np.int64))
    diff = np.abs(
      np.asarray(jax_score(state, v_jax, i_jax)) - torch_score(v_torch, i_torch).numpy()
    ).max()
    jax_ms = timed(lambda: jax_score(state, v_jax, i_jax).block_until_ready(), args.repeats)
    torch_ms = timed(lambda: torch_score(v_torch, i_torch), args.repeats)
    scoring.append(row(name, jax_ms, torch_ms, diff))

    # The blocks alone, every row: the same L - 1 blocks over the same embeddings.
    seq_len = NUM_CANDIDATES * POOL_GRID**2 + QUESTION_LEN + 1
    seq = rng.standard_normal((1, seq_len, shape["hidden_size"])).astype(np.float32)
    jax_blocks = jax.jit(
      lambda s, x: nnx.merge(graphdef, s).llm.model(x, num_layers=shape["num_hidden_layers"] - 1)[0]
    )
    s_jax, s_torch = jnp.asarray(seq), torch.from_numpy(seq)
    diff = np.abs(np.asarray(jax_blocks(state, s_jax)) - torch_blocks(s_torch).numpy()).max()
    jax_ms = timed(lambda: jax_blocks(state, s_jax).block_until_ready(), args.repeats)
    torch_ms = timed(lambda: torch_blocks(s_torch), args.repeats)
    blocks.append(row(name, jax_ms, torch_ms, diff))
  print("scoring forward (target JAX/PyTorch <= 1.0)")
  print(header, *scoring, sep="\n")
  print(f"\nthe blocks alone, every row of all L - 1 blocks on both sides ({seq_len} tokens)")
  print(header, *blocks, sep="\n")


if __name__ == "__main__":
  main()
