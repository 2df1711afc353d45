"""Train and eval steps: module-level pure functions, and their jitted, sharded forms.

A task's loss has the signature

    loss_fn(model, params, batch, rng, train: bool) -> (loss, aux)

where `loss` is the mean over the batch's valid elements and `aux` a dict of scalar metrics; if
`aux` holds `"weight"` (the number of valid elements the mean is over), micro-batches are
weighted by it, so gradient accumulation is exact for masked, variable-length batches too.

When the state holds mutable model collections (BatchNorm's `batch_stats`, ...), the loss is
called as `loss_fn(model, params, batch, rng, train, collections=...)`, and with `train=True`
returns the updated collections in `aux["collections"]` (the step pops them before the metrics;
under accumulation each micro-batch sees the collections the previous one left). A loss that
declares a `step` keyword is passed, in training, the number of updates made so far (an int32
scalar): for schedules inside the loss, such as scheduled sampling's.

`train_step` adds: micro-batch gradient accumulation with `lax.scan`, the precision policy
(float32 parameters, cast to the compute dtype inside the differentiated function, so gradients
and updates stay float32), frozen parameters behind `stop_gradient`, and the non-finite guard
(a step whose loss or gradient norm is not finite leaves parameters and optimizer state untouched,
and is counted). With `ema_decay > 0` the state's EMA of the parameters follows each applied
update (see `update_ema`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fdjax import sharding as sharding_lib
from fdjax.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts floating-point leaves of `tree` to `dtype`; other leaves unchanged."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def _split_micro_batches(batch: dict, num: int, batch_axes: tuple[str, ...]) -> dict:
  """[B, ...] -> [num, B/num, ...], micro-batch i taking every num-th example.

  Strided rather than contiguous, so each micro-batch spreads evenly over the devices that
  hold the batch and no data moves between devices.
  """

  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, batch_axes or None, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)

  return jax.tree.map(split, batch)


def takes_step(loss_fn: LossFn) -> bool:
  """Whether `loss_fn` declares a `step` keyword (then training passes it the update count)."""
  try:
    return "step" in inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    return False


def _call_loss(loss_fn, model, params, batch, rng, train, collections, step=None):
  """The loss, with `collections=` only for a state that has collections, and `step=` (in
  training) only for a loss that declares it."""
  kwargs = {}
  if collections is not None:
    kwargs["collections"] = collections
  if step is not None and takes_step(loss_fn):
    kwargs["step"] = step
  return loss_fn(model, params, batch, rng, train, **kwargs)


def _weighted_grad(
  loss_fn, model, params, collections, batch, rng, trainable, compute_dtype, step=None, mean=False
):
  """Gradient of `loss * weight` (of `loss` itself with `mean=True`: a batch that is not
  accumulated needs no division afterwards, a pass over every gradient saved) with respect to the
  float32 `params`, `loss * weight`, `weight`, the aux, and the updated collections (None
  without collections)."""

  def objective(p):
    p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, trainable)
    loss, aux = _call_loss(
      loss_fn, model, cast_floating(p, compute_dtype), batch, rng, True, collections, step
    )
    aux = dict(aux)
    new_collections = None
    if collections is not None:
      if "collections" not in aux:
        raise ValueError(
          "the state has mutable collections, so a training loss must return the updated "
          'ones in aux["collections"]'
        )
      # Stored in their own dtype, whatever the compute dtype made of them.
      new_collections = jax.tree.map(
        lambda new, old: new.astype(old.dtype), aux.pop("collections"), collections
      )
    weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
    loss = loss.astype(jnp.float32)
    return loss if mean else loss * weight, (loss * weight, weight, aux, new_collections)

  grads, (weighted_loss, weight, aux, new_collections) = jax.grad(objective, has_aux=True)(params)
  return (grads, weighted_loss, weight, aux), new_collections


def update_ema(ema: Any, params: Any, step: jax.Array, decay: float, start_step: int) -> Any:
  """The EMA after the update that made `step` updates: `decay * ema + (1 - decay) * params`.

  Until `step` passes `start_step` the EMA is a copy of the parameters (so averaging starts from
  the weights at `start_step`, not from the initialisation); `start_step=0` averages from the
  first update on, starting from the initial parameters.
  """
  warm = step > start_step
  return jax.tree.map(lambda e, p: jnp.where(warm, decay * e + (1.0 - decay) * p, p), ema, params)


def train_step(
  state: TrainState,
  batch: dict,
  *,
  model: nn.Module,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  trainable: Any,
  grad_accum_steps: int = 1,
  compute_dtype: Any = jnp.float32,
  batch_axes: tuple[str, ...] = (),
  ema_decay: float = 0.0,
  ema_start_step: int = 0,
  norms_every: int = 1,
  last_step: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update from one global batch. Returns the new state and scalar metrics.

  `ema_decay`, `ema_start_step`: the EMA of the parameters (`update_ema`), for a state that
  has one (`state.ema`); skipped non-finite steps leave it, like the collections, untouched.
  `norms_every`, `last_step`: the parameter and update norms (diagnostics only, a pass over
  the parameters each) are computed on the steps the trainer logs, those that make a multiple
  of `norms_every` updates or the `last_step`-th, and are NaN on the others. The gradient norm
  is computed on every step: the non-finite guard and clipping need it.
  """
  rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
  grad = functools.partial(
    _weighted_grad,
    loss_fn,
    model,
    trainable=trainable,
    compute_dtype=compute_dtype,
    step=state.step,
  )
  if grad_accum_steps == 1:
    (grads, loss_sum, weight, aux), collections = grad(
      state.params, state.collections, batch, step_rng, mean=True
    )
  else:
    micro_batches = _split_micro_batches(batch, grad_accum_steps, batch_axes)

    def accumulate(carry, xs):
      sums, collections = carry
      micro, index = xs
      out, collections = grad(state.params, collections, micro, jax.random.fold_in(step_rng, index))
      return (jax.tree.map(jnp.add, sums, out), collections), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zero, _ = jax.eval_shape(grad, state.params, state.collections, first, rng)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), zero)
    ((grads, loss_sum, weight, aux), collections), _ = jax.lax.scan(
      accumulate, (zero, state.collections), (micro_batches, jnp.arange(grad_accum_steps))
    )
    aux = jax.tree.map(lambda a: a / grad_accum_steps, aux)
    grads = jax.tree.map(lambda g: g / weight, grads)
  loss = loss_sum / weight

  # Every gradient is finite iff their global norm is (a norm that overflows float32 counts as
  # not finite too): one reduction, shared with the metric and with norm clipping.
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  logged = ((state.step + 1) % norms_every == 0) | (state.step + 1 == last_step)
  nan = jnp.full((), jnp.nan, jnp.float32)

  def logged_norm(tree):
    return jax.lax.cond(logged, optax.tree.norm, lambda _: nan, tree)

  def apply(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    applied = {"params": params, "opt_state": opt_state}
    if state.ema is not None:
      applied["ema"] = update_ema(state.ema, params, state.step + 1, ema_decay, ema_start_step)
    if state.collections is not None:
      applied["collections"] = collections
    return applied, logged_norm(updates)

  def skip(_):
    kept = {"params": state.params, "opt_state": state.opt_state}
    if state.ema is not None:
      kept["ema"] = state.ema
    if state.collections is not None:
      kept["collections"] = state.collections
    return kept, nan

  # A branch, not a select over every leaf: the update is computed (in place, the state being
  # donated) only when the step is applied, and a skipped step costs no pass over the state.
  applied, update_norm = jax.lax.cond(finite, apply, skip, None)
  new_state = state.replace(
    **applied,
    step=state.step + 1,
    rng=jax.random.key_data(rng),
    nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "param_norm": logged_norm(state.params),  # NaN on steps the trainer does not log
    "update_norm": update_norm,  # NaN on a skipped step and on steps not logged
    "learning_rate": schedule(state.step),
    "nonfinite": (~finite).astype(jnp.int32),
    "nonfinite_consecutive": new_state.nonfinite_consecutive,
    **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()},
  }
  return new_state, metrics


