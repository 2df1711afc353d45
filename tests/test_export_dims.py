"""`fdjax export` takes its dim flags from the task (`export_dims`): a test task's `--keyframes`
fixes `k` and derives `g`, or leaves both symbolic; bad values name the flag."""

import jax
import numpy as np
import pytest
from helpers import TINY

from fdjax import config as config_lib
from fdjax import export, trainer
from fdjax.tasks import BATCH_DIM, ExportDim


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The key-frame test task (tests/keyframetask.py) trained for two steps."""
  workdir = str(tmp_path_factory.mktemp("keyframes"))
  config = config_lib.load_config(f"{TINY}:steps=2", [("task", "keyframetask")])
  trainer.train_and_evaluate(config, workdir)
  task, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  return workdir, jax.jit(predict), jax.device_get(params)


def _inputs(batch, keyframes, gains):
  rng = np.random.default_rng(0)
  return {
    "x": rng.normal(size=(batch, keyframes, 8)).astype(np.float32),
    "gains": rng.uniform(0.5, 1.5, (batch, gains)).astype(np.float32),
  }


def _shapes(directory):
  inputs = export.read_signature(directory)["functions"]["predict"]["inputs"]
  return {spec["name"]: spec["shape"] for spec in inputs}


def test_the_task_flag_fixes_its_dim_and_the_derived_one(run, tmp_path):
  workdir, predict, params = run
  out = str(tmp_path / "fixed")
  assert export.main(["--workdir", workdir, "--out", out, "--keyframes", "3", "--batch", "2"]) == 0
  assert _shapes(out) == {"x": [2, 3, 8], "gains": [2, 6]}
  assert export.read_signature(out)["symbolic_constraints"] == []  # g >= k holds: 6 >= 3
  inputs = _inputs(2, 3, 6)
  np.testing.assert_allclose(
    np.asarray(export.load(out)(**inputs)), np.asarray(predict(params, **inputs)), atol=1e-5
  )
  same = str(tmp_path / "by_dim")
  assert export.main(["--workdir", workdir, "--out", same, "--dim", "k=3", "--dim", "b=2"]) == 0
  assert _shapes(same) == _shapes(out)


def test_without_the_flag_the_dims_stay_symbolic(run, tmp_path):
  workdir, predict, params = run
  out = str(tmp_path / "symbolic")
  assert export.main(["--workdir", workdir, "--out", out]) == 0
  assert _shapes(out) == {"x": ["b", "k", 8], "gains": ["b", "g"]}
  model = export.load(out)
  for batch, keyframes, gains in ((1, 2, 4), (3, 5, 7)):
    inputs = _inputs(batch, keyframes, gains)
    np.testing.assert_allclose(
      np.asarray(model(**inputs)), np.asarray(predict(params, **inputs)), atol=1e-5
    )
  with pytest.raises(export.SignatureError, match="g >= k"):
    model(**_inputs(1, 5, 2))


def test_a_bad_value_names_the_flag(run, tmp_path, capsys):
  workdir, _, _ = run
  out = str(tmp_path / "bad")
  assert export.main(["--workdir", workdir, "--out", out, "--keyframes", "0"]) == 1
  assert "--keyframes 0: must be >= 1" in capsys.readouterr().err
  assert export.main(["--workdir", workdir, "--out", out, "--keyframes", "3x"]) == 1
  assert "--keyframes '3x': expected a positive integer or a dim name" in capsys.readouterr().err
  assert export.main(["--workdir", workdir, "--out", out, "--dim", "z=3"]) == 1
  assert "declares no export dim 'z' (its dims: b, k, g)" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a flag of another task's dim
    export.main(["--workdir", workdir, "--out", out, "--time", "90"])
  assert "unrecognised arguments: --time 90" in capsys.readouterr().err


def test_help_lists_the_task_flags(run, capsys):
  workdir, _, _ = run
  with pytest.raises(SystemExit):
    export.main(["--workdir", workdir, "--help"])
  assert "--keyframes KEYFRAMES" in capsys.readouterr().out


def test_derived_dims_chain_and_a_failing_derivation_names_its_source():
  specs = {"x": ("b, k, f, h", "float32")}
  declared = [
    BATCH_DIM,
    ExportDim("k", "--keyframes"),
    ExportDim("f", derive=lambda s: 4 * s["k"], needs=("k",)),
    ExportDim("h", derive=lambda s: s["f"] // 8, needs=("f",)),
  ]
  assert export.concrete_dims(declared, {"k": "6"}, specs) == {"k": 6, "f": 24, "h": 3}
  assert export.concrete_dims(declared, {"k": "6", "f": "f"}, specs) == {"k": 6}
  with pytest.raises(ValueError, match="^f = 4: gives h = 0"):
    export.concrete_dims(declared, {"k": "1"}, specs)
  with pytest.raises(ValueError, match="^--dim f=4: gives h = 0"):
    export.concrete_dims(declared, {"f": "4"}, specs)
  with pytest.raises(ValueError, match="^--dim f=0: must be >= 1"):
    export.concrete_dims(declared, {"f": "0"}, specs)
