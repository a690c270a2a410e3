"""The TPU flash-attention wrapper (frameselect_jax.models.attention) computes what the model's
XLA attention computes at every position the model reads: checked on CPU with the kernel
swapped for its plain-JAX reference (same segments, padding, head mapping, shard_map)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from train_testlib import REPO, env

from frameselect_jax import experiment
from frameselect_jax import sharding as shd
from frameselect_jax.models import attention
from frameselect_jax.models.selector import Selector


def compare_attention(mesh, seq=300, heads=4, kv_heads=2, batch=4):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, seq, heads, 16))
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, 16))
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, 16))
  valid = np.ones((batch, seq), bool)
  valid[0, 40:90] = False  # padding frames among the visual tokens
  valid[1, 250:] = False  # right padding of the text
  valid[2, ::7] = False
  key_valid = jnp.asarray(valid)
  expected = jax.jit(attention.causal_attention)(q, k, v, key_valid)
  flash = attention.flash_attention(mesh, reference=True)
  got = jax.jit(flash)(q, k, v, key_valid)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=2e-5)


def test_flash_wrapper_matches_xla_attention_on_valid_positions():
  compare_attention(shd.make_mesh(1, 1, 1, jax.devices()[:1]))


def test_selector_scores_are_the_same_with_the_flash_wrapper():
  cfg = experiment.selector_config(dict(llm="tiny", vision="tiny", num_candidates=16, pool_grid=3))
  model = Selector(cfg, rngs=nnx.Rngs(0))
  visual = jax.random.normal(jax.random.key(1), (2, 16, 9, cfg.vision.hidden_size))
  ids = jax.random.randint(jax.random.key(2), (2, 40), 0, 250)
  mask = (jnp.arange(40)[None] < jnp.array([[40], [23]])).astype(jnp.int32)
  valid = jnp.arange(16)[None] < jnp.array([[16], [11]])
  expected = model.score(visual, ids, mask, valid)
  flash = attention.flash_attention(shd.make_mesh(1, 1, 1, jax.devices()[:1]), reference=True)
  got = model.score(visual, ids, mask, valid, attention=flash)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5)


def test_flash_wrapper_with_query_heads_split_over_tensor_parallel_devices():
  """(2, 2, 2) mesh: batch over data x fsdp, query heads over tensor; each device must pair
  its query heads with the right KV heads."""
  script = textwrap.dedent("""
      import jax
      from frameselect_jax import sharding as shd
      from test_train_attention import compare_attention
      mesh = shd.make_mesh(2, 2, 2)
      compare_attention(mesh, heads=8, kv_heads=2, batch=4)   # 4 local heads: one whole group
      compare_attention(mesh, heads=8, kv_heads=4, batch=4)   # two whole groups
      compare_attention(mesh, heads=8, kv_heads=1, batch=4)   # half of one group
      compare_attention(mesh, heads=12, kv_heads=3, batch=4)  # 6 local heads over groups of 4
      print("ok")
  """)
  proc = subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO + "/tests",
    env=env(devices=8),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
