"""One symbolic-batch artifact per task, loaded by jax alone, equals the task's predict function.

For each task with a predict function that tests/test_export.py does not already cover (the
tiny task and the audio2mesh FaceFormer model are covered there): the video expression
classifier (`dfer`), the action-unit detector (`au`) and CodeTalker's stage-1 motion VQ-VAE
(`audio2mesh` with `variant=codetalker_vq`, whose predict function reconstructs motion). Each
case trains its smallest config for two steps, exports it with `fdjax export` defaults
(symbolic `b`, and `t` where the task has frames), then loads the artifact in a process where
importing fdjax or flax fails, both with `jax.export.deserialize` (the README snippet) and
with a copy of `fdjax/export.py`, calls it at two batch sizes, and compares every named output
with the predict function jitted in this process (1e-5). Output names, shapes and dtypes must be
those signature.json declares.
"""

import jax
import numpy as np
import pytest
from test_export import CASES_JAX_ONLY, run_jax_only

from fdjax import config as config_lib
from fdjax import export, trainer


def _video(rng, batch, frames):
  return rng.integers(0, 256, (batch, frames, 32, 32, 3), dtype=np.uint8)  # [b, T, H, W, 3]


def _motion(rng, batch, frames):
  template = rng.normal(0, 0.1, (batch, 5023, 3)).astype(np.float32)  # [b, V, 3]
  offsets = rng.normal(0, 0.003, (batch, frames, 5023, 3)).astype(np.float32)  # [b, t, V, 3]
  return {"vertices": template[:, None] + offsets, "template": template}


# CodeTalker stage 1 at the `tiny` VQ-VAE size on VOCASET's 5023 vertices (the experiment's
# `vocaset` size is CodeTalker's, d_model 1024 and 6 layers: too slow here).
TINY_VQVAE = {"kind": "codetalker_vq", "variant": "tiny", "num_vertices": 5023, "period": 30}

# id -> (config spec, overrides, input shapes signature.json declares, inputs(rng, batch)).
CASES = {
  "dfer": (
    "experiments/dfer/dfew.py:variant=clip_adapter,size=tiny,runlocal=True,frames=4,steps=2",
    [],
    {"video": ["b", 4, 32, 32, 3]},
    lambda rng, batch: {"video": _video(rng, batch, 4)},
  ),
  # The other video model kind (ViViT from scratch) here, CLIP with adapters above.
  "au": (
    "experiments/au/bp4d.py:variant=vivit_scratch,size=tiny,runlocal=True,frames=4,steps=2",
    [],
    {"video": ["b", 4, 32, 32, 3]},
    lambda rng, batch: {"video": _video(rng, batch, 4)},
  ),
  # The MAE-encoder classifier (a fine-tuning run from a random encoder: init_from is empty).
  "dfer_vit_mae": (
    "experiments/dfer/dfew.py:variant=vit_mae_finetune,size=tiny,runlocal=True,frames=4,steps=2",
    [],
    {"video": ["b", 4, 32, 32, 3]},
    lambda rng, batch: {"video": _video(rng, batch, 4)},
  ),
  # No warmup and a large step: two steps move the reconstruction visibly off the input.
  "codetalker_vq": (
    "experiments/audio2mesh/vocaset.py:variant=codetalker_vq,encoder=tiny,runlocal=True,steps=2",
    ["--config.optim.warmup_steps=0", "--config.optim.lr=0.01", ("model.decoder", TINY_VQVAE)],
    {"vertices": ["b", "t", 5023, 3], "template": ["b", 5023, 3]},
    # t is symbolic too: two lengths as well as two batch sizes.
    lambda rng, batch: _motion(rng, batch, 8 if batch == 1 else 5),
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_symbolic_artifact_in_a_jax_only_process_equals_predict(case, tmp_path):
  spec, overrides, input_shapes, make_inputs = CASES[case]
  config = config_lib.load_config(spec, overrides)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  task, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  predict, params = jax.jit(predict), jax.device_get(params)

  out = str(tmp_path / "artifact")
  assert export.main(["--workdir", workdir, "--out", out]) == 0  # config from the workdir
  signature = export.read_signature(out)["functions"]["predict"]
  assert {s["name"]: s["shape"] for s in signature["inputs"]} == input_shapes

  rng = np.random.default_rng(0)
  cases = {}
  for batch in (1, 3):
    path = str(tmp_path / f"batch{batch}")
    cases[path] = (batch, make_inputs(rng, batch))
    np.savez(f"{path}_in.npz", **cases[path][1])
  proc = run_jax_only(tmp_path, CASES_JAX_ONLY, [out, *cases])
  assert proc.returncode == 0, proc.stderr

  for path, (batch, inputs) in cases.items():
    expected = predict(params, **inputs)
    expected = expected if isinstance(expected, dict) else {"output": expected}
    sizes = {"b": batch}
    if "vertices" in inputs:
      sizes["t"] = inputs["vertices"].shape[1]
      # The motion is large next to the tolerance, so the comparison is not vacuous.
      assert np.abs(expected["output"] - inputs["vertices"]).max() > 1e-2
    for how in ("loader", "snippet"):
      outputs = dict(np.load(f"{path}_{how}.npz"))
      assert sorted(outputs) == sorted(o["name"] for o in signature["outputs"])
      for declared in signature["outputs"]:
        name = declared["name"]
        shape = tuple(sizes.get(d, d) for d in declared["shape"])
        assert outputs[name].shape == shape and outputs[name].dtype == declared["dtype"], name
        np.testing.assert_allclose(outputs[name], expected[name], atol=1e-5, rtol=0)
