"""The pure functions of training: losses, the optimizer, the train step and the validation step.

Parameters travel as plain nested dicts of arrays: `params` (trainable, fp32) and `frozen`
(the rest). A step merges them into the Selector with `nnx.merge`, so the step is a pure
function of arrays that jax.jit compiles once, and gradients and optimizer state exist only
for `params`. The trainer and the AOT compiler (train/compile.py) build the very same step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from frameselect_jax import selection
from frameselect_jax import sharding as shd
from frameselect_jax.video import normalize

TASKS = ("instruction", "importance")
MODEL_INPUTS = {
  "importance": ("valid", "labels", "other_labels", "question_ids", "question_mask", "weight"),
  "instruction": ("valid", "text_ids", "text_mask", "answer_mask", "weight"),
}


def step_fields(task: str, cached: bool) -> tuple[str, ...]:
  """The batch fields a task's step reads: cached pooled tokens or raw frames."""
  return MODEL_INPUTS[task] + (("visual",) if cached else ("frames",))


# --- Optimizer ---


LR_SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(train_config, global_batch: int) -> float:
  """train.lr at train.lr_reference_batch, scaled to `global_batch` as train.lr_scaling says:
  none (lr as it is), linear (lr x batch / reference) or sqrt (lr x sqrt(batch / reference))."""
  scaling = train_config.get("lr_scaling", "none")
  if scaling not in LR_SCALINGS:
    raise ValueError(f"train.lr_scaling={scaling!r}; choose one of {LR_SCALINGS}")
  if scaling == "none":
    return float(train_config.lr)
  reference = train_config.get("lr_reference_batch", 0)
  if reference < 1:
    raise ValueError(
      f"train.lr_scaling={scaling!r} needs train.lr_reference_batch >= 1 (the batch that "
      f"train.lr was tuned at), got {reference}"
    )
  ratio = global_batch / reference
  return float(train_config.lr) * (ratio if scaling == "linear" else ratio**0.5)


def make_schedule(train_config, total_steps: int, global_batch: int | None = None):
  """The learning-rate schedule; its peak is `scaled_lr` at `global_batch` (train.lr when
  global_batch is None)."""
  lr = train_config.lr if global_batch is None else scaled_lr(train_config, global_batch)
  warmup = int(round(train_config.warmup_fraction * total_steps))
  if train_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=lr * train_config.end_lr_fraction,
    )
  if train_config.schedule == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )
  raise ValueError(f"unknown schedule {train_config.schedule!r}; choose cosine or constant")


def make_optimizer(train_config, total_steps: int, global_batch: int | None = None):
  """AdamW after global-norm clipping; no weight decay on vectors (biases, norms, query)."""
  schedule = make_schedule(train_config, total_steps, global_batch)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
    optax.clip_by_global_norm(train_config.grad_clip_norm),
    optax.adamw(
      schedule,
      b1=train_config.b1,
      b2=train_config.b2,
      eps=train_config.eps,
      weight_decay=train_config.weight_decay,
      mask=decay_mask,
    ),
  )
  return tx, schedule


# --- Model passes and losses (sums and counts, so that accumulation and sharding are exact) ---


def merge_model(graphdef, params, frozen, vision_abstract=None):
  """The Selector from its parts. With cached visual tokens the vision tower's weights are
  not step inputs at all: zeros stand in for them, which nothing reads, so XLA drops them."""
  states = [nnx.State(params), nnx.State(frozen)]
  if vision_abstract is not None:
    states.append(
      nnx.State(
        {"vision_tower": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), vision_abstract)}
      )
    )
  return nnx.merge(graphdef, *states)


def visual_tokens(model, batch):
  if "visual" in batch:
    return batch["visual"]
  # A frozen tower has nothing trainable feeding it: autodiff never runs backward through it.
  return model.encode_frames(normalize(batch["frames"]))


