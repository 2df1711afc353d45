"""Tests for the CodeTalker-style motion VQ-VAE (stage 1) and code predictor (stage 2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdjax.models.codetalker import CodePredictor, MotionVQVAE, VectorQuantizer
from fdjax.models.losses import latent_mse, vertex_mse

NUM_VERTICES = 8
FRAMES = 8
AUDIO_DIM = 5


def _key():
  return jax.random.key(0, impl="unsafe_rbg")  # cheaper to compile than threefry


def _toy_batch():
  """Two sequences of one sinusoidal mouth-like motion; the second padded after 6 frames."""
  rng = np.random.default_rng(0)
  template = rng.normal(size=(2, NUM_VERTICES, 3))
  basis = rng.normal(size=(NUM_VERTICES, 3))
  phase = np.sin(np.linspace(0, 2 * np.pi, FRAMES))[None, :, None, None]
  direction = np.array([1.0, -1.0])[:, None, None, None]
  vertices = template[:, None] + 0.5 * phase * direction * basis
  frame_mask = np.array([[True] * FRAMES, [True] * 6 + [False] * 2])
  return (
    jnp.asarray(vertices, jnp.float32),
    jnp.asarray(template, jnp.float32),
    jnp.asarray(frame_mask),
  )


@pytest.fixture(scope="module")
def vqvae():
  model = MotionVQVAE.from_variant("tiny", num_vertices=NUM_VERTICES)
  vertices, template, frame_mask = _toy_batch()
  variables = jax.jit(lambda key: model.init(key, vertices, template, frame_mask))(_key())
  return model, nn.meta.unbox(variables)


def test_vqvae_forward_shapes_and_codebook_statistics(vqvae):
  model, variables = vqvae
  vertices, template, frame_mask = _toy_batch()
  reconstruction, aux = jax.jit(lambda v: model.apply(v, vertices, template, frame_mask))(variables)
  assert reconstruction.shape == vertices.shape
  assert aux["latents"].shape == (2, FRAMES, model.tokens_per_frame, model.code_dim)
  assert aux["quantized"].shape == aux["latents"].shape
  assert aux["codes"].shape == (2, FRAMES, model.tokens_per_frame)
  assert aux["codes"].dtype == jnp.int32
  assert 1.0 <= float(aux["perplexity"]) <= model.codebook_size
  usage = float(aux["codebook_usage"])
  assert 0.0 < usage <= 1.0
  # Usage is the fraction of entries hit by valid tokens.
  valid_codes = np.asarray(aux["codes"])[np.asarray(frame_mask)]
  assert usage == pytest.approx(len(np.unique(valid_codes)) / model.codebook_size)
  assert float(aux["vq_loss"]) == pytest.approx(
    float(aux["codebook_loss"] + aux["commitment_loss"]), rel=1e-6
  )
  np.testing.assert_array_equal(reconstruction[1, 6:], jnp.broadcast_to(template[1], (2, 8, 3)))


def test_quantizer_picks_the_nearest_entry_and_passes_gradients_straight_through():
  quantizer = VectorQuantizer(codebook_size=6, code_dim=3)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.normal(size=(4, 5, 3)) * 0.2, jnp.float32)
  variables = nn.meta.unbox(jax.jit(lambda key: quantizer.init(key, latents))(_key()))
  codebook = np.asarray(variables["params"]["codebook"])
  quantized, aux = jax.jit(quantizer.apply)(variables, latents)
  distances = ((np.asarray(latents)[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(aux["codes"], distances.argmin(-1))
  np.testing.assert_allclose(quantized, codebook[distances.argmin(-1)], atol=1e-7)
  # Straight through: d(sum(quantized * w)) / d(latents) = w.
  weights = jnp.asarray(rng.normal(size=latents.shape), jnp.float32)
  gradient = jax.jit(jax.grad(lambda z: jnp.sum(quantizer.apply(variables, z)[0] * weights)))(
    latents
  )
  np.testing.assert_allclose(gradient, weights, atol=1e-6)


def test_reconstruction_gradient_reaches_the_encoder_through_the_codebook(vqvae):
  model, variables = vqvae
  vertices, template, frame_mask = _toy_batch()

  def reconstruction_loss(params):
    reconstruction, _ = model.apply({"params": params}, vertices, template, frame_mask)
    return vertex_mse(reconstruction, vertices, frame_mask)

  def vq_loss(params):
    return model.apply({"params": params}, vertices, template, frame_mask)[1]["vq_loss"]

  gradients = jax.jit(jax.grad(reconstruction_loss))(variables["params"])
  assert float(jnp.max(jnp.abs(gradients["encoder_stem"]["embedding"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(gradients["latent_projection"]["kernel"]))) > 0
  codebook_gradient = jax.jit(jax.grad(vq_loss))(variables["params"])["quantizer"]["codebook"]
  assert float(jnp.max(jnp.abs(codebook_gradient))) > 0


def test_vqvae_valid_frames_do_not_depend_on_padding(vqvae):
  model, variables = vqvae
  vertices, template, frame_mask = _toy_batch()
  apply = jax.jit(lambda v, m: model.apply(variables, v, template, m)[0])
  padded = apply(vertices.at[1, 6:].set(50.0), frame_mask)
  reference = apply(vertices, jnp.ones_like(frame_mask).at[1, 6:].set(False))
  np.testing.assert_allclose(padded, reference, atol=1e-6)
  alone, _ = jax.jit(lambda v: model.apply(v, vertices[1:, :6], template[1:]))(variables)
  np.testing.assert_allclose(padded[1, :6], alone[0], atol=1e-5)


def test_a_few_optax_steps_reduce_the_reconstruction_loss(vqvae):
  model, variables = vqvae
  vertices, template, frame_mask = _toy_batch()
  params = variables["params"]
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  def loss_fn(params):
    reconstruction, aux = model.apply(
      {"params": params}, vertices, template, frame_mask, train=True
    )
    reconstruction_loss = vertex_mse(reconstruction, vertices, frame_mask)
    return reconstruction_loss + aux["vq_loss"], reconstruction_loss

  @jax.jit
  def train_step(params, opt_state):
    grads, reconstruction_loss = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, reconstruction_loss

  losses = []
  for _ in range(30):
    params, opt_state, reconstruction_loss = train_step(params, opt_state)
    losses.append(float(reconstruction_loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.25 * losses[0]


def test_ema_codebook_updates_only_when_its_collection_is_mutable():
  model = MotionVQVAE.from_variant("tiny", num_vertices=NUM_VERTICES, ema_decay=0.9)
  vertices, template, frame_mask = _toy_batch()
  variables = nn.meta.unbox(
    jax.jit(lambda key: model.init(key, vertices, template, frame_mask))(_key())
  )
  assert "quantizer" not in variables["params"]  # the EMA codebook is not a parameter
  ema = variables["vq_ema"]["quantizer"]
  assert set(ema) == {"codebook", "cluster_size", "embed_sum"}

  @jax.jit
  def train_forward(variables):
    (_, aux), updated = model.apply(
      variables, vertices, template, frame_mask, train=True, mutable=["vq_ema"]
    )
    return aux, nn.meta.unbox(updated)

  aux, updated = train_forward(variables)
  assert float(aux["codebook_loss"]) == 0.0 and float(aux["commitment_loss"]) > 0
  new = updated["vq_ema"]["quantizer"]
  used = np.unique(np.asarray(aux["codes"])[np.asarray(frame_mask)])
  unused = np.setdiff1d(np.arange(model.codebook_size), used)
  # Used entries move towards their latents; with no assignments an entry keeps its value.
  assert not np.allclose(new["codebook"][used], ema["codebook"][used])
  np.testing.assert_allclose(new["codebook"][unused], ema["codebook"][unused], rtol=1e-4)
  np.testing.assert_allclose(
    np.sum(new["cluster_size"]),
    np.sum(ema["cluster_size"]) * 0.9 + 0.1 * frame_mask.sum() * model.tokens_per_frame,
    rtol=1e-5,
  )
  # Without a mutable collection (evaluation) nothing changes and nothing fails.
  _, aux_eval = jax.jit(
    lambda variables: model.apply(variables, vertices, template, frame_mask, train=True)
  )(variables)
  np.testing.assert_array_equal(aux_eval["codes"], aux["codes"])


def _predictor_inputs(audio_frames_per_frame=1):
  vertices, template, frame_mask = _toy_batch()
  rng = np.random.default_rng(1)
  audio = rng.normal(size=(2, FRAMES * audio_frames_per_frame, AUDIO_DIM))
  return jnp.asarray(audio, jnp.float32), template, jnp.array([0, 2]), vertices, frame_mask


def _random_predictor_params(model, prior_variables, *args, **kwargs):
  """Random parameters of the predictor's shapes, with the given stage-1 model as its prior."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(2)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32),
    nn.meta.unbox(shapes)["params"],
  )
  # The stage-1 parameters drop in under "prior/".
  assert jax.tree.structure(params["prior"]) == jax.tree.structure(prior_variables["params"])
  return {**params, "prior": prior_variables["params"]}


