"""FaceFormer's autoregressive training: the rollout with a key/value cache (and its reverse-scan
gradient) against the naive algorithm of FaceFormer's `main.py`, which re-runs the decoder over
the growing prefix of its own predictions at every frame and back-propagates through all of it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.models import losses
from fdjax.models.motion_decoders import FaceFormerDecoder

NUM_VERTICES = 8
AUDIO_DIM = 5


def _model(**fields) -> FaceFormerDecoder:
  fields = {"num_vertices": NUM_VERTICES, "num_layers": 2, "training": "autoregressive", **fields}
  return FaceFormerDecoder.from_variant("tiny", **fields)


def _inputs(batch: int, frames: int, lengths: list[int], num_vertices: int = NUM_VERTICES):
  rng = np.random.default_rng(0)
  audio = rng.normal(size=(batch, frames, AUDIO_DIM))
  template = rng.normal(size=(batch, num_vertices, 3))
  vertices = template[:, None] + 0.1 * rng.normal(size=(batch, frames, num_vertices, 3))
  frame_mask = np.arange(frames)[None] < np.asarray(lengths)[:, None]
  style = np.arange(batch) % 3
  return (
    jnp.asarray(audio, jnp.float32),
    jnp.asarray(template, jnp.float32),
    jnp.asarray(style, jnp.int32),
    jnp.asarray(vertices, jnp.float32),
    jnp.asarray(frame_mask),
  )


def _random_params(model, audio, template, style, vertices, seed=1):
  """Random weights of the model's shapes; the zero-initialised output layer made non-zero."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), audio, template, style, vertices))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    value = 0.3 * rng.normal(size=shape.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = value + 1.0
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes)["params"])


def _loss(predicted, vertices, frame_mask):
  return losses.vertex_mse(predicted, vertices, frame_mask) + losses.velocity_mse(
    predicted, vertices, frame_mask
  )


def _naive_predict(model, params, audio, template, style, frame_mask):
  """FaceFormer's non-teacher-forced loop: frame i re-runs the decoder over the inputs of frames
  0..i (the condition, then the embedded predictions), and the last run's outputs are used."""
  num_frames = frame_mask.shape[1]

  def run(decoder):
    memory, condition = decoder._prepare(audio, template, style, None, None, num_frames)
    inputs = condition[:, None]  # [B, 1, D]
    for i in range(num_frames):
      offsets = decoder._decode_sequence(inputs, memory[:, : i + 1], train=False)
      following = decoder._embed_offsets(offsets[:, -1]) + condition
      inputs = jnp.concatenate([inputs, following[:, None]], axis=1)
    return decoder._to_vertices(offsets, template, frame_mask)[0]

  return nn.apply(run, model)({"params": params})


@pytest.mark.parametrize(
  "batch, lengths", [(1, [6]), (3, [6, 3, 5])], ids=["batch1", "padded_batch3"]
)
def test_autoregressive_loss_and_gradients_equal_rerunning_the_prefix(batch, lengths):
  model = _model()
  audio, template, style, vertices, frame_mask = _inputs(batch, 6, lengths)
  params = _random_params(model, audio, template, style, vertices)

  def rollout_loss(params, audio):
    predicted, _ = model.apply(
      {"params": params}, audio, template, style, vertices, frame_mask=frame_mask
    )
    return _loss(predicted, vertices, frame_mask)

  def naive_loss(params, audio):
    predicted = _naive_predict(model, params, audio, template, style, frame_mask)
    return _loss(predicted, vertices, frame_mask)

  loss, (grads, audio_grad) = jax.jit(jax.value_and_grad(rollout_loss, argnums=(0, 1)))(
    params, audio
  )
  naive, (naive_grads, naive_audio_grad) = jax.jit(jax.value_and_grad(naive_loss, argnums=(0, 1)))(
    params, audio
  )
  np.testing.assert_allclose(loss, naive, rtol=1e-5)
  # The rollout is not teacher forcing: its loss differs from the teacher-forced one.
  teacher_forced = model.clone(training="teacher_forcing")
  predicted, _ = teacher_forced.apply(
    {"params": params}, audio, template, style, vertices, frame_mask=frame_mask
  )
  assert abs(float(_loss(predicted, vertices, frame_mask)) - float(loss)) > 1e-3 * float(loss)
  # Within 1e-5 of the largest gradient (some are zero in exact arithmetic: key biases, and
  # the cross-attention's queries and keys over one aligned audio frame; both give float noise).
  scale = max(float(jnp.max(jnp.abs(n))) for n in jax.tree.leaves(naive_grads))
  flat, naive_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(naive_grads)
  assert len(flat) == len(naive_flat)
  for (path, g), n in zip(flat, naive_flat, strict=True):
    np.testing.assert_allclose(
      g, n, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)
    )
  assert float(jnp.max(jnp.abs(grads["vertex_embedding"]["kernel"]))) > 1e-3 * scale
  scale = float(jnp.max(jnp.abs(naive_audio_grad)))
  np.testing.assert_allclose(audio_grad / scale, naive_audio_grad / scale, atol=1e-5)
  if batch > 1:
    # Padded frames neither contribute nor receive gradient through the audio.
    assert float(jnp.max(jnp.abs(audio_grad[1, 3:]))) == 0.0


