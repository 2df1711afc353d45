"""The training loop end to end: resume after SIGKILL, resharding, SIGTERM, non-finite stop;
EMA, BatchNorm statistics and the adversarial two-network pattern."""

import os
import signal
import time

import flax.linen as nn
import gantask
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinytask
from helpers import TESTS, TINY, read_metrics, run_fdjax, start_fdjax

from fdjax import checkpoint as checkpoint_lib
from fdjax import cli, export, trainer
from fdjax import config as config_lib
from fdjax import sharding as sharding_lib
from fdjax.tasks import load_task


def _config(*overrides, spec=TINY):
  return config_lib.load_config(spec, list(overrides))


def _wait_for(predicate, timeout=120, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process exited early with {proc.returncode}")
    time.sleep(0.05)
  raise AssertionError("timed out")


def _committed_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _restore_params(workdir, like_state, step=None):
  config = _config()
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state
  )
  restored_step, state = checkpointer.restore(abstract, None, step=step)
  checkpointer.close()
  return restored_step, state


def _kill_then_resume(tmp_path, spec, overrides, reference_state):
  """Runs `fdjax train` in a subprocess, SIGKILLs it after its step-6 checkpoint, restarts it
  on the same workdir to the end, and returns the restored `(step, state)`."""
  workdir = str(tmp_path / "killed")
  log = str(tmp_path / "killed.log")
  proc = start_fdjax("train", "--config", spec, "--workdir", workdir, *overrides, log_path=log)
  _wait_for(lambda: any(s >= 6 for s in _committed_steps(workdir)), proc=proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(_committed_steps(workdir)) < 24, "the run finished before it was killed"

  result = run_fdjax("train", "--config", spec, "--workdir", workdir, *overrides)
  assert result.returncode == 0, result.stderr
  assert "resumed from checkpoint at step" in result.stdout
  return _restore_params(workdir, reference_state)


def test_sigkill_then_restart_is_bit_identical_to_uninterrupted(tmp_path):
  args = ["steps=24", "--config.data.delay_s=0.004", "--config.checkpoint.every=6"]
  spec, overrides = TINY + ":" + args[0], args[1:]
  reference = trainer.train_and_evaluate(_config(*overrides, spec=spec), str(tmp_path / "ref"))

  step, resumed = _kill_then_resume(tmp_path, spec, overrides, reference.state)
  assert step == 24
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(reference.state.params),
    jax.device_get(resumed.params),
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(reference.state.opt_state),
    jax.device_get(resumed.opt_state),
  )


def test_checkpoint_from_8_device_mesh_resumes_on_2x4_mesh(tmp_path):
  common = [
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.log_every=1",
    "--config.eval_every=0",
  ]
  reference_dir = str(tmp_path / "reference")
  trainer.train_and_evaluate(_config(*common, spec=TINY + ":steps=12"), reference_dir)

  workdir = str(tmp_path / "resharded")
  trainer.train_and_evaluate(
    _config(*common, "--config.mesh.data=8", spec=TINY + ":steps=6"), workdir
  )
  result = trainer.train_and_evaluate(
    _config(*common, "--config.mesh.data=2", "--config.mesh.fsdp=4", spec=TINY + ":steps=12"),
    workdir,
  )
  kernel = result.state.params["encoder"]["dense"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  expected = {r["step"]: r["loss"] for r in read_metrics(reference_dir)}
  resumed = {r["step"]: r["loss"] for r in read_metrics(workdir) if r["step"] > 6}
  assert sorted(resumed) == list(range(7, 13))
  for step, loss in resumed.items():
    assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])


