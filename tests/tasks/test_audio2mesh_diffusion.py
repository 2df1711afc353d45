"""The motion diffusion decoders through the audio2mesh task on the tiny VOCASET twin: the
diffspeaker variant learns, and its samples differ from seed to seed."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import config as config_lib
from fdjax import diffusion, trainer
from fdjax.models.motion_diffusion import FaceDiffuserDecoder, RecurrentDenoiser
from fdjax.state import strip_boxes
from fdjax.tasks import audio2mesh

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


def test_samples_from_two_seeds_differ(trained):
  config, result = trained
  model = audio2mesh.build_model(config)
  batch = _first_batch(config)

  @jax.jit
  def sample(key):
    return model.apply(
      {"params": result.state.params},
      batch["audio"][:2],
      batch["template"][:2],
      batch["subject"][:2],
      method="generate",
      rngs={"sample": key},
    )[0]

  first, second = sample(jax.random.key(1)), sample(jax.random.key(2))
  assert first.shape == batch["vertices"][:2].shape
  # Diversity: the per-frame standard deviation across the samples, averaged; above zero.
  offsets = jnp.stack([first, second]) - batch["template"][None, :2, None]
  diversity = float(jnp.std(offsets, axis=0).mean()) * config.model.decoder.sample_scale
  assert diversity > 1e-4, diversity  # in the sample's units (mm); float32 noise is ~1e-7


def test_facediffuser_experiment_builds_the_recurrent_denoiser_and_its_loss_and_sampler():
  config = config_lib.load_config(SPEC + ",variant=facediffuser")
  model = audio2mesh.build_model(config)
  assert isinstance(model.decoder, FaceDiffuserDecoder)
  assert isinstance(model.decoder.denoiser, RecurrentDenoiser)
  assert model.decoder.sampling_method == "ddpm"
  assert model.decoder.beta_schedule == "squaredcos_cap_v2" and config.loss.distance == "huber"
  batch = audio2mesh.dummy_batch(config, 2)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  # Shapes only (eval_shape): the numerics of the GRU denoiser are tests/models' business.
  params = jax.eval_shape(lambda: strip_boxes(model.init(rngs, batch)["params"]))
  loss, metrics = jax.eval_shape(
    lambda p: audio2mesh.make_loss_fn(config)(model, p, batch, jax.random.key(2), True), params
  )
  assert loss.shape == () and {"vertex_mse_mm2", "velocity_mse_mm2", "weight"} <= set(metrics)
  predict, _ = audio2mesh.predict_fn(config, model)
  vertices = jax.eval_shape(predict, params, batch["audio"], batch["template"], batch["subject"])
  assert vertices.shape == batch["vertices"].shape
