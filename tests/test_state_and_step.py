"""Sharded state creation and the train step: shardings, accumulation, freezing, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinytask
from helpers import TINY
from jax.sharding import PartitionSpec as P

from fdjax import config as config_lib
from fdjax import sharding as sharding_lib
from fdjax import optim as optim_lib
from fdjax import state as state_lib
from fdjax import step as step_lib


def _setup(overrides=(), mesh_sizes=(2, 2, 2)):
  config = config_lib.load_config(TINY, list(overrides))
  mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.MESH_AXES, mesh_sizes)))
  rules = sharding_lib.as_rules(config.rules)
  model = tinytask.build_model(config)
  tx, schedule = optim_lib.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(
      jax.random.key(0), mesh, rules, model, tx, tinytask.dummy_batch(config, 1)
    )
  return config, mesh, rules, model, tx, schedule, state, shardings


def _batch(config, size, seed=0):
  examples = tinytask.make_examples(size, seed=seed)
  return {k: np.stack([e[k] for e in examples]) for k in ("x", "y")}


def _step_fn(config, mesh, rules, model, tx, schedule, shardings, state, **kw):
  return step_lib.jit_train_step(
    mesh,
    rules,
    shardings,
    model=model,
    loss_fn=tinytask.loss_fn,
    tx=tx,
    schedule=schedule,
    trainable=optim_lib.trainable_mask(state.params, config.optim.freeze),
    **kw,
  )


def test_params_and_optimizer_state_carry_the_rules_shardings():
  *_, state, _ = _setup()
  expected = {
    ("encoder", "dense", "kernel"): P("fsdp", "tensor"),  # (embed, mlp)
    ("encoder", "dense", "bias"): P("tensor"),  # (mlp,)
    ("head", "kernel"): P("tensor", "fsdp"),  # (mlp, embed)
    ("head", "bias"): P("fsdp"),  # (embed,)
  }
  params = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert {tuple(k.key for k in path): leaf.sharding.spec for path, leaf in params} == expected
  # adamw's first and second moments are sharded exactly like the parameters.
  adam_state = state.opt_state[0]
  for moments in (adam_state.mu, adam_state.nu):
    flat = jax.tree_util.tree_flatten_with_path(moments)[0]
    assert {tuple(k.key for k in path): leaf.sharding.spec for path, leaf in flat} == expected
  assert state.step.sharding.spec == P()


def test_gradient_accumulation_over_4_micro_batches_equals_full_batch():
  overrides = [
    "--config.optim.optimizer=sgd",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.optim.lr=0.5",
    "--config.model.dropout=0.0",
    "--config.batch_size=32",
  ]
  config, mesh, rules, model, tx, schedule, state, shardings = _setup(overrides)
  batch = _batch(config, 32)
  params0 = jax.device_get(state.params)
  full = _step_fn(config, mesh, rules, model, tx, schedule, shardings, state, grad_accum_steps=1)
  accumulated = _step_fn(
    config, mesh, rules, model, tx, schedule, shardings, state, grad_accum_steps=4
  )
  copy = lambda s: jax.tree.map(lambda x: x.copy(), s)
  with jax.set_mesh(mesh):
    s_full, m_full = full(copy(state), batch)
    s_acc, m_acc = accumulated(copy(state), batch)
  np.testing.assert_allclose(m_full["loss"], m_acc["loss"], atol=1e-6)
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), s_full.params, params0)
  assert max(jax.tree.leaves(moved)) > 1e-3  # The update is not trivially zero.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
    s_full.params,
    s_acc.params,
  )


def test_nan_batch_skips_the_update_and_counts_it():
  config, mesh, rules, model, tx, schedule, state, shardings = _setup(
    ["--config.model.dropout=0.0"]
  )
  step = _step_fn(config, mesh, rules, model, tx, schedule, shardings, state)
  batch = _batch(config, 16)
  bad = dict(batch, x=batch["x"].copy())
  bad["x"][3, 2] = np.nan
  with jax.set_mesh(mesh):
    state, _ = step(state, batch)
    before = jax.device_get(state)
    state, metrics = step(state, bad)
    after = jax.device_get(state)
  assert int(metrics["nonfinite"]) == 1 and int(after.nonfinite_total) == 1
  assert int(after.nonfinite_consecutive) == 1 and int(after.step) == 2
  jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
  jax.tree.map(np.testing.assert_array_equal, before.opt_state, after.opt_state)
  with jax.set_mesh(mesh):
    state, metrics = step(state, batch)
  assert int(metrics["nonfinite"]) == 0 and int(state.nonfinite_consecutive) == 0


def test_frozen_subtree_has_no_optimizer_state_and_no_updates():
  config, mesh, rules, model, tx, schedule, state, shardings = _setup(
    ["--config.optim.freeze=('^encoder/',)"]
  )
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  ]
  assert paths and not any("encoder" in p for p in paths), paths
  assert any("head" in p for p in paths)
  step = _step_fn(config, mesh, rules, model, tx, schedule, shardings, state)
  encoder0 = jax.device_get(state.params["encoder"])
  head0 = jax.device_get(state.params["head"])
  with jax.set_mesh(mesh):
    for seed in range(3):
      state, _ = step(state, _batch(config, 16, seed))
  jax.tree.map(np.testing.assert_array_equal, encoder0, jax.device_get(state.params["encoder"]))
  assert not np.array_equal(head0["kernel"], np.asarray(state.params["head"]["kernel"]))
  assert optim_lib.count_params(state.params, config.optim.freeze) == (
    16 * 4 + 4,
    8 * 16 + 16 + 16 * 4 + 4,
  )


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
  optim = config_lib.base_config().optim
  optim.update(lr=1.0, schedule=schedule, warmup_steps=10, end_lr_factor=0.1)
  fn = optim_lib.make_schedule(optim, total_steps=110)
  assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.5)
  assert float(fn(10)) == pytest.approx(1.0)
  assert float(fn(110)) == pytest.approx(1.0 if schedule == "constant" else 0.1, abs=1e-6)


def test_weight_decay_skips_biases():
  optim = config_lib.base_config().optim
  optim.update(optimizer="adamw", lr=0.0, weight_decay=0.5, schedule="constant")
  tx, _ = optim_lib.make_optimizer(optim, 10)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  optim.lr = 1.0
  tx, _ = optim_lib.make_optimizer(optim, 10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0.0
