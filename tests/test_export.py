"""Export of the tiny task: artifact files, jax-only loading, input and hash checks, bfloat16."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import TINY, run_fdjax

from fdjax import config as config_lib
from fdjax import export, trainer

SPEC = TINY + ":steps=2"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run trained for two steps, and its in-process predict function."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = config_lib.load_config(SPEC)
  trainer.train_and_evaluate(config, workdir)
  task, model, params, step = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  params = jax.device_get(params)
  return {
    "workdir": workdir,
    "config": config,
    "params": params,
    "step": step,
    "predict": lambda x: np.asarray(jax.jit(predict)(params, x)),
  }


@pytest.fixture(scope="module")
def symbolic(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("symbolic"))
  assert export.main(["--config", SPEC, "--workdir", run["workdir"], "--out", out]) == 0
  return out


def _x(batch, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 8)).astype(np.float32)


def test_export_writes_files_and_signature(run, symbolic):
  names = sorted(os.listdir(symbolic))
  assert names == ["model.jaxexport", "model.mlir", "signature.json"]
  with open(os.path.join(symbolic, "signature.json")) as f:
    signature = json.load(f)
  predict = signature["functions"]["predict"]
  assert predict["inputs"] == [{"name": "x", "shape": ["b", 8], "dtype": "float32"}]
  assert predict["outputs"] == [{"name": "output", "shape": ["b", 4], "dtype": "float32"}]
  assert predict["mlir_arguments"] == ["x"]
  assert signature["task"] == "tinytask" and signature["step"] == run["step"] == 2
  assert signature["platforms"] == ["cpu"]
  assert signature["jax_version"] == jax.__version__ and signature["fdjax_version"] == "0.1.0"
  assert signature["config_sha256"] == config_lib.config_hash(run["config"])
  weights, _ = export._flat_weights(run["params"])
  assert signature["weights"]["sha256"] == export.weights_sha256(weights)
  assert signature["weights"]["embedded"] and signature["weights"]["num_parameters"] == 212
  for name in ("model.jaxexport", "model.mlir"):
    path = os.path.join(symbolic, name)
    assert signature["files"][name]["sha256"] == export.file_sha256(path)
    assert signature["files"][name]["bytes"] == os.path.getsize(path)
  with open(os.path.join(symbolic, "model.mlir")) as f:
    assert "func.func public @main(%arg0: tensor<?x8xf32>" in f.read()


def test_symbolic_artifact_matches_predict_for_two_batch_sizes(run, symbolic):
  model = export.load(symbolic)
  for batch in (1, 5):
    x = _x(batch, seed=batch)
    np.testing.assert_allclose(np.asarray(model(x=x)), run["predict"](x), atol=1e-5, rtol=0)


# Importing these fails in the jax-only process.
BLOCKER = """
import importlib.abc
import sys

BLOCKED = ("fdjax", "flax", "ml_collections", "optax", "orbax", "grain")


class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in BLOCKED:
      raise ImportError(f"{name} is not installed in this test")
    return None


sys.meta_path.insert(0, Blocker())
"""

# How every jax-only script starts: jax and numpy, and proof that fdjax and flax are absent.
JAX_ONLY_PROLOGUE = """
import json
import sys

import jax
import numpy as np

for name in ("fdjax", "flax"):
  try:
    __import__(name)
    raise SystemExit(f"{name} should not be importable here")
  except ImportError:
    pass
"""
# And ends: nothing of fdjax, flax or ml_collections got imported along the way.
JAX_ONLY_EPILOGUE = """
blocked = [m for m in sys.modules if m.partition(".")[0] in ("fdjax", "flax", "ml_collections")]
assert not blocked, blocked
"""

# The snippet for README: an artifact with jax alone.
JAX_ONLY = (
  JAX_ONLY_PROLOGUE
  + """
symbolic, external, result = sys.argv[1:4]
outputs = {}