def test_code_predictor_outputs_and_targets(vqvae):
  prior, prior_variables = vqvae
  model = CodePredictor.from_variant("tiny", prior=prior)
  audio, template, style, vertices, frame_mask = _predictor_inputs()
  params = _random_predictor_params(model, prior_variables, audio, template, style, vertices)

  @jax.jit
  def run(params):
    predicted, aux = model.apply(
      {"params": params}, audio, template, style, vertices, frame_mask=frame_mask
    )
    _, stage1_aux = prior.apply(prior_variables, vertices, template, frame_mask)
    return predicted, aux, stage1_aux["quantized"]

  predicted, aux, stage1_quantized = run(params)
  tokens, code_dim = prior.tokens_per_frame, prior.code_dim
  assert predicted.shape == vertices.shape
  assert aux["latents"].shape == (2, FRAMES, tokens, code_dim)
  assert aux["code_logits"].shape == (2, FRAMES, tokens, prior.codebook_size)
  assert aux["codes"].shape == aux["target_codes"].shape == (2, FRAMES, tokens)
  np.testing.assert_array_equal(aux["codes"], jnp.argmax(aux["code_logits"], axis=-1))
  # The targets are the stage-1 model's own quantised latents of the truth.
  np.testing.assert_allclose(aux["target_latents"], stage1_quantized, atol=1e-6)
  # Decoding the predicted codes with the stage-1 decoder gives the prediction.
  decoded, _ = jax.jit(
    lambda codes: prior.apply(prior_variables, codes, template, frame_mask, method="decode_codes")
  )(aux["codes"])
  np.testing.assert_allclose(decoded, predicted, atol=1e-5)