def test_scheduled_sampling_at_probability_one_is_teacher_forcing_and_zero_is_autoregressive():
  model = _model(training="scheduled_sampling")
  audio, template, style, vertices, frame_mask = _inputs(2, 6, [6, 6])
  params = _random_params(model, audio, template, style, vertices)

  def run(module, probability):
    return module.apply(
      {"params": params},
      audio,
      template,
      style,
      vertices,
      truth_probability=probability,
      rngs={"dropout": jax.random.key(3)},
    )[0]

  teacher_forced = run(model.clone(training="teacher_forcing"), None)
  autoregressive = run(model.clone(training="autoregressive"), None)
  np.testing.assert_allclose(run(model, 1.0), teacher_forced, atol=1e-5)
  np.testing.assert_allclose(run(model, 0.0), autoregressive, atol=1e-6)
  mixed = run(model, 0.5)
  assert float(jnp.max(jnp.abs(mixed - teacher_forced))) > 1e-4
  assert float(jnp.max(jnp.abs(mixed - autoregressive))) > 1e-4


def test_recomputed_gradient_with_dropout_equals_autodiff_through_the_rollout():
  """Dropout draws per frame from the same folded key in the forward and the reverse pass."""
  model = _model(dropout_rate=0.3)
  audio, template, style, vertices, frame_mask = _inputs(2, 5, [5, 3])
  params = _random_params(model, audio, template, style, vertices)

  def gradients(module):
    def loss(params, audio):
      predicted, _ = module.apply(
        {"params": params},
        audio,
        template,
        style,
        vertices,
        frame_mask=frame_mask,
        train=True,
        rngs={"dropout": jax.random.key(7)},
      )
      return _loss(predicted, vertices, frame_mask)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, audio)

  loss, grads = gradients(model)
  reference_loss, reference = gradients(model.clone(rollout_gradient="autodiff"))
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reference))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale)
  # Dropout is on: the same model without it gives another loss.
  no_dropout, _ = gradients(model.clone(dropout_rate=0.0))
  assert abs(float(no_dropout) - float(loss)) > 1e-3 * float(loss)


def test_rollout_memory_grows_linearly_with_frames():
  """The compiled gradient's temporary memory: no per-frame copies of the caches."""
  model = _model(num_vertices=64)
  sizes = {}
  for frames in (60, 300):
    audio, template, style, vertices, frame_mask = _inputs(1, frames, [frames], num_vertices=64)
    init = jax.eval_shape(model.init, jax.random.key(0), audio, template, style, vertices)
    params = nn.meta.unbox(init)["params"]

    for gradient in ("recompute", "autodiff"):
      module = model.clone(rollout_gradient=gradient)

      def loss(
        params, module=module, audio=audio, template=template, style=style, vertices=vertices
      ):
        predicted, _ = module.apply({"params": params}, audio, template, style, vertices)
        return jnp.mean((predicted - vertices) ** 2)

      compiled = jax.jit(jax.grad(loss)).lower(params).compile()
      sizes[gradient, frames] = compiled.memory_analysis().temp_size_in_bytes
  assert sizes["recompute", 300] < 6 * sizes["recompute", 60], sizes
  # jax's own scan gradient keeps every frame's caches: quadratic.
  assert sizes["autodiff", 300] > 10 * sizes["autodiff", 60], sizes
