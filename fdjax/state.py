"""The train state (a plain pytree) and its creation directly in its sharded layout.

`create_train_state` never builds parameters on one device and then moves them: it traces the
initialiser with `jax.eval_shape`, reads each parameter's logical axis names (and, because the
optimizer is initialised on the boxed parameters, those of the optimizer state), maps them to
shardings with the config's rules, and runs the initialiser under `jax.jit(out_shardings=...)`.
Parameters are kept unboxed in the state; the shardings tree travels beside it.

Two parts are optional and cost nothing when unused: `ema`, an exponential moving average of the
parameters (`config.ema.decay > 0`), sharded exactly like them; and `collections`, the mutable
variable collections `model.init` returns besides `params` (BatchNorm's `batch_stats`, ...),
sharded by their logical names where boxed and replicated otherwise. A state without them has
the same pytree leaves and key paths as before they existed, so its checkpoints are unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fdjax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a training step reads and writes. A pytree of arrays only."""

  step: jax.Array  # [] int32: updates taken (including skipped non-finite ones).
  params: Any  # Unboxed parameter tree, float32.
  opt_state: Any  # optax state; frozen parameters hold `MaskedNode`s.
  rng: jax.Array  # [2] uint32: raw PRNG key data for dropout and other randomness.
  nonfinite_consecutive: jax.Array  # [] int32: non-finite steps in a row just now.
  nonfinite_total: jax.Array  # [] int32: non-finite steps skipped over the whole run.
  ema: Any = None  # EMA of `params`, same tree and shardings (None: EMA off).
  collections: Any = None  # {name: tree} of mutable model collections (None: the model has none).

  def replace(self, **changes: Any) -> TrainState:
    return dataclasses.replace(self, **changes)


REQUIRED_FIELDS = (
  "step",
  "params",
  "opt_state",
  "rng",
  "nonfinite_consecutive",
  "nonfinite_total",
)
OPTIONAL_FIELDS = ("ema", "collections")


def _flatten_with_keys(state: TrainState):
  # Optional fields that are None are not children at all (not even empty ones), so the saved
  # tree of a run without them is exactly the tree of the state before they existed.
  names = REQUIRED_FIELDS + tuple(n for n in OPTIONAL_FIELDS if getattr(state, n) is not None)
  return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], names


jax.tree_util.register_pytree_with_keys(
  TrainState,
  _flatten_with_keys,
  lambda names, children: TrainState(**dict(zip(names, children, strict=True))),
)


def strip_boxes(tree: Any) -> Any:
  """Replaces logical-axis boxes by their values, without applying sharding constraints."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


# Collections `init` may return that are not state: sown intermediates are per-call outputs.
NOT_STATE_COLLECTIONS = ("params", "intermediates")


def _drop_misfit_boxes(tree: Any, mesh: Mesh, rules: Any) -> Any:
  """Unboxes optimizer-state leaves that their parameter's axis names do not fit.

  optax keeps the parameter's box around every leaf it derives from it; for factored
  statistics (adafactor's row and column second moments, `[1]` placeholders) the names no
  longer fit the leaf's rank or divide its shape, so those (small) leaves are left without
  names, i.e. replicated.
  """

  def fits(box: nn.Partitioned) -> bool:
    shape = box.value.shape
    if len(shape) != len(box.names):
      return False
    spec = nn.logical_to_mesh_axes(box.names, sharding_lib.as_rules(rules))
    for size, axes in zip(shape, spec, strict=True):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      if size % math.prod(mesh.shape[a] for a in axes):
        return False
    return True

  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) and not fits(x) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def _init_boxed(
  rng: jax.Array,
  mesh: Mesh,
  rules: Any,
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy_batch: dict,
  init_fn: Callable | None,
  ema: bool,
) -> TrainState:
  """Initialises with logical-axis boxes kept (parameters and optimizer state alike)."""
  param_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  if init_fn is None:
    variables = model.init({"params": param_rng, "dropout": dropout_rng}, dummy_batch)
  else:
    variables = init_fn(model, {"params": param_rng, "dropout": dropout_rng}, dummy_batch)
  params = variables["params"]
  collections = {k: v for k, v in variables.items() if k not in NOT_STATE_COLLECTIONS}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=_drop_misfit_boxes(tx.init(params), mesh, rules),
    rng=jax.random.key_data(state_rng),
    nonfinite_consecutive=jnp.zeros((), jnp.int32),
    nonfinite_total=jnp.zeros((), jnp.int32),
    # The EMA starts as the initial parameters (same boxes, hence the same shardings).
    ema=params if ema else None,
    collections=dict(collections) or None,
  )


def state_shardings(
  mesh: Mesh,
  rules: Any,
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy_batch: dict,
  init_fn: Callable | None = None,
  *,
  ema: bool = False,
) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state of `ShapeDtypeStruct`s, matching tree of `NamedSharding`s)."""
  boxed = jax.eval_shape(
    lambda rng: _init_boxed(rng, mesh, rules, model, tx, dummy_batch, init_fn, ema),
    jax.random.key(0),
  )
  shardings = sharding_lib.tree_shardings(mesh, rules, nn.get_partition_spec(boxed))
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), strip_boxes(boxed), shardings
  )
  return abstract, shardings


def create_train_state(
  rng: jax.Array,
  mesh: Mesh,
  rules: Any,
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy_batch: dict,
  init_fn: Callable | None = None,
  *,
  ema: bool = False,
) -> tuple[TrainState, TrainState]:
  """Creates the state sharded as the rules say. Returns `(state, shardings)`.

  Args:
    rng: a PRNG key (from `jax.random.key(seed)`).
    mesh, rules: the device mesh and the logical-axis rules.
    model: the Flax module; its params carry `nn.with_logical_partitioning` names.
    tx: the optimizer (works on boxed trees, as `fdjax.optim.make_optimizer`'s does).
    dummy_batch: a batch of the right shapes (any batch size) for `model.init`.
    init_fn: optional `init_fn(model, rngs, batch) -> variables` when `model.init(rngs, batch)`
      is not how the task initialises.
    ema: keep an exponential moving average of the parameters (`TrainState.ema`).
  """
  _, shardings = state_shardings(mesh, rules, model, tx, dummy_batch, init_fn, ema=ema)
  init = jax.jit(
    lambda rng: nn.unbox(_init_boxed(rng, mesh, rules, model, tx, dummy_batch, init_fn, ema)),
    out_shardings=shardings,
  )
  with nn.logical_axis_rules(sharding_lib.as_rules(rules)):
    state = init(rng)
  return state, shardings