def test_code_predictor_generate_for_two_audio_features_per_frame(vqvae):
  prior, prior_variables = vqvae
  model = CodePredictor.from_variant("tiny", prior=prior, audio_frames_per_frame=2)
  audio, template, style, vertices, _ = _predictor_inputs(audio_frames_per_frame=2)
  params = _random_predictor_params(model, prior_variables, audio, template, style, vertices)
  generated, aux = jax.eval_shape(
    lambda: model.apply({"params": params}, audio, template, style, method="generate")
  )
  assert generated.shape == vertices.shape
  assert aux["codes"].shape == (2, FRAMES, prior.tokens_per_frame)


def test_code_predictor_loss_trains_the_predictor_through_the_frozen_decoder(vqvae):
  prior, prior_variables = vqvae
  model = CodePredictor.from_variant("tiny", prior=prior)
  audio, template, style, vertices, frame_mask = _predictor_inputs()
  params = _random_predictor_params(model, prior_variables, audio, template, style, vertices)

  def loss_fn(params):
    predicted, aux = model.apply(
      {"params": params}, audio, template, style, vertices, frame_mask=frame_mask
    )
    return vertex_mse(predicted, vertices, frame_mask) + latent_mse(
      aux["latents"], aux["target_latents"], frame_mask
    )

  gradient_fn = jax.jit(jax.grad(loss_fn))
  gradients = gradient_fn(params)
  assert (
    float(jnp.max(jnp.abs(gradients["encoder"]["layer_0"]["feed_forward"]["wi"]["kernel"]))) > 0
  )
  # The zero-initialised head (CodeTalker's) still gets a gradient at the start of training.
  params["latent_projection"]["kernel"] = jnp.zeros_like(params["latent_projection"]["kernel"])
  gradients = gradient_fn(params)
  assert float(jnp.max(jnp.abs(gradients["latent_projection"]["kernel"]))) > 0


def test_variants_and_errors():
  vocaset = MotionVQVAE.from_variant("vocaset")
  assert (vocaset.tokens_per_frame, vocaset.code_dim, vocaset.codebook_size) == (16, 64, 256)
  biwi = CodePredictor.from_variant("biwi")
  assert biwi.prior.num_vertices == 23370 and biwi.audio_frames_per_frame == 2
  assert CodePredictor.from_variant("tiny", prior=dict(codebook_size=7)).prior.codebook_size == 7
  with pytest.raises(ValueError, match="unknown MotionVQVAE variant"):
    MotionVQVAE.from_variant("huge")
  quantizer = VectorQuantizer(codebook_size=4, code_dim=3)
  with pytest.raises(ValueError, match="code_dim=3"):
    jax.eval_shape(lambda: quantizer.init(jax.random.key(0), jnp.zeros((2, 5))))