# Embedded weights: deserialize and call with the inputs by name.
with open(f"{symbolic}/model.jaxexport", "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
for batch in (2, 7):
  x = np.load(f"{result}_x{batch}.npy")
  outputs[f"snippet_{batch}"] = np.asarray(exported.call(x=x))

# External weights: feed them first, in the order signature.json lists them.
with open(f"{external}/signature.json") as f:
  signature = json.load(f)
with open(f"{external}/model.jaxexport", "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
npz = np.load(f"{external}/weights.npz")
weights = [npz[name] for name in signature["weights"]["names"]]
outputs["snippet_external"] = np.asarray(exported.call(weights, x=np.load(f"{result}_x2.npy")))

# The copied loader: the same, with hash and input checks.
import artifact_loader

model = artifact_loader.load(symbolic)
for batch in (2, 7):
  outputs[f"loader_{batch}"] = np.asarray(model(x=np.load(f"{result}_x{batch}.npy")))
outputs["loader_external"] = np.asarray(
  artifact_loader.load(external)(x=np.load(f"{result}_x2.npy"))
)
try:
  model(x=np.zeros((2, 3), np.float32))
  raise SystemExit("a wrong shape was accepted")
except artifact_loader.SignatureError as e:
  print("rejected:", e)
np.savez(f"{result}.npz", **outputs)
"""
  + JAX_ONLY_EPILOGUE
)


def test_jax_only_process_loads_one_symbolic_artifact_for_two_batch_sizes(run, symbolic, tmp_path):
  external = str(tmp_path / "external")
  args = ["--config", SPEC, "--workdir", run["workdir"], "--out", external, "--batch", "2"]
  assert export.main([*args, "--external-weights"]) == 0
  result = str(tmp_path / "result")
  inputs = {batch: _x(batch, seed=batch) for batch in (2, 7)}
  for batch, x in inputs.items():
    np.save(f"{result}_x{batch}.npy", x)
  proc = run_jax_only(tmp_path, JAX_ONLY, [symbolic, external, result])
  assert proc.returncode == 0, proc.stderr
  assert "rejected: input 'x': dim 1 is 3, expected 8" in proc.stdout
  outputs = np.load(f"{result}.npz")
  for batch, x in inputs.items():
    expected = run["predict"](x)
    assert outputs[f"snippet_{batch}"].shape == (batch, 4)
    np.testing.assert_allclose(outputs[f"snippet_{batch}"], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs[f"loader_{batch}"], expected, atol=1e-5, rtol=0)
  expected = run["predict"](inputs[2])
  np.testing.assert_allclose(outputs["snippet_external"], expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(outputs["loader_external"], expected, atol=1e-5, rtol=0)


def test_tampered_or_truncated_artifact_is_rejected_naming_the_file(symbolic, tmp_path):
  for damage in ("tamper", "truncate"):
    copy = tmp_path / damage
    shutil.copytree(symbolic, copy)
    path = copy / "model.jaxexport"
    data = bytearray(path.read_bytes())
    if damage == "tamper":
      data[len(data) // 2] ^= 0xFF
    else:
      data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    expected = "SHA-256 does not match" if damage == "tamper" else "truncated"
    with pytest.raises(export.ArtifactError, match=f"model.jaxexport: {expected}"):
      export.load(str(copy))
  (tmp_path / "tamper" / "signature.json").write_text("{not json")
  with pytest.raises(export.ArtifactError, match="signature.json: not valid JSON"):
    export.load(str(tmp_path / "tamper"))


def test_wrong_inputs_give_errors_naming_the_input(symbolic):
  model = export.load(symbolic)
  x = _x(3)
  cases = {
    "dim 1 is 7, expected 8": {"x": x[:, :7]},
    "dtype float64, expected float32": {"x": x.astype(np.float64)},
    r"rank 1 \(shape \(8,\)\), expected rank 2 \(b, 8\)": {"x": x[0]},
    "missing input 'x'": {},
    "unexpected input 'audio'": {"x": x, "audio": x},
  }
  for message, inputs in cases.items():
    with pytest.raises(export.SignatureError, match=message):
      model(**inputs)


def test_symbolic_dims_are_shared_across_inputs(tmp_path):
  def predict(params, audio, template):
    return {"mean": audio.mean(axis=1) * params["gain"], "template": template + params["gain"]}

  specs = {"audio": ("b, s", "float32"), "template": ("b, 5, 3", "float32")}
  exported, weights = export.export_function(
    predict, specs, {"gain": np.float32(2.0)}, constraints=["s >= 4"]
  )
  export.write_artifact(str(tmp_path), {"predict": exported}, weights, constraints=["s >= 4"])
  model = export.load(str(tmp_path))
  assert [o["name"] for o in model.outputs] == ["mean", "template"]
  audio, template = np.ones((2, 6), np.float32), np.zeros((2, 5, 3), np.float32)
  out = model(audio=audio, template=template)
  np.testing.assert_allclose(out["mean"], [2.0, 2.0])
  with pytest.raises(export.SignatureError, match=r"'template': dim 0 \(b\) is 3, but b = 2"):
    model(audio=audio, template=np.zeros((3, 5, 3), np.float32))
  with pytest.raises(export.SignatureError, match="violate the constraint s >= 4"):
    model(audio=audio[:, :2], template=template)


def test_concrete_external_weights_export_matches_and_checks_the_weights(run, tmp_path):
  out = str(tmp_path / "concrete")
  args = ["--config", SPEC, "--workdir", run["workdir"], "--out", out, "--batch", "3"]
  assert export.main([*args, "--external-weights"]) == 0
  model = export.load(out)
  assert model.inputs == [{"name": "x", "shape": [3, 8], "dtype": "float32"}]
  assert model.signature["functions"]["predict"]["mlir_arguments"] == [
    "weights/encoder/dense/bias",
    "weights/encoder/dense/kernel",
    "weights/head/bias",
    "weights/head/kernel",
    "x",
  ]
  x = _x(3)
  np.testing.assert_allclose(np.asarray(model(x=x)), run["predict"](x), atol=1e-5, rtol=0)
  with pytest.raises(export.SignatureError, match=r"dim 0 is 2, expected 3"):
    model(x=x[:2])
  with open(os.path.join(out, "weights.npz"), "ab") as f:
    f.write(b"\0")
  with pytest.raises(export.ArtifactError, match="weights.npz: longer than exported"):
    export.load(out)


def test_bfloat16_export_keeps_a_float32_interface(run, tmp_path):
  out = str(tmp_path / "bf16")
  args = ["--config", SPEC, "--workdir", run["workdir"], "--out", out, "--dtype", "bfloat16"]
  assert export.main([*args, "--external-weights"]) == 0
  model = export.load(out)
  assert model.signature["weights"]["dtypes"] == ["bfloat16"] * 4
  assert model.outputs[0]["dtype"] == "float32"
  task, m, _, _ = trainer.restore_params(run["config"], run["workdir"])
  predict, _ = task.predict_fn(run["config"], m)
  params_bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), run["params"])
  x = _x(4)
  expected = jax.jit(lambda p, x: predict(p, x.astype(jnp.bfloat16)).astype(jnp.float32))(
    params_bf16, x
  )
  np.testing.assert_allclose(np.asarray(model(x=x)), np.asarray(expected), atol=1e-5, rtol=0)
  # bfloat16 rounding, not a wrong function: close to the float32 model.
  np.testing.assert_allclose(np.asarray(model(x=x)), run["predict"](x), atol=0.1, rtol=0)


def test_time_fixes_frames_and_samples_from_the_task_metadata():
  from fdjax.tasks import audio2mesh

  specs = {"audio": ("b, s", "float32"), "template": ("b, 5023, 3", "float32")}
  rates = audio2mesh.export_dims(
    ml_collections.ConfigDict({"data": {"sample_rate": 16000, "fps": 30}})
  )
  no_rates = audio2mesh.export_dims(ml_collections.ConfigDict({"data": {}}))
  dims = export.concrete_dims(rates, {"b": "4", "t": "90"}, specs)
  assert dims == {"b": 4, "t": 90, "s": 48000}
  structs = export.abstract_inputs(specs, dims)
  assert structs["audio"].shape == (4, 48000) and structs["template"].shape == (4, 5023, 3)
  assert export.concrete_dims(no_rates, {"b": "n", "t": "t"}, specs) == {"b": "n"}
  with pytest.raises(ValueError, match="no sample_rate and fps"):
    export.concrete_dims(no_rates, {"b": "b", "t": "90"}, specs)
  with pytest.raises(ValueError, match="--batch '4x': expected a positive integer"):
    export.concrete_dims(no_rates, {"b": "4x", "t": "t"}, specs)


def test_second_function_and_platforms_in_one_artifact(tmp_path):
  def predict(params, x):
    return x * params["w"]

  def stream_step(params, state, chunk):
    state = state + chunk.sum(axis=1, keepdims=True)
    return {"state": state, "output": chunk * params["w"] + state}

  params = {"w": np.float32(3.0)}
  platforms = ("cpu", "cuda")
  exported, weights = export.export_function(
    predict, {"x": ("b, 4", "float32")}, params, platforms=platforms
  )
  step, _ = export.export_function(
    stream_step,
    {"state": ("b, 1", "float32"), "chunk": ("b, 4", "float32")},
    params,
    platforms=platforms,
  )
  export.write_artifact(str(tmp_path), {"predict": exported, "stream_step": step}, weights)
  assert {"stream_step.jaxexport", "stream_step.mlir"} <= set(os.listdir(tmp_path))
  streaming = export.load(str(tmp_path), "stream_step")
  assert streaming.signature["functions"]["stream_step"]["mlir_arguments"] == [
    "_platform_index",
    "chunk",
    "state",
  ]
  state = np.zeros((2, 1), np.float32)
  for _ in range(3):
    out = streaming(state=state, chunk=np.ones((2, 4), np.float32))
    state = np.asarray(out["state"])
  np.testing.assert_allclose(state, 12.0)
  with pytest.raises(export.ArtifactError, match="no function 'decode'"):
    export.load(str(tmp_path), "decode")
  cuda_only, _ = export.export_function(
    predict, {"x": ("b, 4", "float32")}, params, platforms=("cuda",)
  )
  export.write_artifact(str(tmp_path / "cuda"), {"predict": cuda_only}, weights)
  with pytest.raises(export.ArtifactError, match="exported for cuda, but this process runs on cpu"):
    export.load(str(tmp_path / "cuda"))


def test_fdjax_export_command_reads_the_run_config(run, tmp_path):
  out = str(tmp_path / "cli")
  result = run_fdjax("export", "--workdir", run["workdir"], "--out", out, "--batch", "2")
  assert result.returncode == 0, result.stderr
  assert "x(2, 8) float32 -> output(2, 4) float32" in result.stdout
  x = _x(2)
  np.testing.assert_allclose(np.asarray(export.load(out)(x=x)), run["predict"](x), atol=1e-5)
  result = run_fdjax("export", "--workdir", str(tmp_path / "none"), "--out", out)
  assert result.returncode == 1 and "config.json: no such file" in result.stderr


A2M_SPEC = "experiments/audio2mesh/vocaset.py:encoder=tiny,runlocal=True,steps=2"
# No warmup and a large step: two steps then move the zero-initialised output layer visibly.
A2M_OVERRIDES = ["--config.optim.warmup_steps=0", "--config.optim.lr=0.01"]

# Loads one artifact with jax alone (the blocker is on) and calls it once per saved input set:
# inputs from `<case>_in.npz`, outputs (named; a lone array as "output") to `<case>_loader.npz`
# (the copied loader) and `<case>_snippet.npz` (the README snippet).
CASES_JAX_ONLY = (
  JAX_ONLY_PROLOGUE
  + """
import artifact_loader

directory, cases = sys.argv[1], sys.argv[2:]
model = artifact_loader.load(directory)
with open(f"{directory}/model.jaxexport", "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
for case in cases:
  inputs = dict(np.load(f"{case}_in.npz"))
  for how, outputs in (("loader", model(**inputs)), ("snippet", exported.call(**inputs))):
    if not isinstance(outputs, dict):
      outputs = {"output": outputs}
    np.savez(f"{case}_{how}.npz", **{k: np.asarray(v) for k, v in outputs.items()})
"""
  + JAX_ONLY_EPILOGUE
)


def run_jax_only(tmp_path, script: str, args: list[str]) -> subprocess.CompletedProcess:
  """Runs `script` with `args` in a process where fdjax and flax cannot be imported, next to a
  copy of fdjax/export.py importable as `artifact_loader`."""
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(BLOCKER)
  (site / "jax_only.py").write_text(script)
  shutil.copy(export.__file__, site / "artifact_loader.py")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
    [sys.executable, str(site / "jax_only.py"), *args],
    env=env,
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=240,
  )


@pytest.fixture(scope="module")
def audio2mesh_run(tmp_path_factory):
  """The audio2mesh runlocal config (tiny wav2vec2 + FaceFormer) trained for two steps."""
  workdir = str(tmp_path_factory.mktemp("audio2mesh"))
  config = config_lib.load_config(A2M_SPEC, A2M_OVERRIDES)
  trainer.train_and_evaluate(config, workdir)
  task, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  return workdir, jax.jit(predict), jax.device_get(params)


def test_audio2mesh_artifact_in_a_jax_only_process_equals_predict(audio2mesh_run, tmp_path):
  workdir, predict, params = audio2mesh_run
  out = str(tmp_path / "artifact")
  assert export.main(["--workdir", workdir, "--out", out]) == 0  # config from the workdir
  signature = export.read_signature(out)
  shapes = {s["name"]: s["shape"] for s in signature["functions"]["predict"]["inputs"]}
  assert shapes == {"audio": ["b", "s"], "template": ["b", 5023, 3], "style": ["b"]}
  assert signature["metadata"]["sample_rate"] == 16000 and "streaming" not in signature["metadata"]
  rng = np.random.default_rng(0)
  cases = {}
  # Two batch sizes and two lengths (1.0 s = 30 frames, 0.7 s = 21 frames) from one artifact.
  for batch, samples in ((1, 16000), (3, 11200)):
    case = str(tmp_path / f"case{batch}")
    cases[case] = {
      "audio": rng.standard_normal((batch, samples)).astype(np.float32),
      "template": rng.normal(0, 0.1, (batch, 5023, 3)).astype(np.float32),
      "style": np.arange(batch, dtype=np.int32),
    }
    np.savez(f"{case}_in.npz", **cases[case])
  proc = run_jax_only(tmp_path, CASES_JAX_ONLY, [out, *cases])
  assert proc.returncode == 0, proc.stderr
  for case, inputs in cases.items():
    expected = np.asarray(predict(params, **inputs))
    batch, samples = inputs["audio"].shape
    assert expected.shape == (batch, samples * 30 // 16000, 5023, 3)
    # The motion is large next to the tolerance, so the comparison is not vacuous.
    assert np.abs(expected - inputs["template"][:, None]).max() > 1e-2
    for how in ("loader", "snippet"):
      outputs = np.load(f"{case}_{how}.npz")
      np.testing.assert_allclose(outputs["output"], expected, atol=1e-5, rtol=0)


def test_audio2mesh_batch_and_time_flags_fix_frames_and_samples(audio2mesh_run, tmp_path):
  workdir, predict, params = audio2mesh_run
  out = str(tmp_path / "concrete")
  assert export.main(["--workdir", workdir, "--out", out, "--batch", "2", "--time", "30"]) == 0
  signature = export.read_signature(out)
  shapes = {s["name"]: s["shape"] for s in signature["functions"]["predict"]["inputs"]}
  # 30 frames at 30 fps of 16 kHz audio: 16000 samples, derived by the task's export_dims.
  assert shapes == {"audio": [2, 16000], "template": [2, 5023, 3], "style": [2]}
  assert signature["symbolic_constraints"] == []
  rng = np.random.default_rng(1)
  inputs = {
    "audio": rng.standard_normal((2, 16000)).astype(np.float32),
    "template": rng.normal(0, 0.1, (2, 5023, 3)).astype(np.float32),
    "style": np.zeros(2, np.int32),
  }
  np.testing.assert_allclose(
    np.asarray(export.load(out)(**inputs)), np.asarray(predict(params, **inputs)), atol=1e-5
  )
