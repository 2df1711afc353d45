"""IREE as a foreign runtime: a concrete-shape `model.mlir` compiled for `llvm-cpu` equals JAX.

Each case is a config (with overrides that make its run short): the test trains it for two
steps, exports it with concrete sizes (`--batch`, `--time`), compiles `model.mlir` with
`iree-base-compiler` and runs it with `iree-base-runtime`, and compares every output with the
task's predict function jitted in-process (1e-4). Artifacts with symbolic dims are not
compiled: IREE 3.13 cannot lower the `stablehlo.dynamic_broadcast_in_dim` that jax emits for a
softmax or a norm over a symbolic dim, so the IREE path is the concrete export.

Add a case per task family (audio2mesh, the video classifier) to CASES. Exports keep unused
arguments (`keep_unused=True`), so `main` takes every weight and input that `mlir_arguments` in
signature.json lists, in that order.
"""

import json
import os

import iree.compiler
import iree.runtime
import jax
import numpy as np
import pytest
from helpers import TINY

from fdjax import config as config_lib
from fdjax import export, trainer

# Two steps without warmup at a large learning rate move the zero-initialised output layer, so
# the audio2mesh comparison is not between two templates.
AUDIO2MESH = "experiments/audio2mesh/vocaset.py:encoder=tiny,runlocal=True"
A2M_OVERRIDES = [
  "--config.total_steps=2",
  "--config.optim.warmup_steps=0",
  "--config.optim.lr=0.01",
]

# (config, overrides, --batch, --time)
CASES = [
  pytest.param(TINY, ["--config.total_steps=2"], "2", "t", id="tiny"),
  # wav2vec2 (tiny) + FaceFormer: 2 s of audio, 60 frames decoded in a while loop.
  pytest.param(AUDIO2MESH, A2M_OVERRIDES, "1", "60", id="audio2mesh"),
  # The video expression classifier: tiny CLIP with a temporal adapter, 4 frames.
  pytest.param(
    "experiments/dfer/dfew.py:variant=clip_adapter,size=tiny,runlocal=True,frames=4",
    ["--config.total_steps=2"],
    "2",
    "t",
    id="dfer",
  ),
]


def random_inputs(specs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
  """Inputs of a concrete signature: normal floats, uint8 pixels, zero indices, true masks."""
  rng = np.random.default_rng(seed)
  inputs = {}
  for spec in specs:
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if dtype.kind == "f":
      inputs[spec["name"]] = rng.normal(size=shape).astype(dtype)
    elif dtype.kind == "u":
      inputs[spec["name"]] = rng.integers(0, 256, size=shape).astype(dtype)
    elif dtype.kind == "b":
      inputs[spec["name"]] = np.ones(shape, dtype)
    else:
      inputs[spec["name"]] = np.zeros(shape, dtype)
  return inputs


def compile_and_run(directory: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
  """Compiles the artifact's model.mlir with IREE (llvm-cpu) and calls it; outputs in order."""
  signature = export.read_signature(directory)
  predict = signature["functions"]["predict"]
  with open(os.path.join(directory, predict["mlir"])) as f:
    vmfb = iree.compiler.compile_str(
      f.read(),
      target_backends=["llvm-cpu"],
      input_type="stablehlo",
      extra_args=["--iree-llvmcpu-target-cpu=host"],
    )
  module = iree.runtime.load_vm_flatbuffer(vmfb, driver="local-task")
  named = dict(inputs)
  if predict["weights_argument"]:
    weights = export.load_weights(directory)
    named.update(zip((f"weights/{n}" for n in signature["weights"]["names"]), weights))
  # `main` takes its arguments in the order signature.json's mlir_arguments gives.
  results = module.main(*(named[name] for name in predict["mlir_arguments"]))
  results = results if isinstance(results, tuple | list) else [results]
  return [np.asarray(r.to_host()) for r in results]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """config spec and overrides -> (config, workdir) of a two-step run (trained once)."""
  runs = {}

  def get(spec, overrides):
    key = (spec, tuple(overrides))
    if key not in runs:
      config = config_lib.load_config(spec, overrides)
      workdir = str(tmp_path_factory.mktemp("run"))
      trainer.train_and_evaluate(config, workdir)
      runs[key] = config, workdir
    return runs[key]

  return get


def sizes(batch: str, time: str) -> dict[str, str]:
  """`--batch` and `--time` as export dim sizes; `t` only for the tasks that declare it."""
  return {"b": batch} if time == "t" else {"b": batch, "t": time}


@pytest.mark.parametrize("external_weights", [False, True], ids=["embedded", "external"])
@pytest.mark.parametrize("spec, overrides, batch, time", CASES)
def test_iree_runs_the_concrete_artifact_like_jax(
  trained, tmp_path, spec, overrides, batch, time, external_weights
):
  config, workdir = trained(spec, overrides)
  out = str(tmp_path / "artifact")
  export.export_checkpoint(
    config, workdir, out, sizes=sizes(batch, time), external_weights=external_weights
  )
  with open(os.path.join(out, "signature.json")) as f:
    signature = json.load(f)
  predict_signature = signature["functions"]["predict"]
  for spec_ in predict_signature["inputs"]:
    assert all(isinstance(d, int) for d in spec_["shape"]), spec_
  inputs = random_inputs(predict_signature["inputs"])
  if config.task == "audio2mesh":
    inputs["template"] *= 0.1  # a face-sized template, in metres

  task, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  expected = jax.tree.leaves(jax.jit(predict)(jax.device_get(params), **inputs))

  if config.task == "audio2mesh":  # the trained motion is large next to the tolerance
    assert np.abs(np.asarray(expected[0]) - inputs["template"][:, None]).max() > 1e-2

  outputs = compile_and_run(out, inputs)
  assert len(outputs) == len(expected) == len(predict_signature["outputs"])
  for output, reference, spec_ in zip(outputs, expected, predict_signature["outputs"]):
    assert output.shape == tuple(spec_["shape"]), spec_["name"]
    np.testing.assert_allclose(output, np.asarray(reference), atol=1e-4, rtol=0)
