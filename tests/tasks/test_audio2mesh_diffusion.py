"""The motion diffusion decoders through the audio2mesh task on the tiny VOCASET twin: the
diffspeaker variant learns and its evaluation samples every sequence twice (a nonzero
diversity); the facediffuser and diffposetalk experiments build their models, losses and
samplers (diffposetalk's over windows)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import config as config_lib
from fdjax import diffusion, trainer
from fdjax.models.motion_diffusion import (
  DiffPoseTalkDecoder,
  FaceDiffuserDecoder,
  RecurrentDenoiser,
  TransformerDenoiser,
)
from fdjax.state import strip_boxes
from fdjax.tasks import _speech_mesh, audio2mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "experiments/audio2mesh/vocaset.py:encoder=tiny,runlocal=True")


def _first_batch(config):
  return next(iter(audio2mesh.train_data(config, process_index=0, process_count=1)))


def _template_loss(config, batch):
  """The loss of an untrained decoder: its zero-initialised output predicts x_0 = 0 at every
  noise level, so its vertices are the template's (uniform weights: min-SNR off)."""
  mm = 1000.0
  truth = batch["vertices"] * mm
  template = np.broadcast_to(batch["template"][:, None] * mm, truth.shape)
  mask = batch["frame_mask"]
  vertex = diffusion.denoising_loss(template, truth, mask)
  velocity = diffusion.denoising_loss(
    np.diff(template, axis=1), np.diff(truth, axis=1), mask[:, 1:] & mask[:, :-1]
  )
  return float(jnp.mean(vertex + config.loss.velocity_weight * velocity))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = config_lib.load_config(
    SPEC + ",variant=diffspeaker,steps=30", ["--config.optim.warmup_steps=5"]
  )
  result = trainer.train_and_evaluate(config, str(tmp_path_factory.mktemp("diffspeaker")))
  return config, result


def test_diffspeaker_experiment_keeps_an_ema_and_samples_by_ddim(trained):
  config, result = trained
  assert config.model.decoder.kind == "diffspeaker" and config.ema.decay > 0
  assert config.model.decoder.sampling_method == "ddim"
  assert result.state.ema is not None
  assert result.step == 30 and np.isfinite(result.train_metrics["loss"])
  metrics = result.eval_metrics
  # Sampled (DDIM, seeded) from audio alone, the lips already move better than a static face.
  assert metrics["lve_squared"] < metrics["static_template/lve_squared"], metrics
  # Two samples per sequence (seeds 0 and 1): one sample's row, their mean, their diversity.
  assert config.data.eval_num_samples == 2 and metrics["num_samples"] == 2
  assert metrics["mean_of_samples/lve_squared"] < metrics["static_template/lve_squared"]
  assert metrics["mean_of_samples/num_frames"] == metrics["num_frames"]
  # In mm: the samples from two seeds differ (float32 noise would be ~1e-7 mm).
  assert metrics["diversity_mm"] > 5e-4, metrics  # measured: 1.7e-3


def test_diffspeaker_training_lowers_the_denoising_loss(trained):
  config, result = trained
  assert config.model.decoder.min_snr_gamma == 0 and config.loss.target_weight == 0
  model = audio2mesh.build_model(config)
  batch = _first_batch(config)
  loss_fn = audio2mesh.make_loss_fn(config)
  # The trained loss at a fixed draw of noise, against an untrained decoder's at any draw.
  loss, _ = jax.jit(lambda p: loss_fn(model, p, batch, jax.random.key(100), True))(
    result.state.params
  )
  before = _template_loss(config, batch)
  assert float(loss) < 0.75 * before, (before, float(loss))  # measured: about 0.5


@pytest.mark.parametrize(
  "dataset, variant",
  [("vocaset", "facediffuser"), ("vocaset", "diffposetalk"), ("biwi", "diffposetalk")],
)
def test_experiment_builds_its_denoiser_loss_and_sampler(dataset, variant):
  overrides = []
  if variant == "diffposetalk":
    # Windows of 8 frames after 2 previous ones: training examples of 10 frames.
    overrides = [
      "--config.model.decoder.window_frames=8",
      "--config.model.decoder.previous_frames=2",
      "--config.data.window_frames=10",
    ]
  spec = SPEC.replace("vocaset.py", f"{dataset}.py")
  config = config_lib.load_config(spec + f",variant={variant}", overrides)
  model = audio2mesh.build_model(config)
  decoder = model.decoder
  assert decoder.sampling_method == "ddpm" and decoder.beta_schedule == "squaredcos_cap_v2"
  if variant == "facediffuser":
    assert isinstance(decoder, FaceDiffuserDecoder)
    assert isinstance(decoder.denoiser, RecurrentDenoiser)
    assert config.loss.distance == "huber" and decoder.num_train_timesteps == 1000
  else:
    assert isinstance(decoder, DiffPoseTalkDecoder)
    assert isinstance(decoder.denoiser, TransformerDenoiser)
    assert decoder.num_train_timesteps == 500 and decoder.prediction_type == "sample"
    assert (decoder.audio_drop_probability, decoder.style_drop_probability) == (0.1, 0.45)
    assert (decoder.audio_guidance_scale, decoder.style_guidance_scale) == (1.15, 3.0)
    assert (decoder.window_frames, decoder.previous_frames) == (8, 2)
  batch = audio2mesh.dummy_batch(config, 2)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  # Shapes only (eval_shape): the numerics of the denoisers are tests/models' business.
  params = jax.eval_shape(lambda: strip_boxes(model.init(rngs, batch)["params"]))
  loss, metrics = jax.eval_shape(
    lambda p: audio2mesh.make_loss_fn(config)(model, p, batch, jax.random.key(2), True), params
  )
  assert loss.shape == () and {"vertex_mse_mm2", "velocity_mse_mm2", "weight"} <= set(metrics)
  predict, _ = audio2mesh.predict_fn(config, model)
  frames = 20  # diffposetalk: 2.5 windows (on BIWI of 2 audio features per frame)
  assert decoder.audio_frames_per_frame == (2 if dataset == "biwi" else 1)
  audio = np.zeros((2, _speech_mesh.window_samples(config, frames)), np.float32)
  vertices = jax.eval_shape(predict, params, audio, batch["template"], batch["subject"])
  assert vertices.shape == (2, frames) + batch["vertices"].shape[2:]


def test_facediffuser_on_biwi_diffuses_over_500_steps():
  spec = SPEC.replace("vocaset.py", "biwi.py") + ",variant=facediffuser"
  decoder = config_lib.load_config(spec.replace(",runlocal=True", "")).model.decoder
  assert decoder.num_train_timesteps == decoder.sampling_steps == 500
  assert decoder.sampling_method == "ddpm"
