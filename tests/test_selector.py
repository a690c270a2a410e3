"""Selector behaviour: batching, masking, the penultimate-block read-out, LoRA, axes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frameselect_jax import experiment
from frameselect_jax.models import presets
from frameselect_jax.models.layers import add_lora, merge_lora
from frameselect_jax.models.selector import Selector

N = 6

# Jitted entry points: eager op-by-op dispatch is far slower than compiling these tiny models.
score = nnx.jit(lambda model, *args: model.score(*args))
encode = nnx.jit(lambda model, frames: model.encode_frames(frames))


def tiny_config(**overrides):
  return experiment.selector_config(dict(llm="tiny", vision="tiny", num_candidates=N, **overrides))


@pytest.fixture(scope="module")
def selector():
  return Selector(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def visual_tokens(selector):
  frames = jax.random.uniform(jax.random.key(1), (3, N, 56, 56, 3), minval=-1, maxval=1)
  return encode(selector, frames)


def _questions(lengths, width, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 200, (len(lengths), width)).astype(np.int32)
  mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(ids * mask), jnp.asarray(mask)


def test_encode_frames_shape_and_call_equals_two_passes(selector):
  frames = jax.random.uniform(jax.random.key(2), (2, N, 56, 56, 3), minval=-1, maxval=1)
  tokens = encode(selector, frames)
  assert tokens.shape == (2, N, 9, 32)
  ids, mask = _questions([4, 7], 7)
  full = nnx.jit(lambda model, *args: model(*args))(selector, frames, ids, mask)
  np.testing.assert_allclose(full, score(selector, tokens, ids, mask), atol=1e-6)


def test_each_question_scores_as_if_alone(selector, visual_tokens):
  lengths = [3, 9, 5]
  ids, mask = _questions(lengths, 12)
  batched = score(selector, visual_tokens, ids, mask)
  for row, length in enumerate(lengths):
    alone = score(
      selector,
      visual_tokens[row : row + 1],
      ids[row : row + 1, :length],
      mask[row : row + 1, :length],
    )
    np.testing.assert_allclose(batched[row], alone[0], atol=1e-5, rtol=0)


def test_invalid_candidates_are_masked_and_ignored(selector, visual_tokens):
  ids, mask = _questions([5], 5)
  valid = jnp.array([[True, True, True, True, False, False]])
  scores = score(selector, visual_tokens[:1], ids, mask, valid)
  assert bool(jnp.all(jnp.isneginf(scores[0, 4:]))) and bool(jnp.all(jnp.isfinite(scores[0, :4])))
  # Padding frames' content does not leak into the valid frames' scores.
  noisy = visual_tokens[:1].at[:, 4:].set(123.0)
  np.testing.assert_allclose(score(selector, noisy, ids, mask, valid), scores, atol=1e-6)


def test_scores_read_after_penultimate_block(visual_tokens):
  model = Selector(tiny_config(), rngs=nnx.Rngs(0))
  ids, mask = _questions([4], 4)
  before = score(model, visual_tokens[:1], ids, mask)
  last = model.llm.model.layers[-1]
  last.mlp.down_proj.kernel[...] = last.mlp.down_proj.kernel[...] + 5.0
  np.testing.assert_array_equal(score(model, visual_tokens[:1], ids, mask), before)
  penultimate = model.llm.model.layers[-2]
  penultimate.mlp.down_proj.kernel[...] = penultimate.mlp.down_proj.kernel[...] + 5.0
  assert not np.allclose(score(model, visual_tokens[:1], ids, mask), before)


@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
def test_output_rows_equal_the_rows_of_the_full_pass(selector, num_layers):
  """The scoring shortcut: the last block computes only the wanted row of each example."""
  llm = selector.llm.model
  x = jax.random.normal(jax.random.key(3), (3, 11, llm.config.hidden_size))
  attention_mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7], [9]]))
  rows = jnp.array([10, 6, 2])
  run = nnx.jit(
    lambda llm, x, m, r: llm(x, attention_mask=m, num_layers=num_layers, output_rows=r)[0]
  )
  full = nnx.jit(lambda llm, x, m: llm(x, attention_mask=m, num_layers=num_layers)[0])
  got = run(llm, x, attention_mask, rows)
  assert got.shape == (3, 1, llm.config.hidden_size)
  expected = np.asarray(full(llm, x, attention_mask))[np.arange(3), np.asarray(rows)][:, None]
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_question_changes_scores(selector, visual_tokens):
  a = score(selector, visual_tokens[:1], *_questions([6], 6, seed=1))
  b = score(selector, visual_tokens[:1], *_questions([6], 6, seed=2))
  assert not np.allclose(a, b)


def test_instruction_logits_cover_text_positions(selector, visual_tokens):
  ids, mask = _questions([5, 3, 7], 7)
  logits = selector.instruction_logits(visual_tokens, ids, mask)
  assert logits.shape == (3, 7, presets.QWEN2["tiny"].vocab_size)


def test_wrong_candidate_count_is_an_error(selector):
  ids, mask = _questions([3], 3)
  with pytest.raises(ValueError, match="expected visual tokens"):
    score(selector, jnp.zeros((1, N + 1, 9, 32)), ids, mask)


def test_config_errors():
  with pytest.raises(ValueError, match="pool_grid 8 must be in"):
    tiny_config(pool_grid=8)  # the tiny tower has a 7x7 patch grid
  with pytest.raises(ValueError, match="dtype"):
    tiny_config(dtype="float8")


def test_every_parameter_has_logical_axes():
  model = Selector(tiny_config(), rngs=nnx.Rngs(0))
  add_lora(model.llm, r"self_attn\.[qv]_proj$", rank=2, alpha=4, rngs=nnx.Rngs(1))
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    axes = variable.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == variable.get_value().ndim, (path, axes)


def test_lora_zero_init_scaling_and_merge(selector, visual_tokens):
  model = Selector(tiny_config(), rngs=nnx.Rngs(0))
  ids, mask = _questions([5], 5)
  base = score(model, visual_tokens[:1], ids, mask)
  adapted = add_lora(
    model.llm, r"(self_attn\.[qkvo]_proj|mlp\.\w+_proj)$", rank=4, alpha=16, rngs=nnx.Rngs(1)
  )
  assert len(adapted) == 7 * 3
  np.testing.assert_array_equal(score(model, visual_tokens[:1], ids, mask), base)  # B = 0
  assert all(
    v.get_value().dtype == jnp.float32
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  )
  dense = model.llm.model.layers[0].self_attn.q_proj
  dense.lora_b[...] = jax.random.normal(jax.random.key(3), dense.lora_b[...].shape)
  x = jax.random.normal(jax.random.key(4), (2, 64))
  expected = (
    x @ dense.kernel[...] + dense.bias[...] + (16 / 4) * (x @ dense.lora_a[...] @ dense.lora_b[...])
  )
  np.testing.assert_allclose(dense(x), expected, atol=1e-4)
  adapted_scores = score(model, visual_tokens[:1], ids, mask)
  assert not np.allclose(adapted_scores, base)
  assert merge_lora(model) == 21
  assert not nnx.state(model, nnx.LoRAParam)
  np.testing.assert_allclose(score(model, visual_tokens[:1], ids, mask), adapted_scores, atol=1e-5)


def test_lora_pattern_matching_nothing_is_an_error(selector):
  with pytest.raises(ValueError, match="matched no Dense"):
    add_lora(selector.llm, r"does_not_exist", rank=2, alpha=2, rngs=nnx.Rngs(0))


def test_bfloat16_compute_keeps_float32_params(visual_tokens):
  fp32 = Selector(tiny_config(), rngs=nnx.Rngs(0))
  bf16 = Selector(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16)))
  ids, mask = _questions([5], 5)
  a = score(fp32, visual_tokens[:1], ids, mask)
  b = score(bf16, visual_tokens[:1], ids, mask)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(a).max()) + 1e-3)


@pytest.mark.parametrize("policy", ["block", "save_attn_mlp", "save_projections", True])
@pytest.mark.parametrize("head", ["query_mlp", "token_query"])
def test_every_remat_policy_gives_the_same_scores_and_gradients(visual_tokens, policy, head):
  plain = Selector(tiny_config(score_head=head), rngs=nnx.Rngs(0))
  remat = Selector(tiny_config(remat=policy, score_head=head), rngs=nnx.Rngs(0))
  ids, mask = _questions([5], 5)

  @nnx.jit
  def grads(model):
    return nnx.grad(lambda m: jnp.sum(m.score(visual_tokens[:1], ids, mask) ** 2))(model)

  grads_plain, grads_remat = grads(plain), grads(remat)
  for (path, a), (_, b) in zip(nnx.to_flat_state(grads_plain), nnx.to_flat_state(grads_remat)):
    a, b = a.get_value(), b.get_value()  # equal up to float32 summation order
    np.testing.assert_allclose(
      a, b, atol=1e-6 * max(1.0, float(np.abs(a).max())), err_msg=str(path)
    )


def test_an_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat 'sometimes' not in"):
    tiny_config(remat="sometimes").validate()


def test_jit_over_split_state(selector, visual_tokens):
  graphdef, state = nnx.split(selector)
  ids, mask = _questions([4, 6, 2], 6)

  @jax.jit
  def pure_score(state, tokens):
    return nnx.merge(graphdef, state).score(tokens, ids, mask)

  np.testing.assert_allclose(
    pure_score(state, visual_tokens), score(selector, visual_tokens, ids, mask), atol=1e-6
  )


def test_token_query_takes_the_best_tokens_match_and_the_mean_tokens_prior():
  """FrameQueryHead by hand: the match (projected frame state . projected centred query /
  sqrt(d)) is the best token's; the frame-alone term reads the mean of the normalised
  tokens, outside the maximum; on mean states (frame_query) there is one token."""
  from frameselect_jax.models.selector import FrameQueryHead

  d, eps = 8, 1e-6
  head = FrameQueryHead(d, eps=eps, dtype=jnp.float32, rngs=nnx.Rngs(3))
  head.query_mean[...] = jax.random.normal(jax.random.key(4), (d,))
  head.frame_norm.weight[...] = jax.random.uniform(jax.random.key(7), (d,), minval=0.5)
  frames = jax.random.normal(jax.random.key(5), (2, 3, 4, d))
  query = jax.random.normal(jax.random.key(6), (2, d))
  value = lambda x: np.asarray(x[...], np.float64)

  def rms(x):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)

  def by_hand(states):  # states (b, n, t, d)
    q = rms(rms(np.asarray(query, np.float64)) - value(head.query_mean))
    q = (q * value(head.query_norm.weight)) @ value(head.query_proj.kernel)
    q = q + value(head.query_proj.bias)
    normed = rms(states) * value(head.frame_norm.weight)
    f = normed @ value(head.frame_proj.kernel) + value(head.frame_proj.bias)
    match = np.einsum("bntd,bd->bnt", f, q) / np.sqrt(d)
    prior = normed.mean(axis=2) @ value(head.frame_prior)
    return match.max(axis=2) + prior + float(value(head.bias))

  tokens = np.asarray(frames, np.float64)
  np.testing.assert_allclose(head(frames, query), by_hand(tokens), rtol=1e-4, atol=1e-5)
  means = frames.mean(axis=2)
  np.testing.assert_allclose(
    head(means, query), by_hand(tokens.mean(axis=2, keepdims=True)), rtol=1e-4, atol=1e-5
  )
