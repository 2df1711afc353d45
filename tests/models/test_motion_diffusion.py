"""The diffusion denoisers and decoder: guidance on the real denoisers, the null embeddings,
padding, and seeded sampling.

Parameters are the model's initialisation with every weight then redrawn from numpy (the
zero-initialised output layer would make every prediction zero and every check vacuous).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import diffusion
from fdjax.models import motion_diffusion as md
from fdjax.state import strip_boxes

NUM_VERTICES = 8
AUDIO_DIM = 5
BATCH = 3
FRAMES = 6
DENOISERS = {
  "transformer_aligned": lambda: md.TransformerDenoiser(
    **md.TRANSFORMER_DENOISER_VARIANTS["tiny"], attention_impl="xla"
  ),
  "transformer_cross_attention": lambda: md.TransformerDenoiser(
    **md.TRANSFORMER_DENOISER_VARIANTS["tiny"],
    audio_conditioning="cross_attention",
    attention_impl="xla",
  ),
  "recurrent": lambda: md.RecurrentDenoiser(**md.RECURRENT_DENOISER_VARIANTS["tiny"]),
  "recurrent_bidirectional": lambda: md.RecurrentDenoiser(
    **md.RECURRENT_DENOISER_VARIANTS["tiny"], bidirectional=True
  ),
}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x_t = jnp.asarray(rng.normal(size=(BATCH, FRAMES, NUM_VERTICES * 3)), jnp.float32)
  t = jnp.asarray([3, 500, 999], jnp.int32)
  audio = jnp.asarray(rng.normal(size=(BATCH, FRAMES, AUDIO_DIM)), jnp.float32)
  style = jnp.asarray([0, 2, 1], jnp.int32)
  mask = jnp.asarray(np.arange(FRAMES)[None] < np.array([[6], [4], [6]]))
  return x_t, t, audio, style, mask


def _random_params(model, *args, seed=1):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
    strip_boxes(shapes["params"]),
  )


@pytest.fixture(scope="module", params=sorted(DENOISERS))
def denoiser(request):
  model = DENOISERS[request.param]()
  inputs = _inputs()
  return model, _random_params(model, *inputs), inputs


def _predict(model, params, inputs, **drops):
  x_t, t, audio, style, mask = inputs
  return model.apply({"params": params}, x_t, t, audio, style, mask, **drops)


def test_prediction_has_the_shape_of_x_t_and_the_nulls_are_parameters(denoiser):
  model, params, inputs = denoiser
  assert _predict(model, params, inputs).shape == inputs[0].shape
  assert params["conditions"]["null_audio"].shape == (model.d_model,)
  assert params["conditions"]["null_style"].shape == (model.d_model,)


def test_drop_flags_select_the_null_embeddings_per_example(denoiser):
  model, params, inputs = denoiser
  conditional = _predict(model, params, inputs)
  drop = jnp.asarray([False, True, False])
  for flag in ("drop_audio", "drop_style"):
    dropped = _predict(model, params, inputs, **{flag: drop})
    np.testing.assert_allclose(dropped[0], conditional[0], atol=1e-6)
    np.testing.assert_allclose(dropped[2], conditional[2], atol=1e-6)
    valid = inputs[4][1]
    assert float(jnp.abs(dropped[1][valid] - conditional[1][valid]).max()) > 1e-3, flag
  # The null is the learned vector: another null gives another prediction.
  other = jax.tree.map(lambda p: p, params)
  other["conditions"] = {**params["conditions"], "null_audio": -params["conditions"]["null_audio"]}
  assert not np.allclose(
    _predict(model, other, inputs, drop_audio=drop)[1],
    _predict(model, params, inputs, drop_audio=drop)[1],
  )


@pytest.mark.parametrize(
  "scales, drops",
  [
    ((0.0, 0.0), {"drop_audio": True, "drop_style": True}),  # unconditional
    ((1.0, 1.0), {}),  # conditional
    ((1.0, 0.0), {"drop_style": True}),  # audio alone: the first of the sequential rule
  ],
)
def test_guidance_scale_zero_and_one_give_the_unconditional_and_conditional_predictions(
  denoiser, scales, drops
):
  model, params, inputs = denoiser
  x_t, t, audio, style, mask = inputs
  guidance = md.DiffusionDecoder(denoiser=model).guidance(scales)
  guided = md.guided_denoise_fn(model, params, audio, style, mask, guidance)(x_t, t)
  flags = {k: jnp.full((BATCH,), v) for k, v in drops.items()}
  np.testing.assert_allclose(guided, _predict(model, params, inputs, **flags), atol=1e-5)
  # And with the scales given as an array (an exported sampler's input).
  traced = md.guided_denoise_fn(model, params, audio, style, mask, guidance, jnp.asarray(scales))
  np.testing.assert_allclose(traced(x_t, t), guided, atol=1e-6)


def test_guidance_above_one_extrapolates_from_the_unconditional_prediction(denoiser):
  model, params, inputs = denoiser
  x_t, t, audio, style, mask = inputs
  guidance = md.DiffusionDecoder(denoiser=model).guidance((2.0, 1.0))
  guided = md.guided_denoise_fn(model, params, audio, style, mask, guidance)(x_t, t)
  every = jnp.ones((BATCH,), bool)
  p0 = _predict(model, params, inputs, drop_audio=every, drop_style=every)
  p1 = _predict(model, params, inputs, drop_style=every)
  p2 = _predict(model, params, inputs)
  np.testing.assert_allclose(guided, p0 + 2.0 * (p1 - p0) + (p2 - p1), atol=1e-5)


def test_valid_frames_do_not_depend_on_the_padding(denoiser):
  model, params, inputs = denoiser
  x_t, t, audio, style, mask = inputs
  padded = ~mask[:, :, None]
  noisy = _predict(model, params, (jnp.where(padded, 7.0, x_t), t, audio, style, mask))
  quiet = _predict(model, params, (jnp.where(padded, -3.0, x_t), t, audio, style, mask))
  np.testing.assert_allclose(noisy[1, :4], quiet[1, :4], atol=1e-5)


@pytest.mark.parametrize("decoder_class", [md.DiffSpeakerDecoder, md.FaceDiffuserDecoder])
def test_generate_is_a_function_of_the_sample_key(decoder_class):
  decoder = decoder_class.from_variant("tiny", sampling_steps=4, attention_impl="xla")
  _, _, audio, style, _ = _inputs()
  template = jnp.zeros((BATCH, NUM_VERTICES, 3))
  vertices = jnp.zeros((BATCH, FRAMES, NUM_VERTICES, 3))
  params = _random_params(decoder, audio, template, style, vertices)

  @jax.jit
  def generate(params, key):
    return decoder.apply(
      {"params": params}, audio, template, style, method="generate", rngs={"sample": key}
    )[0]

  first, again = generate(params, jax.random.key(1)), generate(params, jax.random.key(1))
  other = generate(params, jax.random.key(2))
  assert first.shape == (BATCH, FRAMES, NUM_VERTICES, 3)
  np.testing.assert_array_equal(first, again)
  # Offsets are x_0 / sample_scale (metres): compare in the sample's units.
  assert float(jnp.abs(first - other).max()) * decoder.sample_scale > 1e-2

  # Without a `sample` rng: the key of `sample_seed`, the same every call.
  def seeded(seed):
    fixed = decoder.clone(sample_seed=seed)
    return fixed.apply({"params": params}, audio, template, style, method="generate")[0]

  np.testing.assert_array_equal(seeded(0), seeded(0))
  assert float(jnp.abs(seeded(0) - seeded(1)).max()) * decoder.sample_scale > 1e-2

  # Guidance scales reach the sampler: (1, 1) is the unguided loop, others are not.
  def guided(scales):
    return decoder.apply(
      {"params": params}, audio, template, style, method="generate", guidance_scales=scales
    )[0]

  np.testing.assert_allclose(guided((1.0, 1.0)), seeded(0), atol=1e-7)
  np.testing.assert_allclose(guided(jnp.asarray([1.0, 1.0])), seeded(0), atol=1e-5)
  assert float(jnp.abs(guided((2.0, 3.0)) - seeded(0)).max()) * decoder.sample_scale > 1e-2

  # The chain in the denoiser's projection (the default) samples what the chain on x_t does,
  # guided too, with per-example seeds and scales.
  def sample(decoder, scales):
    return decoder.apply(
      {"params": params},
      audio,
      template,
      style,
      method="generate",
      guidance_scales=scales,
      seed=jnp.asarray([4, 5, 6]),
    )[0]

  on_x_t = decoder.clone(projected_sampling=False)
  per_example = jnp.asarray([[1.0, 1.0], [2.0, 3.0], [0.5, 1.0]])
  for scales in ((1.0, 1.0), per_example):
    np.testing.assert_allclose(sample(decoder, scales), sample(on_x_t, scales), atol=1e-6)


def test_training_pass_regresses_the_prediction_types_target():
  decoder = md.DiffSpeakerDecoder.from_variant(
    "tiny", prediction_type="epsilon", attention_impl="xla"
  )
  _, _, audio, style, mask = _inputs()
  template = jnp.zeros((BATCH, NUM_VERTICES, 3))
  rng = np.random.default_rng(3)
  vertices = jnp.asarray(1e-3 * rng.normal(size=(BATCH, FRAMES, NUM_VERTICES, 3)), jnp.float32)
  params = _random_params(decoder, audio, template, style, vertices)
  predicted, aux = decoder.apply(
    {"params": params},
    audio,
    template,
    style,
    vertices,
    frame_mask=mask,
    train=True,
    rngs={"dropout": jax.random.key(4)},
  )
  assert aux["prediction"].shape == aux["target"].shape == (BATCH, FRAMES, NUM_VERTICES * 3)
  schedule = decoder.schedule()
  x_t, t = aux["noisy_sample"], aux["timesteps"]
  # The target is the noise that made x_t from the true offsets (in mm): x_0 from it is the truth.
  truth = (vertices - template[:, None]).reshape(BATCH, FRAMES, -1) * decoder.sample_scale
  from_target = diffusion.to_sample(schedule, aux["target"], x_t, t, "epsilon")
  np.testing.assert_allclose(from_target, truth, atol=2e-3)
  # The vertices are those of the x_0 the prediction implies; padded frames are the template.
  implied = diffusion.to_sample(schedule, aux["prediction"], x_t, t, "epsilon")
  implied = implied.reshape(predicted.shape) / decoder.sample_scale
  np.testing.assert_allclose(predicted[0], implied[0], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(predicted[1, 4:]) == 0.0)
