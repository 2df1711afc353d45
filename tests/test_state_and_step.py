"""Sharded state creation and the train step: shardings, accumulation, freezing, NaN guard,
EMA and mutable collections."""

import os
from typing import Any

import bntask
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tinytask
from helpers import TESTS, TINY
from jax.sharding import PartitionSpec as P

from fdjax import checkpoint as checkpoint_lib
from fdjax import config as config_lib
from fdjax import optim as optim_lib
from fdjax import sharding as sharding_lib
from fdjax import state as state_lib
from fdjax import step as step_lib

BN = os.path.join(TESTS, "configs", "bn.py")


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


def test_parameter_and_update_norms_are_computed_on_logged_steps_only():
  # Steps 3 and 6 (multiples of norms_every) and the last, 7th, are logged; the others skip the
  # two diagnostic passes over the parameters and report NaN.
  config, mesh, rules, model, tx, schedule, state, shardings = _setup(
    ["--config.model.dropout=0.0"]
  )
  step = _step_fn(
    config, mesh, rules, model, tx, schedule, shardings, state, norms_every=3, last_step=7
  )
  batch = _batch(config, 16)
  logged = []
  with jax.set_mesh(mesh):
    for _ in range(7):
      before = jax.device_get(state.params)
      state, metrics = step(state, batch)
      after = jax.device_get(state.params)
      if np.isfinite(metrics["param_norm"]):
        logged.append(int(state.step))
        updates = jax.tree.map(np.subtract, after, before)
        np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(before), rtol=1e-6)
        np.testing.assert_allclose(metrics["update_norm"], optax.tree.norm(updates), rtol=1e-4)
      else:
        assert np.isnan(metrics["update_norm"])
      assert np.isfinite(metrics["grad_norm"]) and float(metrics["grad_norm"]) > 0
  assert logged == [3, 6, 7]


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


# --- EMA and mutable collections -----------------------------------------------------------


