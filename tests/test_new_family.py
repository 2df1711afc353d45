"""A task family added as new files only (tests/newfamily/) trains, exports and loads with jax.

The family `newfamily.inbetween` (keyframes -> in-between frames) uses BatchNorm (its
`batch_stats` live in the train state), an EMA of the parameters, and a custom export dim `k`
(keyframes) fixed by `fdjax export --keyframes N`. Nothing in fdjax/ names it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from helpers import ROOT, TESTS, run_fdjax
from test_export import CASES_JAX_ONLY, run_jax_only

from fdjax import config as config_lib
from fdjax import trainer
from fdjax.tasks import load_task, missing_hooks, wrong_signatures

CONFIG = os.path.join(TESTS, "newfamily", "config.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("inbetween"))
  config = config_lib.load_config(CONFIG)
  result = trainer.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_nothing_in_fdjax_names_the_family():
  for directory, _, files in os.walk(os.path.join(ROOT, "fdjax")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(directory, name)) as f:
          assert "inbetween" not in f.read(), os.path.join(directory, name)


def test_the_family_conforms_to_the_task_contract():
  task = load_task("newfamily.inbetween")
  assert missing_hooks(task.module) == [] and wrong_signatures(task.module) == []
  assert task.has("export_dims") and task.has("evaluate") and not task.has("flops_per_example")


def test_it_trains_with_batch_statistics_and_an_ema_that_evaluation_uses(run):
  config, workdir, result = run
  state = jax.device_get(result.state)
  assert set(state.collections) == {"batch_stats"}
  running_mean = state.collections["batch_stats"]["norm"]["mean"]
  assert np.abs(running_mean).max() > 1e-3  # updated by the steps, not left at its init (0)
  differences = jax.tree.map(lambda e, p: np.abs(e - p).max(), state.ema, state.params)
  assert max(jax.tree.leaves(differences)) > 1e-4
  # It learns the eased in-betweens beyond the linear interpolation it starts from.
  assert result.eval_metrics["loss"] < 0.5 * result.eval_metrics["interpolation_loss"]
  task = load_task(config.task)
  model = task.build_model(config)
  with_ema = task.evaluate(
    config,
    model,
    state.ema,
    mesh=None,
    rules=None,
    workdir=workdir,
    step=0,
    collections=state.collections,
  )
  with_raw = task.evaluate(
    config,
    model,
    state.params,
    mesh=None,
    rules=None,
    workdir=workdir,
    step=0,
    collections=state.collections,
  )
  assert with_ema["loss"] == pytest.approx(result.eval_metrics["loss"], rel=1e-6)
  assert with_ema["loss"] != with_raw["loss"]


def test_it_exports_with_its_own_dim_and_loads_with_jax_alone(run, tmp_path):
  config, workdir, result = run
  symbolic, fixed = str(tmp_path / "symbolic"), str(tmp_path / "fixed")
  printed = {}
  for out, extra in ((symbolic, ()), (fixed, ("--keyframes", "7", "--batch", "2"))):
    proc = run_fdjax("export", "--workdir", workdir, "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr
    printed[out] = proc.stdout
  assert "keyframes(b, k, 4) float32" in printed[symbolic]
  assert "keyframes(2, 7, 4) float32" in printed[fixed]

  bad = run_fdjax(
    "export", "--workdir", workdir, "--out", str(tmp_path / "bad"), "--keyframes", "-3"
  )
  assert bad.returncode != 0 and "--keyframes" in bad.stderr

  state = jax.device_get(result.state)
  task = load_task(config.task)
  predict, _ = task.predict_fn(config, task.build_model(config))
  variables = {"params": state.ema, **state.collections}
  rng = np.random.default_rng(0)
  cases = {}
  for name, (batch, keyframes) in {"a": (3, 5), "b": (1, 9)}.items():
    inputs = {"keyframes": rng.normal(size=(batch, keyframes, 4)).astype(np.float32)}
    np.savez(tmp_path / f"{name}_in.npz", **inputs)
    cases[str(tmp_path / name)] = inputs
  proc = run_jax_only(tmp_path, CASES_JAX_ONLY, [symbolic, *cases])
  assert proc.returncode == 0, proc.stderr
  for case, inputs in cases.items():
    expected = np.asarray(jax.jit(predict)(variables, **inputs))
    assert expected.shape == (
      inputs["keyframes"].shape[0],
      (inputs["keyframes"].shape[1] - 1) * 4 + 1,
      4,
    )
    for how in ("loader", "snippet"):
      np.testing.assert_allclose(
        np.load(f"{case}_{how}.npz")["output"], expected, atol=1e-5, rtol=0
      )

  inputs = {"keyframes": rng.normal(size=(2, 7, 4)).astype(np.float32)}
  np.savez(tmp_path / "c_in.npz", **inputs)
  proc = run_jax_only(tmp_path, CASES_JAX_ONLY, [fixed, str(tmp_path / "c")])
  assert proc.returncode == 0, proc.stderr
  expected = np.asarray(jax.jit(predict)(variables, **inputs))
  np.testing.assert_allclose(np.load(tmp_path / "c_loader.npz")["output"], expected, atol=1e-5)
  wrong = {"keyframes": rng.normal(size=(2, 5, 4)).astype(np.float32)}
  np.savez(tmp_path / "d_in.npz", **wrong)
  proc = run_jax_only(tmp_path, CASES_JAX_ONLY, [fixed, str(tmp_path / "d")])
  assert proc.returncode != 0 and "keyframes" in proc.stderr


def test_the_cli_trains_the_family_from_its_config_file(tmp_path):
  proc = run_fdjax(
    "train", "--config", CONFIG + ":steps=4", "--workdir", str(tmp_path), timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  assert "eval at step 4" in proc.stdout
  assert os.path.isdir(tmp_path / "checkpoints")
