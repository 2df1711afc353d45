"""Optimizers and schedules from optax by name, with keyword arguments; parameter groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tinytask
from helpers import TINY

from fdjax import config as config_lib
from fdjax import optim as optim_lib
from fdjax import sharding as sharding_lib
from fdjax import state as state_lib
from fdjax import step as step_lib

PARAMS = {
  "encoder": {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}},
  "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
}


def _optim(**fields):
  optim = config_lib.base_config().optim
  optim.update({"schedule": "constant", "warmup_steps": 0, **fields})
  return optim


def _updates(optim, grads=None, params=PARAMS):
  tx, _ = optim_lib.make_optimizer(optim, 10)
  grads = jax.tree.map(jnp.ones_like, params) if grads is None else grads
  updates, state = tx.update(grads, tx.init(params), params)
  return updates, state


def _train_one_step(*overrides):
  config = config_lib.load_config(
    TINY, ["--config.model.dropout=0.0", "--config.optim.warmup_steps=0", *overrides]
  )
  mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.MESH_AXES, (2, 2, 2))))
  rules = sharding_lib.as_rules(config.rules)
  model = tinytask.build_model(config)
  tx, schedule = optim_lib.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(
      jax.random.key(0), mesh, rules, model, tx, tinytask.dummy_batch(config, 1)
    )
    step = step_lib.jit_train_step(
      mesh,
      rules,
      shardings,
      model=model,
      loss_fn=tinytask.loss_fn,
      tx=tx,
      schedule=schedule,
      trainable=optim_lib.trainable_mask(state.params, ()),
    )
    examples = tinytask.make_examples(16, seed=0)
    batch = {k: np.stack([e[k] for e in examples]) for k in ("x", "y")}
    before = jax.device_get(state.params)
    state, metrics = step(state, batch)
  return before, jax.device_get(state.params), metrics, schedule


@pytest.mark.parametrize(
  "overrides",
  [
    ["--config.optim.optimizer=lion", "--config.optim.optimizer_kwargs={'b2': 0.98}"],
    # Factored second moments on [8, 16] and [16, 4] kernels: shapes unlike the parameters'.
    [
      "--config.optim.optimizer=adafactor",
      "--config.optim.optimizer_kwargs={'min_dim_size_to_factor': 4}",
    ],
    [
      "--config.optim.warmup_steps=0",
      "--config.optim.schedule=warmup_cosine_decay_schedule",
      "--config.optim.schedule_kwargs={'init_value': 0.01, 'peak_value': 0.1, "
      "'warmup_steps': 5, 'decay_steps': 20}",
    ],
  ],
  ids=["lion", "adafactor", "warmup_cosine_decay_schedule"],
)
def test_optax_optimizers_and_schedules_by_name_build_and_train_a_sharded_step(overrides):
  before, after, metrics, schedule = _train_one_step(*overrides)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after)
  assert min(jax.tree.leaves(moved)) > 0, moved
  if "warmup_cosine_decay_schedule" in overrides[1]:
    assert float(schedule(0)) == pytest.approx(0.01) and float(schedule(5)) == pytest.approx(0.1)


def test_lion_updates_are_the_sign_times_the_learning_rate():
  updates, _ = _updates(_optim(optimizer="lion", lr=0.1))
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, -0.1, rtol=1e-6)


def test_config_weight_decay_reaches_optax_optimizers_that_take_it_with_the_exclude_mask():
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = _updates(_optim(optimizer="lion", lr=1.0, weight_decay=0.5), grads=zeros)
  assert float(jnp.abs(updates["head"]["kernel"]).max()) > 0
  assert float(jnp.abs(updates["head"]["bias"]).max()) == 0.0


def test_builtin_names_build_what_they_always_built():
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), PARAMS)
  constant = optax.constant_schedule(0.1)
  cases = [
    (_optim(optimizer="adam", lr=0.1), optax.adam(constant, b1=0.9, b2=0.999, eps=1e-8)),
    (
      _optim(optimizer="adamw", lr=0.1, weight_decay=0.3),
      optax.adamw(
        constant,
        weight_decay=0.3,
        mask=lambda p: jax.tree_util.tree_map_with_path(
          lambda kp, _: not str(kp[-1].key).endswith("bias"), p
        ),
      ),
    ),
    (
      _optim(optimizer="sgd", lr=0.1, momentum=0.5),
      optax.chain(optax.sgd(constant, momentum=0.5)),
    ),
    # optimizer_kwargs reach the built-in optimizers too.
    (
      _optim(optimizer="adam", lr=0.1, optimizer_kwargs={"nesterov": True}),
      optax.adam(constant, nesterov=True),
    ),
  ]
  for optim, reference in cases:
    ours, state = _updates(optim, grads)
    theirs, reference_state = reference.update(grads, reference.init(PARAMS), PARAMS)
    assert jax.tree.structure(state) == jax.tree.structure(reference_state), optim.optimizer
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


def test_unknown_names_name_the_field_and_the_nearest_optax_names():
  with pytest.raises(ValueError, match=r"config.optim.optimizer='lino' .*nearest: lion"):
    optim_lib.make_optimizer(_optim(optimizer="lino"), 10)
  with pytest.raises(ValueError, match=r"config.optim.schedule='warmup_cosine'.*nearest: .*"):
    optim_lib.make_schedule(_optim(schedule="warmup_cosine"), 10)
  with pytest.raises(ValueError, match=r"warmup_cosine_decay_schedule"):
    optim_lib.make_schedule(_optim(schedule="warmup_cosine"), 10)
  with pytest.raises(ValueError, match=r"config.optim.groups.head.optimizer='adamx'.*adamax"):
    optim_lib.make_optimizer(
      _optim(groups={"head": {"pattern": "^head/", "optimizer": "adamx"}}), 10
    )
  with pytest.raises(TypeError, match=r"config.optim.schedule_kwargs for optax.linear_schedule"):
    optim_lib.make_schedule(_optim(schedule="linear_schedule", schedule_kwargs={"init": 1}), 10)


def test_groups_give_two_subtrees_their_own_learning_rate():
  optim = _optim(optimizer="sgd", lr=0.1, groups={"^head/": {"lr": 0.01}})
  updates, _ = _updates(optim)
  for leaf in jax.tree.leaves(updates["encoder"]):
    np.testing.assert_allclose(leaf, -0.1, rtol=1e-6)
  for leaf in jax.tree.leaves(updates["head"]):
    np.testing.assert_allclose(leaf, -0.01, rtol=1e-6)


def test_groups_may_change_the_optimizer_and_its_kwargs_and_keep_their_own_state():
  optim = _optim(
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    groups={"head": {"pattern": "^head/", "optimizer": "lion", "lr": 0.5}},
  )
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), PARAMS)
  updates, state = _updates(optim, grads)
  for leaf in jax.tree.leaves(updates["head"]):
    np.testing.assert_allclose(leaf, -0.5, rtol=1e-6)  # lion: sign(grad) * lr
  for leaf in jax.tree.leaves(updates["encoder"]):
    np.testing.assert_allclose(leaf, -0.3, rtol=1e-6)  # sgd: grad * lr
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(state)]
  assert any("group:head" in p and "head" in p for p in paths), paths


def test_freezing_wins_over_groups_and_frozen_parameters_hold_no_state():
  optim = _optim(optimizer="adam", lr=0.1, freeze=("^encoder/",), groups={"^encoder/": {"lr": 1.0}})
  updates, state = _updates(optim)
  for leaf in jax.tree.leaves(updates["encoder"]):
    assert float(jnp.abs(leaf).max()) == 0.0
  assert float(jnp.abs(updates["head"]["kernel"]).max()) > 0
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(state)]
  assert any("['head']" in p for p in paths)
  assert not any("['encoder']" in p for p in paths), paths


def test_group_mistakes_are_errors_that_say_what_is_wrong():
  with pytest.raises(KeyError, match=r"config.optim.groups.head.lrr .*did you mean 'lr'"):
    _updates(_optim(groups={"head": {"pattern": "^head/", "lrr": 0.1}}))
  with pytest.raises(KeyError, match=r"freeze cannot be set per group"):
    _updates(_optim(groups={"head": {"pattern": "^head/", "freeze": ("x",)}}))
  with pytest.raises(ValueError, match=r"matches several optim groups"):
    _updates(_optim(groups={"a": {"pattern": "kernel$"}, "b": {"pattern": "^head/"}}))
  with pytest.raises(ValueError, match=r"group:decoder .*matches no parameter"):
    _updates(_optim(groups={"decoder": {"pattern": "^decoder/", "lr": 0.1}}))
  with pytest.raises(ValueError, match=r"lr has no effect on optax.constant_schedule"):
    _updates(
      _optim(
        schedule="constant_schedule",
        schedule_kwargs={"value": 0.1},
        groups={"^head/": {"lr": 0.5}},
      )
    )


def test_optimizer_kwargs_and_groups_can_be_set_from_the_command_line():
  config = config_lib.load_config(
    TINY,
    [
      "--config.optim.optimizer=lion",
      "--config.optim.optimizer_kwargs={'b1': 0.95}",
      "--config.optim.groups={'head': {'pattern': '^head/.*', 'lr': 0.5}}",
    ],
  )
  assert config.optim.optimizer_kwargs.b1 == 0.95
  assert config.optim.groups.head.pattern == "^head/.*"
  optim_lib.make_optimizer(config.optim, config.total_steps)


def test_layer_decay_scales_each_block_by_decay_to_the_depth_minus_its_index():
  """MAE / VideoMAE fine-tuning: block i of L gets d^(L - i), the tubelet embedding d^(L + 1),
  the final norm, fc_norm and the head 1; and an SGD step moves each parameter by exactly its
  scale times the learning rate times its gradient."""
  from fdjax.models.video_mae import video_vit_classifier

  model = video_vit_classifier("tiny", depth=3, num_classes=5)
  video = jnp.zeros((1, 2, 32, 32, 3), jnp.uint8)
  params = nn.unbox(model.init(jax.random.key(0), video)["params"])
  optim = config_lib.base_config().optim
  optim.layer_decay = 0.75
  scales = optim_lib.layer_decay_scales(params, optim)
  expected = {
    "encoder/tubelet_embedding/kernel": 0.75**4,
    "encoder/transformer/layers_0/attention/q_proj/kernel": 0.75**3,
    "encoder/transformer/layers_1/fc1/bias": 0.75**2,
    "encoder/transformer/layers_2/layer_norm1/scale": 0.75,
    "encoder/norm/scale": 1.0,
    "fc_norm/bias": 1.0,
    "head/kernel": 1.0,
  }
  flat = {optim_lib.param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}
  for path, scale in expected.items():
    assert flat[path] == pytest.approx(scale), path
  assert set(flat.values()) == {0.75**k for k in range(5)}

  optim.optimizer, optim.lr, optim.schedule, optim.weight_decay = "sgd", 0.1, "constant", 0.0
  tx, _ = optim_lib.make_optimizer(optim, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for (path, update), scale in zip(
    jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(scales)
  ):
    np.testing.assert_allclose(update, -0.1 * scale, rtol=1e-6, err_msg=optim_lib.param_path(path))


def test_layer_decay_needs_a_block_pattern_that_matches_and_captures():
  params = {"encoder": {"transformer": {"layers_0": {"w": jnp.ones(2)}}}}
  optim = config_lib.base_config().optim
  optim.layer_decay = 0.5
  optim.layer_decay_blocks = r"nothing_(\d+)"
  with pytest.raises(ValueError, match="matches no parameter"):
    optim_lib.layer_decay_scales(params, optim)
  optim.layer_decay_blocks = r"layers_\d+"
  with pytest.raises(ValueError, match="capture the block index"):
    optim_lib.layer_decay_scales(params, optim)