def test_sigterm_saves_exits_zero_and_restart_continues(tmp_path):
  spec = TINY + ":steps=400"
  overrides = ["--config.data.delay_s=0.004", "--config.checkpoint.every=0", "--config.log_every=1"]
  workdir = str(tmp_path / "run")
  log = str(tmp_path / "run.log")
  proc = start_fdjax("train", "--config", spec, "--workdir", workdir, *overrides, log_path=log)
  _wait_for(lambda: os.path.exists(log) and "step 3/400" in open(log).read(), proc=proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(log).read()
  output = open(log).read()
  assert "preempted: saved checkpoint at step" in output
  stopped = int(output.split("preempted: saved checkpoint at step ")[1].split()[0])
  assert 3 <= stopped < 400
  assert _committed_steps(workdir) == [stopped]

  result = run_fdjax(
    "train", "--config", TINY + ":steps=" + str(stopped + 3), "--workdir", workdir, *overrides
  )
  assert result.returncode == 0, result.stderr
  assert f"resumed from checkpoint at step {stopped}" in result.stdout
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == list(range(1, stopped + 4))


def test_consecutive_nan_batches_stop_the_run_naming_the_step(tmp_path):
  # Without shuffling, batch k holds examples 16k..16k+15: steps 3 onwards see NaNs.
  config = _config(
    "--config.data.shuffle=False",
    ("data.nan_indices", tuple(range(32, 256))),
    "--config.max_consecutive_nonfinite=3",
    "--config.log_every=1",
    spec=TINY + ":steps=40",
  )
  with pytest.raises(trainer.NonFiniteError, match="stopping at step 5: 3 non-finite") as e:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert "steps 3-5" in str(e.value)
  rows = read_metrics(str(tmp_path))
  assert [r["nonfinite"] for r in rows] == [0, 0, 1, 1, 1]
  assert rows[-1]["nonfinite_total"] == 3
  assert _committed_steps(str(tmp_path))[-1] == 5


# --- EMA, mutable collections, the adversarial pattern --------------------------------------

BN = os.path.join(TESTS, "configs", "bn.py")
GAN = os.path.join(TESTS, "configs", "gan.py")


def _tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_evaluation_with_ema_uses_the_ema_tree_which_is_the_hand_computed_average(
  tmp_path, monkeypatch
):
  config = _config(
    "--config.ema.decay=0.99",
    "--config.checkpoint.every=1",
    "--config.checkpoint.keep=0",
    "--config.eval_every=0",
    spec=TINY + ":steps=5",
  )
  seen = []
  evaluate = tinytask.evaluate

  def recording_evaluate(config, model, params, **kwargs):
    seen.append(jax.device_get(params))
    return evaluate(config, model, params, **kwargs)

  monkeypatch.setattr(tinytask, "evaluate", recording_evaluate)
  workdir = str(tmp_path)
  result = trainer.train_and_evaluate(config, workdir)
  assert result.step == 5 and len(seen) == 1

  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, fresh, _, _ = trainer.build_train_step(config, load_task("tinytask"), mesh, rules)
  ema = jax.device_get(fresh.params)
  for step in range(1, 6):
    _, _, raw, _ = trainer.restore_params(config, workdir, step, params="raw")
    ema = jax.tree.map(lambda e, p: 0.99 * e + 0.01 * p, ema, jax.device_get(raw))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), seen[0], ema)
  raw = jax.device_get(result.state.params)
  differences = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), seen[0], raw)
  assert min(jax.tree.leaves(differences)) > 1e-4, differences
  _, _, restored_ema, _ = trainer.restore_params(config, workdir)  # Default: the EMA.
  _tree_equal(restored_ema, seen[0])


def test_eval_and_export_choose_raw_or_ema_params_and_refuse_ema_without_one(tmp_path, capsys):
  ema_run, plain_run = str(tmp_path / "ema"), str(tmp_path / "plain")
  common = ["--config.eval_every=0", "--config.checkpoint.use_async=False"]
  ema = trainer.train_and_evaluate(
    _config(*common, "--config.ema.decay=0.9", spec=TINY + ":steps=6"), ema_run
  )
  trainer.train_and_evaluate(_config(*common, spec=TINY + ":steps=6"), plain_run)
  config = config_lib.load_json_config(os.path.join(ema_run, "config.json"))
  _, _, raw, _ = trainer.restore_params(config, ema_run, params="raw")
  _tree_equal(raw, ema.state.params)
  _, _, chosen, _ = trainer.restore_params(config, ema_run)
  _tree_equal(chosen, ema.state.ema)

  assert cli.main(["eval", "--workdir", ema_run, "--params", "raw"]) == 0
  assert cli.main(["eval", "--workdir", plain_run, "--params", "ema"]) == 2
  assert "this run keeps no EMA" in capsys.readouterr().err
  out = str(tmp_path / "artifact")
  assert export.main(["--workdir", plain_run, "--out", out, "--params", "ema"]) == 1
  assert "--params ema: this run keeps no EMA" in capsys.readouterr().err
  for choice, expected in (
    ("ema", ema.state.ema),
    ("raw", ema.state.params),
    (None, ema.state.ema),
  ):
    out = str(tmp_path / f"artifact-{choice}")
    flag = [] if choice is None else ["--params", choice]
    assert export.main(["--workdir", ema_run, "--out", out, "--external-weights", *flag]) == 0
    weights = export.load_weights(out)
    leaves = jax.tree.leaves(jax.device_get(expected))
    assert len(weights) == len(leaves)
    for saved, leaf in zip(weights, leaves, strict=True):
      np.testing.assert_array_equal(saved, leaf)


def test_sigkill_then_restart_of_an_ema_batchnorm_run_is_bit_identical(tmp_path):
  args = ["steps=24", "--config.data.delay_s=0.004", "--config.checkpoint.every=6"]
  spec, overrides = BN + ":" + args[0], args[1:]
  reference_dir = str(tmp_path / "ref")
  reference = trainer.train_and_evaluate(_config(*overrides, spec=spec), reference_dir)
  assert reference.state.ema is not None and "batch_stats" in reference.state.collections

  step, resumed = _kill_then_resume(tmp_path, spec, overrides, reference.state)
  assert step == 24
  _tree_equal(reference.state.params, resumed.params)
  _tree_equal(reference.state.ema, resumed.ema)
  _tree_equal(reference.state.collections, resumed.collections)
  _tree_equal(reference.state.opt_state, resumed.opt_state)
  _tree_equal(reference.state.rng, resumed.rng)
  # The same batches in the same order: the last logged losses agree exactly.
  workdir = str(tmp_path / "killed")  # where _kill_then_resume ran
  assert read_metrics(workdir)[-1]["loss"] == read_metrics(reference_dir)[-1]["loss"]


