"""The `mead` experiment end to end on a small MEAD twin: a decoder of FLAME coefficients through
the head model, emotion conditioning, EMOTE's content/emotion loss, and the evaluation's LVE per
emotion, emotion accuracy of the generated expression, and what another emotion on the same audio
changes (the upper face, not the lips' motion)."""

import os

import jax
import numpy as np
import pytest

from data_pipelines.builders import mead
from fdjax import config as config_lib
from fdjax import export, trainer
from fdjax.tasks import audio2mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "experiments/audio2mesh/mead.py:runlocal=True,steps=60")


@pytest.fixture(scope="module")
def trained(small_mead, tmp_path_factory):
  raw_dir, data_dir, _ = small_mead
  overrides = [f"--config.data.raw_dir={raw_dir}", f"--config.data.data_dir={data_dir}"]
  config = config_lib.load_config(SPEC, overrides)
  workdir = str(tmp_path_factory.mktemp("mead_run"))
  return config, trainer.train_and_evaluate(config, workdir), workdir


def test_mead_experiment_decodes_flame_coefficients_with_emotion_conditioning():
  config = config_lib.load_config(SPEC)
  model = audio2mesh.build_model(config)
  decoder = model.decoder
  assert (decoder.output, decoder.num_expression, decoder.emotion_path) == ("flame", 50, "separate")
  assert (decoder.num_emotions, decoder.num_intensities) == (8, 3)
  assert config.loss.emotion_weight > 0 and config.loss.content_weight > 0
  with pytest.raises(ValueError, match="needs kind='nonautoregressive'"):
    audio2mesh.build_model(config_lib.load_config(SPEC, ["--config.model.decoder.kind=faceformer"]))


def test_training_lowers_the_split_loss_and_evaluation_reports_each_emotion(trained):
  config, result, _ = trained
  metrics = result.eval_metrics
  print({k: round(v, 4) for k, v in metrics.items() if "/" not in k or k.startswith("lve_mm/")})
  for emotion in mead.EMOTIONS:  # the test actor: neutral once, others 3 levels (sad 1 spoiled)
    expected = {"neutral": 1, "sad": 2}.get(emotion, 3)
    assert metrics[f"num_sequences/{emotion}"] == expected
    assert np.isfinite(metrics[f"lve_mm/{emotion}"])
  assert metrics["emotion_chance"] == pytest.approx(1 / 8)
  # The classifier reads emotion from true expression trajectories of an unseen actor ...
  assert metrics["emotion_accuracy_of_truth"] >= 0.5
  # ... and, after a short training, from the generated ones better than chance.
  assert metrics["emotion_accuracy"] > metrics["emotion_chance"]
  # The lips are closer to the truth than a static face's.
  assert metrics["lve_squared"] < metrics["static_template/lve_squared"]
  # Another emotion on the same audio holds the upper face elsewhere, the lips' motion not.
  assert metrics["emotion_swap/lip_sync_change"] < 0.2
  assert metrics["emotion_swap/upper_face_mm"] > 0.1


def test_export_takes_emotion_and_intensity_and_equals_in_process_prediction(trained, tmp_path):
  config, _, workdir = trained
  out = str(tmp_path / "export")
  assert export.main(["--workdir", workdir, "--out", out, "--external-weights"]) == 0
  names = [s["name"] for s in export.read_signature(out)["functions"]["predict"]["inputs"]]
  assert sorted(names) == ["audio", "emotion", "intensity", "style", "template"]
  _, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = audio2mesh.predict_fn(config, model)
  rng = np.random.default_rng(0)
  inputs = {
    "audio": rng.normal(size=(2, 16000)).astype(np.float32),
    "template": np.zeros((2, 5023, 3), np.float32),
    "style": np.zeros((2,), np.int32),
    "emotion": np.array([0, 5], np.int32),  # neutral, happy
    "intensity": np.array([0, 2], np.int32),
  }
  loaded = export.load(out)
  exported = np.asarray(loaded(**inputs))
  np.testing.assert_allclose(exported, np.asarray(jax.jit(predict)(params, **inputs)), atol=1e-5)
  # The emotion input reaches the face: happy at level 3 is not the neutral face.
  swapped = np.asarray(loaded(**dict(inputs, emotion=np.array([5, 5], np.int32))))
  assert np.abs(swapped[0] - exported[0]).max() > 1e-4
