"""FaceFormer's training modes through the trainer, on whole padded sentences of the tiny twin."""

import os

import jax
import numpy as np
import pytest

from fdjax import config as config_lib
from fdjax import trainer
from fdjax.tasks import _speech_mesh, audio2mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "experiments/audio2mesh/vocaset.py:encoder=tiny,runlocal=True,steps=3")


def _config(*overrides):
  return config_lib.load_config(SPEC, ["--config.data.window_frames=0", *overrides])


def test_faceformer_experiments_train_autoregressively_by_default():
  config = config_lib.load_config(SPEC)
  assert config.model.decoder.training == "autoregressive"
  assert audio2mesh.build_model(config).decoder.training == "autoregressive"
  assert audio2mesh.sampling_schedule(config) is None
  teacher = config_lib.load_config(SPEC, ["--config.model.decoder.training=teacher_forcing"])
  assert audio2mesh.build_model(teacher).decoder.training == "teacher_forcing"


def test_whole_sentence_batches_are_padded_to_a_bucket_with_masks():
  config = _config("--config.batch_size=3")
  batches = iter(audio2mesh.train_data(config, process_index=0, process_count=1))
  for _ in range(2):
    batch = next(batches)
    frames = batch["vertices"].shape[1]
    assert frames % _speech_mesh.EVAL_FRAME_BUCKET == 0
    lengths = batch["frame_mask"].sum(axis=1)
    # Sentences keep their own lengths (right-padded); the longest decides the bucket.
    assert np.all(batch["frame_mask"] == (np.arange(frames)[None] < lengths[:, None]))
    assert frames - _speech_mesh.EVAL_FRAME_BUCKET < lengths.max() <= frames
    samples = _speech_mesh.window_samples(config, frames)
    assert batch["audio"].shape == batch["audio_mask"].shape == (3, samples)
    padded = ~batch["frame_mask"]
    np.testing.assert_array_equal(
      batch["vertices"][padded],
      np.broadcast_to(batch["template"][:, None], batch["vertices"].shape)[padded],
    )


def test_max_frames_caps_long_sentences_and_zero_is_an_error():
  config = _config("--config.batch_size=2", "--config.data.max_frames=20")
  batch = next(iter(audio2mesh.train_data(config, process_index=0, process_count=1)))
  assert batch["vertices"].shape[1] == 32 and batch["frame_mask"].sum(axis=1).max() <= 20
  with pytest.raises(ValueError, match="max_frames"):
    audio2mesh.train_data(_config("--config.data.max_frames=0"), process_index=0, process_count=1)


@pytest.mark.parametrize("mode", ["autoregressive", "scheduled_sampling", "teacher_forcing"])
def test_each_training_mode_trains_on_padded_whole_sentences(mode, tmp_path):
  config = _config(
    f"--config.model.decoder.training={mode}",
    "--config.batch_size=8",
    "--config.eval_every=0",
    "--config.data.max_frames=40",
    "--config.log_every=1",
  )
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result.step == 3 and np.isfinite(result.train_metrics["loss"]), result.train_metrics
  assert np.isfinite(result.eval_metrics["lve_squared"])
  decoder = result.state.params["decoder"]["offset_projection"]["kernel"]
  # The zero-initialised output layer has moved: the step trained the decoder.
  assert float(jax.numpy.abs(decoder).max()) > 0