def test_ema_and_batch_stats_checkpoint_from_8_device_mesh_resumes_on_2x4_mesh(tmp_path):
  common = [
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.log_every=1",
    "--config.eval_every=0",
  ]
  reference_dir = str(tmp_path / "reference")
  reference = trainer.train_and_evaluate(_config(*common, spec=BN + ":steps=12"), reference_dir)

  workdir = str(tmp_path / "resharded")
  trainer.train_and_evaluate(
    _config(*common, "--config.mesh.data=8", spec=BN + ":steps=6"), workdir
  )
  result = trainer.train_and_evaluate(
    _config(*common, "--config.mesh.data=2", "--config.mesh.fsdp=4", spec=BN + ":steps=12"),
    workdir,
  )
  kernel = result.state.ema["encoder"]["dense"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  for leaf in jax.tree.leaves(result.state.collections):
    assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert leaf.sharding.spec == jax.sharding.PartitionSpec()
  expected = {r["step"]: r["loss"] for r in read_metrics(reference_dir)}
  resumed = {r["step"]: r["loss"] for r in read_metrics(workdir) if r["step"] > 6}
  assert sorted(resumed) == list(range(7, 13))
  for step, loss in resumed.items():
    assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5)
  jax.tree.map(close, jax.device_get(result.state.ema), jax.device_get(reference.state.ema))
  jax.tree.map(
    close, jax.device_get(result.state.collections), jax.device_get(reference.state.collections)
  )


def test_adversarial_task_trains_in_one_step_and_each_network_gets_only_its_own_gradient(
  tmp_path,
):
  config = _config(spec=GAN)
  model = gantask.build_model(config)
  batch = {"x": np.stack([e["x"] for e in gantask.make_examples(32, seed=0)])}
  params = model.init(jax.random.key(0), batch)["params"]
  rng = jax.random.key(1)

  combined = jax.grad(lambda p: gantask.loss_fn(model, p, batch, rng, True)[0])(params)

  # The two losses written plainly, with no gradient stopped anywhere.
  def plain_losses(p):
    z = jax.random.normal(rng, (32, gantask.LATENT))
    fake = model.apply({"params": p}, z, method=gantask.AdversarialPair.generate)
    score = lambda x: model.apply({"params": p}, x, method=gantask.AdversarialPair.discriminate)
    generator = jnp.mean(jax.nn.softplus(-score(fake)))
    discriminator = jnp.mean(jax.nn.softplus(-score(batch["x"]))) + jnp.mean(
      jax.nn.softplus(score(fake))
    )
    return generator, discriminator

  generator_only = jax.grad(lambda p: plain_losses(p)[0])(params)
  discriminator_only = jax.grad(lambda p: plain_losses(p)[1])(params)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, combined["generator"], generator_only["generator"])
  jax.tree.map(close, combined["discriminator"], discriminator_only["discriminator"])
  # Without the stop_gradients each network would also follow the other's loss.
  naive = jax.grad(lambda p: sum(plain_losses(p)))(params)
  gap = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), naive, combined)
  assert max(jax.tree.leaves(gap["generator"])) > 1e-4
  assert max(jax.tree.leaves(gap["discriminator"])) > 1e-4

  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result.step == config.total_steps
  rows = read_metrics(str(tmp_path))
  assert {"generator_loss", "discriminator_loss"} <= set(rows[-1])
  assert all(np.isfinite(r["loss"]) for r in rows)
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    jax.device_get(result.state.params),
    jax.device_get(_fresh_params(config)),
  )
  assert min(jax.tree.leaves(moved["generator"])) > 0
  assert min(jax.tree.leaves(moved["discriminator"])) > 0


def _fresh_params(config):
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, state, _, _ = trainer.build_train_step(config, load_task("gantask"), mesh, rules)
  return state.params


def test_compilation_cache_dir_turns_the_persistent_cache_on_and_empty_turns_it_off(tmp_path):
  """A run with a cache directory fills it; a later run in the same process with "" writes
  nothing there (JAX remembers its first answer until the cache is reset)."""
  from ml_collections import ConfigDict

  names = (
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  saved = {name: getattr(jax.config, name) for name in names}
  config = ConfigDict({"compilation_cache_dir": str(tmp_path / "xla")})
  config.precision = ConfigDict({"matmul_precision": "default"})
  try:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    trainer.setup_jax(config)
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(5)).block_until_ready()
    written = sorted(os.listdir(tmp_path / "xla"))
    assert written, "the cache directory stayed empty"
    config.compilation_cache_dir = ""
    trainer.setup_jax(config)
    jax.jit(lambda x: x * 5.0 - 2.0)(jnp.ones(7)).block_until_ready()
    assert sorted(os.listdir(tmp_path / "xla")) == written
    assert not jax.config.jax_enable_compilation_cache
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
