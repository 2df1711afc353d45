"""The motion_vq task (CodeTalker stage 1) on the tiny synthetic VOCASET twin, and CodeTalker
stage 2 (audio2mesh) starting its frozen prior from a stage-1 workdir."""

import json
import os

import jax
import numpy as np
import pytest

from fdjax import config as config_lib
from fdjax import trainer
from fdjax.state import strip_boxes
from fdjax.tasks import audio2mesh, load_task, motion_vq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCASET = os.path.join(ROOT, "experiments/audio2mesh/vocaset.py")
# The `tiny` VQ-VAE on VOCASET's 5023 vertices (the `vocaset` size is CodeTalker's, too slow).
TINY_VQVAE = {"kind": "codetalker_vq", "variant": "tiny", "num_vertices": 5023, "period": 30}
# No warmup and a large step, so a few steps visibly move the reconstruction.
STAGE1 = [
  ("model.decoder", TINY_VQVAE),
  "--config.optim.warmup_steps=0",
  "--config.optim.lr=0.01",
  "--config.log_every=2",
]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("motion_vq"))
  config = config_lib.load_config(
    VOCASET + ":variant=codetalker_vq,encoder=tiny,runlocal=True,steps=12", STAGE1
  )
  result = trainer.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_the_codetalker_vq_variant_is_the_motion_vq_task():
  config = config_lib.load_config(VOCASET + ":variant=codetalker_vq,encoder=tiny,runlocal=True")
  assert config.task == "motion_vq"
  assert load_task(config.task).module is motion_vq
  assert config_lib.load_config(VOCASET + ":variant=codetalker").task == "audio2mesh"
  # audio2mesh names the task that trains the VQ-VAE now.
  with pytest.raises(ValueError, match="the task motion_vq"):
    audio2mesh.build_model(config)
  faceformer = config_lib.load_config(VOCASET + ":encoder=tiny,runlocal=True")
  with pytest.raises(ValueError, match="the motion_vq task trains 'codetalker_vq'"):
    motion_vq.build_model(faceformer)


def test_stage1_trains_logs_its_codebook_and_evaluates_reconstructions(stage1):
  _, workdir, result = stage1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert len(train) >= 3, train
  assert {"vq_loss", "codebook_usage", "perplexity", "vertex_mse_mm2"} <= set(train[-1])
  assert train[-1]["loss"] < train[0]["loss"], (train[0], train[-1])
  metrics = result.eval_metrics
  assert metrics["num_sequences"] == 2
  for name in ("lve_squared", "lve_mm", "fdd", "mve_mm", "static_template/lve_squared"):
    assert np.isfinite(metrics[name]), name
  assert json.load(open(os.path.join(workdir, "eval_masks.json"))) == {
    "lip_mask": "lips",
    "upper_face_mask": "upper_face",
  }
  predicted = np.load(os.path.join(workdir, "samples", "sample_pred.npy"))
  truth = np.load(os.path.join(workdir, "samples", "sample_truth.npy"))
  assert predicted.shape == truth.shape and predicted.shape[1:] == (5023, 3)


def test_predict_fn_reconstructs_motion_of_any_length(stage1):
  config, workdir, _ = stage1
  _, model, params, _ = trainer.restore_params(config, workdir)
  reconstruct, specs = motion_vq.predict_fn(config, model)
  assert specs == {
    "vertices": ("b, t, 5023, 3", "float32"),
    "template": ("b, 5023, 3", "float32"),
  }
  assert motion_vq.symbolic_constraints(config) == ["t >= 1"]
  assert motion_vq.export_defaults(config) == {}
  metadata = motion_vq.export_metadata(config)
  assert metadata["num_vertices"] == 5023 and "audio_input" not in metadata
  rng = np.random.default_rng(0)
  template = rng.normal(0, 0.1, (2, 5023, 3)).astype(np.float32)
  for frames in (5, 9):
    vertices = template[:, None] + rng.normal(0, 0.003, (2, frames, 5023, 3)).astype(np.float32)
    out = jax.jit(reconstruct)(params, vertices, template)
    assert out.shape == (2, frames, 5023, 3) and np.all(np.isfinite(np.asarray(out)))


def test_stage2_starts_its_prior_from_the_stage1_workdir(stage1):
  config, workdir, _ = stage1
  stage2 = config_lib.load_config(
    VOCASET + ":variant=codetalker,encoder=tiny,runlocal=True",
    [
      ("model.decoder.variant", "tiny"),
      ("model.decoder.prior", {"num_vertices": 5023, "period": 30}),
      ("model.prior_workdir", workdir),
    ],
  )
  task = load_task(stage2.task)
  model = task.build_model(stage2)
  rngs = {"params": jax.random.key(5), "dropout": jax.random.key(6)}
  fresh = jax.device_get(strip_boxes(model.init(rngs, task.dummy_batch(stage2, 1))["params"]))
  loaded = task.load_pretrained(stage2, fresh)
  _, _, trained, _ = trainer.restore_params(config, workdir)
  trained = jax.device_get(trained)["prior"]
  assert jax.tree.structure(loaded["decoder"]["prior"]) == jax.tree.structure(trained)
  for got, want, was in zip(
    jax.tree.leaves(loaded["decoder"]["prior"]),
    jax.tree.leaves(trained),
    jax.tree.leaves(fresh["decoder"]["prior"]),
  ):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == was.dtype
  for name in fresh["decoder"]:  # the code predictor itself keeps its fresh initialisation
    if name != "prior":
      for got, was in zip(
        jax.tree.leaves(loaded["decoder"][name]), jax.tree.leaves(fresh["decoder"][name])
      ):
        np.testing.assert_array_equal(got, was)
  # Without a stage-1 workdir, stage 2 says what it needs.
  without = config_lib.load_config(VOCASET + ":variant=codetalker,encoder=tiny,runlocal=True")
  with pytest.raises(ValueError, match="needs config.model.prior_workdir"):
    audio2mesh.load_pretrained(without, fresh)


def test_an_ema_codebook_lives_in_the_train_state_and_moves(tmp_path):
  """With `ema_decay > 0` the codebook is the `vq_ema` collection: kept in the train state,
  updated by the steps (not by gradients), and read by evaluation."""
  config = config_lib.load_config(
    VOCASET + ":variant=codetalker_vq,encoder=tiny,runlocal=True,steps=4",
    [("model.decoder", {**TINY_VQVAE, "ema_decay": 0.9}), *STAGE1[1:]],
  )
  result = trainer.train_and_evaluate(config, str(tmp_path))
  state = jax.device_get(result.state)
  assert set(state.collections) == {"vq_ema"}
  ema = state.collections["vq_ema"]["prior"]["quantizer"]
  assert "quantizer" not in state.params["prior"]  # the codebook is no parameter any more
  assert np.all(ema["cluster_size"] != 1.0)  # moved away from its initial ones by the updates
  assert np.isfinite(result.eval_metrics["lve_squared"])
