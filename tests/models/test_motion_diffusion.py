"""The diffusion denoisers and decoder: guidance on the real denoisers, the null embeddings,
padding, and seeded sampling.

Parameters are the model's initialisation with every weight then redrawn from numpy (the
zero-initialised output layer would make every prediction zero and every check vacuous).
"""

from __future__ import annotations

import functools

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


# Windowed generation (DiffPoseTalk): windows of 4 frames after 2 previous ones.
WINDOW, PREVIOUS = 4, 2


@pytest.fixture(scope="module")
def windowed():
  """A tiny windowed decoder (windows of 4 frames after 2), its random parameters, the style,
  and jitted `generate(params, audio, frame_mask, seed)` and `window(...)` (`sample_window`)."""
  decoder = md.DiffPoseTalkDecoder.from_variant(
    "tiny",
    sampling_steps=3,
    window_frames=WINDOW,
    previous_frames=PREVIOUS,
    audio_guidance_scale=1.5,
    style_guidance_scale=2.0,
    attention_impl="xla",
  )
  rng = np.random.default_rng(5)
  audio = jnp.asarray(rng.normal(size=(BATCH, PREVIOUS + WINDOW, AUDIO_DIM)), jnp.float32)
  template = jnp.zeros((BATCH, NUM_VERTICES, 3))
  vertices = jnp.zeros((BATCH, PREVIOUS + WINDOW, NUM_VERTICES, 3))
  style = jnp.asarray([0, 2, 1], jnp.int32)
  params = _random_params(decoder, audio, template, style, vertices)

  @functools.partial(jax.jit, static_argnames="seed")
  def generate(params, audio, frame_mask, seed):
    """x_0 [B, T, V, 3] in the sample's units, from the key `jax.random.key(seed)`."""
    offsets = decoder.clone(sample_seed=seed).apply(
      {"params": params}, audio, template, style, frame_mask=frame_mask, method="generate"
    )[1]["offsets"]
    return offsets * decoder.sample_scale

  @jax.jit
  def window(params, audio, previous, frame_mask, first, key):
    return decoder.apply(
      {"params": params},
      audio,
      style,
      previous,
      frame_mask=frame_mask,
      first=first,
      key=key,
      method="sample_window",
    )

  return decoder, params, style, generate, window


def test_the_null_start_stands_for_missing_previous_frames(windowed):
  decoder, params, style, _, _ = windowed
  denoiser = decoder.denoiser
  x_t, t, _, _, mask = _inputs()
  x_t, mask = x_t[:, :WINDOW], mask[:, :WINDOW]
  rng = np.random.default_rng(6)
  audio = jnp.asarray(rng.normal(size=(BATCH, PREVIOUS + WINDOW, AUDIO_DIM)), jnp.float32)
  previous = jnp.asarray(rng.normal(size=(BATCH, PREVIOUS, NUM_VERTICES * 3)), jnp.float32)

  @jax.jit
  def predict(previous, **kwargs):
    variables = {"params": params["denoiser"]}
    return denoiser.apply(variables, x_t, t, audio, style, mask, previous=previous, **kwargs)

  assert params["denoiser"]["null_previous"].shape == (PREVIOUS, denoiser.d_model)
  given = predict(previous)
  started = predict(None)
  np.testing.assert_allclose(
    started, predict(-previous, drop_previous=jnp.ones(BATCH, bool)), atol=1e-6
  )
  one = predict(previous, drop_previous=jnp.asarray([False, True, False]))
  np.testing.assert_allclose(one[0], given[0], atol=1e-6)
  np.testing.assert_allclose(one[1], started[1], atol=1e-6)
  assert float(jnp.abs(given[1] - started[1]).max()) > 1e-3


def test_windowed_generation_covers_two_and_a_half_windows(windowed):
  decoder, params, _, generate, window = windowed
  frames = 10  # windows 0-3, 4-7 and 8-9 (padded to 8-11)
  rng = np.random.default_rng(7)
  audio = jnp.asarray(rng.normal(size=(BATCH, frames, AUDIO_DIM)), jnp.float32)
  mask = jnp.ones((BATCH, frames), bool)
  sample = generate(params, audio, mask, 3).reshape(BATCH, frames, -1)
  key = jax.random.key(3)
  assert sample.shape == (BATCH, frames, NUM_VERTICES * 3)
  assert bool(jnp.all(jnp.isfinite(sample)))
  # Window 1 is `sample_window` after the last PREVIOUS frames of window 0, from key fold_in 1.
  features = jnp.pad(audio, ((0, 0), (PREVIOUS, 2), (0, 0)))  # the start's frames, then padding
  window_audio = features[:, WINDOW : WINDOW + PREVIOUS + WINDOW]
  window_mask = jnp.ones((BATCH, WINDOW), bool)
  previous = sample[:, WINDOW - PREVIOUS : WINDOW]
  key1 = jax.random.fold_in(key, 1)
  again = window(params, window_audio, previous, window_mask, False, key1)
  np.testing.assert_allclose(again, sample[:, WINDOW : 2 * WINDOW], atol=1e-4)
  # The first frames of window 1 follow window 0's output: change it, they change.
  moved = window(params, window_audio, previous + 1.0, window_mask, False, key1)
  assert float(jnp.abs(moved[:, 0] - again[:, 0]).max()) > 1e-3
  # Window 0 starts from the learned start whatever `previous` holds.
  first_audio = features[:, : PREVIOUS + WINDOW]
  key0 = jax.random.fold_in(key, 0)
  started = window(params, first_audio, previous + 5.0, window_mask, True, key0)
  np.testing.assert_allclose(started, sample[:, :WINDOW], atol=1e-4)


