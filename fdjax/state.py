"""The train state (a plain pytree) and its creation directly in its sharded layout.

`create_train_state` never builds parameters on one device and then moves them: it traces the
initialiser with `jax.eval_shape`, reads each parameter's logical axis names (and, because the
optimizer is initialised on the boxed parameters, those of the optimizer state), maps them to
shardings with the config's rules, and runs the initialiser under `jax.jit(out_shardings=...)`.
Parameters are kept unboxed in the state; the shardings tree travels beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fdjax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes. A pytree of arrays only."""

  step: jax.Array  # [] int32: updates taken (including skipped non-finite ones).
  params: Any  # Unboxed parameter tree, float32.
  opt_state: Any  # optax state; frozen parameters hold `MaskedNode`s.
  rng: jax.Array  # [2] uint32: raw PRNG key data for dropout and other randomness.
  nonfinite_consecutive: jax.Array  # [] int32: non-finite steps in a row just now.
  nonfinite_total: jax.Array  # [] int32: non-finite steps skipped over the whole run.


def strip_boxes(tree: Any) -> Any:
  """Replaces logical-axis boxes by their values, without applying sharding constraints."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def _init_boxed(
  rng: jax.Array,
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy_batch: dict,
  init_fn: Callable | None,
) -> TrainState:
  """Initialises with logical-axis boxes kept (parameters and optimizer state alike)."""
  param_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  if init_fn is None:
    variables = model.init({"params": param_rng, "dropout": dropout_rng}, dummy_batch)
  else:
    variables = init_fn(model, {"params": param_rng, "dropout": dropout_rng}, dummy_batch)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(state_rng),
    nonfinite_consecutive=jnp.zeros((), jnp.int32),
    nonfinite_total=jnp.zeros((), jnp.int32),
  )


def state_shardings(
  mesh: Mesh,
  rules: Any,
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy_batch: dict,
  init_fn: Callable | None = None,
) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state of `ShapeDtypeStruct`s, matching tree of `NamedSharding`s)."""
  boxed = jax.eval_shape(
    lambda rng: _init_boxed(rng, model, tx, dummy_batch, init_fn), jax.random.key(0)
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
  """
  _, shardings = state_shardings(mesh, rules, model, tx, dummy_batch, init_fn)
  init = jax.jit(
    lambda rng: nn.unbox(_init_boxed(rng, model, tx, dummy_batch, init_fn)),
    out_shardings=shardings,
  )
  with nn.logical_axis_rules(sharding_lib.as_rules(rules)):
    state = init(rng)
  return state, shardings