@dataclasses.dataclass(frozen=True)
class ImportanceLoss:
  """The importance task's loss: the paper's binary cross-entropy of the n logits against the
  soft labels, over the valid candidates, with three options, all off by default
  (train.other_question_weight, train.listwise_weight, train.label_smoothing).

  other_question_weight w != 1: a candidate's negative part counts 1 + (w - 1) h times as
  much, h = max(other_labels - labels, 0): how much more another question about the video
  asks for it than this one does. So the question, not the frame alone, decides its score.

  label_smoothing e > 0: the BCE's targets are labels (1 - e) + e / 2. Without it every
  negative's logit falls without end, and an easy negative (background) falls faster than a
  hard one (a card of the wrong colour), which then outranks it; with it every negative
  settles at the same finite logit, and one weighted w times settles log w below it.

  listwise_weight > 0: each record adds that much times a listwise term (ListNet), the
  cross-entropy between its labels normalised to sum to one and the softmax of its logits
  over the valid candidates. Selection reads only the ranking of the scores, and this term
  is about the ranking: its push on a negative is that negative's probability, so the
  highest-scoring negatives are pushed hardest. It is counted once per valid candidate, so
  the sum over the count is the BCE's mean plus listwise_weight times the records' mean
  term. A record whose labels are all zero adds nothing to it.
  """

  other_question_weight: float = 1.0
  listwise_weight: float = 0.0
  label_smoothing: float = 0.0

  @classmethod
  def from_config(cls, train_config) -> "ImportanceLoss":
    defaults = cls()
    return cls(
      **{
        f.name: float(train_config.get(f.name, getattr(defaults, f.name)))
        for f in dataclasses.fields(cls)
      }
    ).checked()

  def checked(self) -> "ImportanceLoss":
    if self.other_question_weight <= 0:
      raise ValueError(
        f"train.other_question_weight must be positive (1: the paper's BCE), got "
        f"{self.other_question_weight}"
      )
    if self.listwise_weight < 0:
      raise ValueError(
        f"train.listwise_weight must be >= 0 (0: the paper's BCE alone), got {self.listwise_weight}"
      )
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(
        f"train.label_smoothing must be in [0, 1) (0: the paper's BCE), got {self.label_smoothing}"
      )
    return self


def importance_sums(model, batch, attention=None, loss: ImportanceLoss = ImportanceLoss()):
  """(sum of the per-candidate losses, their count, the logits): see `ImportanceLoss`."""
  valid = batch["valid"]
  logits = model.score(
    visual_tokens(model, batch),
    batch["question_ids"],
    batch["question_mask"],
    valid,
    attention=attention,
  )
  logits = jnp.where(valid, logits, 0.0)  # invalid logits are -inf: keep them out of the loss
  mask = valid.astype(jnp.float32) * batch["weight"][:, None]
  labels = batch["labels"]
  targets = labels * (1.0 - loss.label_smoothing) + 0.5 * loss.label_smoothing
  negative_weight = 1.0
  if loss.other_question_weight != 1.0:
    # How much more another question asks for the candidate than this one does.
    hard = jnp.maximum(batch["other_labels"] - labels, 0.0)
    negative_weight = 1.0 + (loss.other_question_weight - 1.0) * hard
  bce = -targets * jax.nn.log_sigmoid(logits) - negative_weight * (1.0 - targets) * (
    jax.nn.log_sigmoid(-logits)
  )
  total = jnp.sum(bce * mask)
  if loss.listwise_weight:
    valid_labels = jnp.where(valid, labels, 0.0)
    target = valid_labels / jnp.maximum(jnp.sum(valid_labels, axis=-1, keepdims=True), 1e-9)
    log_p = jax.nn.log_softmax(jnp.where(valid, logits, -1e9), axis=-1)
    listwise = -jnp.sum(target * log_p, axis=-1)  # target is 0 off the valid candidates
    total = total + loss.listwise_weight * jnp.sum(listwise * jnp.sum(mask, axis=-1))
  return total, jnp.sum(mask), logits