def test_windowed_valid_frames_do_not_depend_on_the_padding(windowed):
  decoder, params, _, generate, _ = windowed
  frames, padded_frames = 10, 16
  lengths = np.array([10, 7, 3])  # example 1 ends inside window 1, example 2 inside window 0
  rng = np.random.default_rng(8)
  audio = rng.normal(size=(BATCH, padded_frames, AUDIO_DIM)).astype(np.float32)
  mask = np.arange(frames)[None] < lengths[:, None]
  short = generate(params, jnp.asarray(audio[:, :frames]), jnp.asarray(mask), 3)
  # Padded further (a fourth window), with other audio on every padded frame.
  long_mask = np.arange(padded_frames)[None] < lengths[:, None]
  noisy = np.where(long_mask[..., None], audio, 50.0 * rng.normal(size=audio.shape))
  long = generate(params, jnp.asarray(noisy, jnp.float32), jnp.asarray(long_mask), 3)
  for b, length in enumerate(lengths):
    np.testing.assert_allclose(long[b, :length], short[b, :length], atol=1e-4)
    assert float(jnp.abs(long[b, length:]).max()) == 0.0  # padded frames: the template


def test_training_with_previous_frames_denoises_the_window_only(windowed):
  decoder, params, style, _, _ = windowed
  frames = PREVIOUS + WINDOW
  rng = np.random.default_rng(9)
  audio = jnp.asarray(rng.normal(size=(BATCH, frames, AUDIO_DIM)), jnp.float32)
  template = jnp.zeros((BATCH, NUM_VERTICES, 3))
  vertices = jnp.asarray(1e-3 * rng.normal(size=(BATCH, frames, NUM_VERTICES, 3)), jnp.float32)
  # Example 2 is a sequence shorter than its previous frames: it starts from the learned start.
  mask = jnp.asarray(np.arange(frames)[None] < np.array([[6], [5], [1]]))

  @jax.jit
  @functools.partial(jax.vmap, in_axes=(None, 0))  # one compiled pass over many draws
  def step(params, key):
    return decoder.apply(
      {"params": params},
      audio,
      template,
      style,
      vertices,
      frame_mask=mask,
      train=True,
      rngs={"dropout": key},
    )

  predicted, aux = step(params, jax.random.split(jax.random.key(1), 40))
  assert aux["prediction"].shape == (40, BATCH, frames, NUM_VERTICES * 3)
  given = np.broadcast_to(vertices[:2, :PREVIOUS], predicted[:, :2, :PREVIOUS].shape)
  np.testing.assert_allclose(predicted[:, :2, :PREVIOUS], given, atol=1e-9)
  np.testing.assert_array_equal(aux["prediction"][:, :, :PREVIOUS], 0.0)
  expected = np.asarray(mask) & (np.arange(frames) >= PREVIOUS)[None]
  np.testing.assert_array_equal(aux["loss_mask"], np.broadcast_to(expected, (40, BATCH, frames)))
  # Velocities: within the window, and into its first frame from a previous frame the denoiser
  # saw: examples 0 and 1 unless drawn to start from the start (`previous_drop_probability` of
  # the draws), never example 2 (its previous frames are padding: the start stood in for them).
  velocity = np.asarray(aux["velocity_mask"])  # [draws, B, T - 1]
  within = expected[:, 1:] & expected[:, :-1]
  boundary = PREVIOUS - 1
  np.testing.assert_array_equal(
    np.delete(velocity, boundary, axis=2), np.delete(within, boundary, 1)[None].repeat(40, 0)
  )
  assert not velocity[:, 2].any()
  seen = velocity[:, :2, boundary]
  assert 0.3 < 1.0 - seen.mean() < 0.7, seen.mean()


def test_windowed_projected_sampling_and_per_example_seeds(windowed):
  """The chain in the denoiser's projection samples what the chain on x_t does with previous
  frames too (their projection is not replaced), and per-example seeds make an example's
  windows its own."""
  decoder, params, style, _, _ = windowed
  frames = 10
  rng = np.random.default_rng(10)
  audio = jnp.asarray(rng.normal(size=(BATCH, frames, AUDIO_DIM)), jnp.float32)
  template = jnp.zeros((BATCH, NUM_VERTICES, 3))
  scales = jnp.asarray([[1.0, 1.0], [2.0, 3.0], [0.5, 1.0]])

  @functools.partial(jax.jit, static_argnames="projected")
  def sample(seed, projected):
    return decoder.clone(projected_sampling=projected).apply(
      {"params": params},
      audio,
      template,
      style,
      method="generate",
      guidance_scales=scales,
      seed=seed,
    )[0]

  seeds = jnp.asarray([4, 5, 6])
  projected = sample(seeds, True)
  np.testing.assert_allclose(projected, sample(seeds, False), atol=1e-6)
  # Another seed for example 0 changes its windows and leaves the other examples' alone.
  other = sample(jnp.asarray([7, 5, 6]), True)
  np.testing.assert_allclose(other[1:], projected[1:], atol=1e-6)
  assert float(jnp.abs(other[0] - projected[0]).max()) * decoder.sample_scale > 1e-2