def eval_step(
  params: Any,
  batch: dict,
  *,
  model: nn.Module,
  loss_fn: LossFn,
  compute_dtype=jnp.float32,
  collections: Any = None,
):
  """Loss and metrics on one batch, without gradients. Returns `(loss * weight, weight, aux)`.

  `collections`: the state's mutable collections, for a model that has them.
  """
  loss, aux = _call_loss(
    loss_fn,
    model,
    cast_floating(params, compute_dtype),
    batch,
    jax.random.key(0),
    False,
    collections,
  )
  aux = dict(aux)
  aux.pop("collections", None)
  weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
  return loss.astype(jnp.float32) * weight, weight, aux


def jit_train_step(
  mesh: Mesh,
  rules: Any,
  shardings: TrainState,
  **step_kwargs: Any,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step` jitted with explicit shardings and the state donated."""
  fn = functools.partial(train_step, batch_axes=sharding_lib.batch_axes(rules), **step_kwargs)
  return jax.jit(
    fn,
    in_shardings=(shardings, sharding_lib.batch_sharding(mesh, rules)),
    out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
    donate_argnums=(0,),
  )


def jit_eval_step(mesh: Mesh, rules: Any, param_shardings: Any, **step_kwargs: Any) -> Callable:
  """`eval_step` jitted with explicit shardings."""
  return jax.jit(
    functools.partial(eval_step, **step_kwargs),
    in_shardings=(param_shardings, sharding_lib.batch_sharding(mesh, rules)),
    out_shardings=NamedSharding(mesh, PartitionSpec()),
  )


def resolve_compute_dtype(name: str) -> jnp.dtype:
  """`auto`: bfloat16 on GPU/TPU, float32 on CPU; otherwise the named dtype."""
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return jnp.dtype(name)