def instruction_sums(model, batch, attention=None):
  """Next-token cross-entropy on the answer tokens, given the visual tokens and the prompt."""
  logits = model.instruction_logits(
    visual_tokens(model, batch),
    batch["text_ids"],
    batch["text_mask"],
    batch["valid"],
    attention=attention,
  )
  targets = batch["text_ids"][:, 1:]
  mask = batch["answer_mask"][:, 1:].astype(jnp.float32) * batch["weight"][:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  return jnp.sum(ce * mask), jnp.sum(mask)


def with_values(tree: dict, values: dict) -> dict:
  """`tree` (nested dicts) with the leaves that `values` names replaced; values for keys
  `tree` lacks (statistics of frozen modules, which do not change) are left out."""
  out = dict(tree)
  for key, value in values.items():
    if key in tree:
      out[key] = with_values(tree[key], value) if isinstance(value, dict) else value
  return out


def loss_count(task, batch):
  """The loss normaliser of a whole (global) batch; it does not depend on the parameters."""
  if task == "importance":
    return jnp.sum(batch["valid"].astype(jnp.float32) * batch["weight"][:, None])
  return jnp.sum(batch["answer_mask"][:, 1:].astype(jnp.float32) * batch["weight"][:, None])


def make_train_step(
  graphdef,
  tx,
  *,
  task: str,
  accum_steps: int = 1,
  vision_abstract=None,
  mesh=None,
  attention=None,
  importance_loss: ImportanceLoss = ImportanceLoss(),
):
  """step(params, frozen, opt_state, batch) -> (params, opt_state, metrics).

  importance_loss: the importance task's loss options (`ImportanceLoss`).

  With accum_steps > 1 the global batch is split into that many micro-batches (each still
  spread over every data-parallel device) and their gradients summed in a lax.scan before
  one optimizer update. Every micro-batch loss is divided by the whole batch's count, so
  the result equals the unaccumulated step up to summation order.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")

  def micro_loss(params, frozen, micro, count):
    model = merge_model(graphdef, params, frozen, vision_abstract)
    model.train()  # batch statistics (the frame head's query mean) instead of running ones
    if task == "importance":
      total, _, _ = importance_sums(model, micro, attention, importance_loss)
    else:
      total, _ = instruction_sums(model, micro, attention)
    return total / count, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(params, frozen, opt_state, batch):
    count = jnp.maximum(loss_count(task, batch), 1.0)
    if accum_steps == 1:
      (loss, stats), grads = grad_fn(params, frozen, batch, count)
    else:

      def split(x):
        # Row r = m * accum + a: micro-batch a takes every accum-th row, so each device
        # keeps its own rows in every micro-batch (no data movement).
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
          x = jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim - 1, (None,)))
        return x

      micro_batches = jax.tree.map(split, batch)

      def body(carry, micro):
        loss_sum, grad_sum = carry
        (loss, stats), grads = grad_fn(params, frozen, micro, count)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), stats

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (loss, grads), stats = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro_batches)
      stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)  # over the micro-batches
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    # Running statistics get no gradient (so no optimizer update): their new values are set.
    params = with_values(optax.apply_updates(params, updates), stats)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {"loss": loss, "grad_norm": grad_norm, "params_finite": finite}
    return params, opt_state, metrics

  return step


def make_validation_step(
  graphdef, *, ks, relevant_label: float, vision_abstract=None, attention=None
):
  """validate(params, frozen, batch) -> sums over the batch's examples.

  BCE over valid frames, and for each k: recall@k and hit@k (selection.py) of the k frames
  greedy NMS picks from the predicted scores, of uniform sampling, and of NMS over the labels
  themselves (the ceiling). The relevant candidates are those whose label is at least
  `relevant_label`; examples without any are counted apart (`unscored`), never as misses.

  Also other_question_hit@k, for the same three: whether the picks include a frame that
  another question about the video asks for (other_labels at least `relevant_label`) and
  this one does not, over the examples that have such frames (`other_questions`). A
  selector that reads the question keeps it near uniform's or below; one that finds every
  needle whatever is asked does not.
  """

  def step(params, frozen, batch):
    model = merge_model(graphdef, params, frozen, vision_abstract)
    bce_sum, count, logits = importance_sums(model, batch, attention)
    valid, weight = batch["valid"], batch["weight"]
    relevant = (batch["labels"] >= relevant_label) & valid
    scored = weight * selection.has_relevant(relevant)
    others = (batch["other_labels"] >= relevant_label) & ~relevant & valid
    with_others = weight * selection.has_relevant(others)
    out = {
      "bce_sum": bce_sum,
      "bce_count": count,
      "examples": jnp.sum(weight),
      "scored": jnp.sum(scored),
      "other_questions": jnp.sum(with_others),
    }
    for k in ks:
      picks = {
        "": selection.select_batch("nms_greedy", jnp.where(valid, logits, -jnp.inf), valid, k),
        "uniform_": selection.select_batch("uniform", logits, valid, k),
        "oracle_": selection.select_batch("nms_greedy", batch["labels"], valid, k),
      }
      for name, chosen in picks.items():
        for metric, fn in (("recall", selection.recall_at_k), ("hit", selection.hit_at_k)):
          value = jnp.nan_to_num(fn(chosen, relevant))
          out[f"{name}{metric}_at_{k}"] = jnp.sum(value * scored)
        other_hit = jnp.nan_to_num(selection.hit_at_k(chosen, others))
        out[f"{name}other_question_hit_at_{k}"] = jnp.sum(other_hit * with_others)
    return out

  return step


# --- Shardings of the step's inputs and outputs ---


def batch_shardings(mesh, spec, fields):
  """Each field's leading (batch) axis over (data, fsdp), the rest replicated."""
  shapes = spec.shapes(cached="visual" in fields)
  return {f: shd.batch_sharding(mesh, len(shapes[f][0]) + 1) for f in fields}


def opt_state_shardings(tx, abstract_params, param_shardings, mesh):
  """Optimizer moments shard like their parameters; step counters are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract_opt,
    param_shardings,
    transform_non_params=lambda _: replicated,
  )


def jit_train_step(
  step, *, param_shardings, frozen_shardings, opt_shardings, batch_shardings, mesh
):
  """One jax.jit with explicit shardings; params and optimizer state are donated."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step,
    in_shardings=(param_shardings, frozen_shardings, opt_shardings, batch_shardings),
    out_shardings=(param_shardings, opt_shardings, replicated),
    donate_argnums=(0, 2),
  )


def jit_validation_step(step, *, param_shardings, frozen_shardings, batch_shardings, mesh):
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step,
    in_shardings=(param_shardings, frozen_shardings, batch_shardings),
    out_shardings=replicated,
  )