@flax.struct.dataclass
class PreEmaTrainState:
  """`fdjax.state.TrainState` exactly as it was before EMA and collections existed."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_consecutive: jax.Array
  nonfinite_total: jax.Array


def _as_pre_ema(state):
  return PreEmaTrainState(**{f: getattr(state, f) for f in state_lib.REQUIRED_FIELDS})


def test_state_without_ema_or_collections_has_the_pre_ema_leaves_and_key_paths():
  *_, state, shardings = _setup()
  assert state.ema is None and state.collections is None
  paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(tree)]
  assert paths(state) == paths(_as_pre_ema(state))
  assert paths(shardings) == paths(_as_pre_ema(shardings))
  top = {jax.tree_util.keystr(p[:1]) for p, _ in jax.tree.leaves_with_path(state)}
  assert top == {f".{f}" for f in state_lib.REQUIRED_FIELDS}


def test_checkpoint_of_the_pre_ema_state_restores_into_the_new_state(tmp_path):
  config, mesh, rules, model, tx, schedule, state, shardings = _setup()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
  dataset = tinytask.train_data(config, process_index=0, process_count=1)
  checkpointer.save(3, _as_pre_ema(state), iter(dataset), force=True)
  checkpointer.wait()
  metadata = checkpointer.manager.item_metadata(3)["state"]
  assert set(metadata.keys()) == set(state_lib.REQUIRED_FIELDS)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
  step, restored = checkpointer.restore(abstract, None)
  checkpointer.close()
  assert step == 3 and isinstance(restored, state_lib.TrainState) and restored.ema is None
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))


def _bn_setup(overrides=(), mesh_sizes=(2, 2, 2), ema=True):
  config = config_lib.load_config(BN, ["--config.model.dropout=0.0", *overrides])
  mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.MESH_AXES, mesh_sizes)))
  rules = sharding_lib.as_rules(config.rules)
  model = bntask.build_model(config)
  tx, schedule = optim_lib.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(
      jax.random.key(0), mesh, rules, model, tx, bntask.dummy_batch(config, 1), ema=ema
    )
  step = step_lib.jit_train_step(
    mesh,
    rules,
    shardings,
    model=model,
    loss_fn=bntask.loss_fn,
    tx=tx,
    schedule=schedule,
    trainable=optim_lib.trainable_mask(state.params, config.optim.freeze),
    grad_accum_steps=config.grad_accum_steps,
    ema_decay=config.ema.decay,
    ema_start_step=config.ema.start_step,
  )
  return config, mesh, model, state, shardings, step


def test_ema_is_sharded_like_the_params_and_batch_stats_are_replicated():
  config, mesh, model, state, shardings, _ = _bn_setup()
  assert jax.tree.structure(state.ema) == jax.tree.structure(state.params)
  jax.tree.map(lambda e, p: assert_same(e.sharding, p.sharding), state.ema, state.params)
  assert state.ema["encoder"]["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert set(state.collections) == {"batch_stats"}
  for leaf in jax.tree.leaves(state.collections):
    assert leaf.sharding.spec == P()
  # The EMA starts as the initial parameters, in its own buffers (the step donates both).
  jax.tree.map(np.testing.assert_array_equal, state.ema, state.params)


def assert_same(a, b):
  assert a == b, (a, b)


class CountingModel(nn.Module):
  """A Dense layer and two collections: a boxed running sum and an order-sensitive history."""

  @nn.compact
  def __call__(self, batch, train: bool = False):
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    y = nn.Dense(8, kernel_init=kernel_init, name="dense")(batch["x"])  # [B, 8]
    total = self.variable(
      "totals",
      "x",
      nn.with_logical_partitioning(lambda: jnp.zeros((8, 8)), ("embed", "mlp")),
    )
    history = self.variable("history", "value", lambda: jnp.zeros(()))
    if train and not self.is_initializing():
      total.value = total.value + jnp.sum(batch["x"]) * jnp.ones((8, 8))
      history.value = history.value * 10.0 + jnp.mean(batch["x"])
    return y, {}


def counting_loss(model, params, batch, rng, train, collections):
  if train:
    (y, _), updated = model.apply(
      {"params": params, **collections}, batch, train=True, mutable=list(collections)
    )
    return jnp.mean(y**2), {"collections": updated}
  y, _ = model.apply({"params": params, **collections}, batch)
  return jnp.mean(y**2), {}


def test_boxed_collections_follow_their_logical_names_and_accumulation_threads_them_in_order():
  mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.MESH_AXES, (2, 2, 2))))
  rules = sharding_lib.as_rules(config_lib.base_config().rules)
  model = CountingModel()
  optim = config_lib.base_config().optim
  tx, schedule = optim_lib.make_optimizer(optim, 10)
  dummy = {"x": np.zeros((1, 8), np.float32)}
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(
      jax.random.key(0), mesh, rules, model, tx, dummy
    )
  assert state.collections["totals"]["x"].sharding.spec == P("fsdp", "tensor")
  assert state.collections["history"]["value"].sharding.spec == P()
  step = step_lib.jit_train_step(
    mesh,
    rules,
    shardings,
    model=model,
    loss_fn=counting_loss,
    tx=tx,
    schedule=schedule,
    trainable=optim_lib.trainable_mask(state.params, ()),
    grad_accum_steps=4,
  )
  x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
  with jax.set_mesh(mesh):
    new, metrics = step(state, {"x": x})
  assert "collections" not in metrics
  # Micro-batch i takes examples i, i + 4, ...; each sees the history the previous one left.
  expected = 0.0
  for i in range(4):
    expected = expected * 10.0 + x[i::4].mean()
  np.testing.assert_allclose(new.collections["history"]["value"], expected, rtol=1e-5)
  np.testing.assert_allclose(new.collections["totals"]["x"], np.full((8, 8), x.sum()), rtol=1e-4)


def test_nan_batch_leaves_ema_and_batch_stats_untouched():
  config, mesh, model, state, shardings, step = _bn_setup()
  batch = _batch(config, 16)
  bad = dict(batch, x=batch["x"].copy())
  bad["x"][0, 0] = np.nan
  with jax.set_mesh(mesh):
    for _ in range(3):  # Past the warmup's zero learning rate, so the parameters move.
      state, _ = step(state, batch)
    before = jax.device_get(state)
    state, metrics = step(state, bad)
  after = jax.device_get(state)
  assert int(metrics["nonfinite"]) == 1
  jax.tree.map(np.testing.assert_array_equal, before.ema, after.ema)
  jax.tree.map(np.testing.assert_array_equal, before.collections, after.collections)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), before.ema, jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 0  # The EMA lags the parameters: the check can fail.


def test_batch_stats_follow_the_batch_under_the_step():
  config, mesh, model, state, shardings, step = _bn_setup(ema=False)
  assert state.ema is None
  batch = _batch(config, 16)
  params = jax.device_get(state.params)
  with jax.set_mesh(mesh):
    new, _ = step(state, batch)
  hidden = tinytask.Encoder(hidden=16).apply({"params": params["encoder"]}, batch["x"])  # [B, 16]
  # Running statistics start at mean 0 and move by (1 - momentum) towards the batch's.
  expected_mean = (1 - model.momentum) * np.asarray(hidden).mean(0)
  np.testing.assert_allclose(
    new.collections["batch_stats"]["norm"]["mean"], expected_mean, rtol=1e-4, atol=1e-6
  )


@pytest.mark.parametrize("start_step", [0, 3])
def test_update_ema_copies_params_until_start_step_then_averages(start_step):
  ema, decay = {"w": jnp.zeros(2)}, 0.5
  history = []
  for n in range(1, 6):
    params = {"w": jnp.full(2, float(n))}
    ema = step_lib.update_ema(ema, params, jnp.int32(n), decay, start_step)
    history.append(float(ema["w"][0]))
  expected, value = [], 0.0
  for n in range(1, 6):
    value = float(n) if n <= start_step else decay * value + (1 - decay) * n
    expected.append(value)
  assert history == pytest.approx(expected)


def test_a_loss_that_declares_step_gets_the_update_count_in_training():
  config, mesh, rules, model, tx, schedule, state, shardings = _setup()
  batch = _batch(config, 8)

  def loss_with_step(model, params, batch, rng, train, *, step=None):
    loss, aux = tinytask.loss_fn(model, params, batch, rng, train)
    return loss, {**aux, "seen_step": jnp.asarray(-1 if step is None else step, jnp.float32)}

  assert step_lib.takes_step(loss_with_step) and not step_lib.takes_step(tinytask.loss_fn)
  run = step_lib.jit_train_step(
    mesh,
    rules,
    shardings,
    model=model,
    loss_fn=loss_with_step,
    tx=tx,
    schedule=schedule,
    trainable=optim_lib.trainable_mask(state.params, config.optim.freeze),
  )
  seen = []
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, metrics = run(state, batch)
      seen.append(float(metrics["seen_step"]))
  assert seen == [0.0, 1.0, 2.0]
