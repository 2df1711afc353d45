"""Tests for the masked vertex, velocity and latent losses: exact under padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.models.losses import latent_mse, region_weights, velocity_mse, vertex_mse

NUM_VERTICES = 5
LENGTHS = (6, 3, 1)


def _padded_batch(seed=0, padding_value=np.nan):
  """Three sequences of LENGTHS, padded to the longest with `padding_value`."""
  rng = np.random.default_rng(seed)
  longest = max(LENGTHS)
  pred = rng.normal(size=(len(LENGTHS), longest, NUM_VERTICES, 3)).astype(np.float32)
  truth = rng.normal(size=pred.shape).astype(np.float32)
  frame_mask = np.zeros(pred.shape[:2], bool)
  for index, length in enumerate(LENGTHS):
    frame_mask[index, :length] = True
    truth[index, length:] = padding_value
    pred[index, length:] = -padding_value
  return pred, truth, frame_mask


def _unpadded(array, frame_mask):
  return [array[index, : int(frame_mask[index].sum())] for index in range(len(array))]


def test_vertex_mse_of_a_hand_computed_example():
  pred = jnp.zeros((1, 2, 2, 3))
  truth = jnp.ones((1, 2, 2, 3)).at[0, 1, 1].set(3.0)
  # Squared errors: 1 on 9 coordinates, 9 on 3: mean (9 + 27) / 12 = 3.
  assert float(vertex_mse(pred, truth)) == pytest.approx(3.0)
  weights = jnp.array([1.0, 0.0])  # only vertex 0 counts
  assert float(vertex_mse(pred, truth, region_weights=weights)) == pytest.approx(1.0)


def test_vertex_mse_under_padding_equals_the_unpadded_sequences_pooled():
  pred, truth, frame_mask = _padded_batch()
  expected = np.mean(
    np.concatenate(
      [(p - t) ** 2 for p, t in zip(_unpadded(pred, frame_mask), _unpadded(truth, frame_mask))]
    )
  )
  loss = vertex_mse(jnp.asarray(pred), jnp.asarray(truth), jnp.asarray(frame_mask))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_velocity_mse_under_padding_equals_the_unpadded_sequences_pooled():
  pred, truth, frame_mask = _padded_batch()
  velocity_errors = [
    (np.diff(p, axis=0) - np.diff(t, axis=0)) ** 2
    for p, t in zip(_unpadded(pred, frame_mask), _unpadded(truth, frame_mask))
  ]
  expected = np.mean(np.concatenate(velocity_errors))  # the length-1 sequence adds no pair
  loss = velocity_mse(jnp.asarray(pred), jnp.asarray(truth), jnp.asarray(frame_mask))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_region_weighted_losses_are_weighted_means_over_vertices():
  pred, truth, frame_mask = _padded_batch(padding_value=1e6)
  lips = [1, 3]
  weights = region_weights(NUM_VERTICES, lips, 4.0)
  np.testing.assert_array_equal(weights, [1, 4, 1, 4, 1])
  squared = np.concatenate(
    [
      ((p - t) ** 2).sum(-1)
      for p, t in zip(_unpadded(pred, frame_mask), _unpadded(truth, frame_mask))
    ]
  )  # [frames, V]
  expected = (squared * weights).sum() / (len(squared) * weights.sum() * 3)
  loss = vertex_mse(pred, truth, frame_mask, region_weights=jnp.asarray(weights))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  ones = jnp.ones(NUM_VERTICES)
  for loss_fn in (vertex_mse, velocity_mse):
    np.testing.assert_allclose(
      float(loss_fn(pred, truth, frame_mask, region_weights=ones)),
      float(loss_fn(pred, truth, frame_mask)),
      rtol=1e-6,
    )


@pytest.mark.parametrize("loss_fn", [vertex_mse, velocity_mse])
def test_padded_frames_get_exactly_zero_gradient(loss_fn):
  pred, truth, frame_mask = _padded_batch()  # NaN in the padding of both
  gradient = jax.grad(lambda p: loss_fn(p, jnp.asarray(truth), jnp.asarray(frame_mask)))(
    jnp.asarray(pred)
  )
  assert bool(jnp.all(jnp.isfinite(gradient)))
  np.testing.assert_array_equal(np.asarray(gradient)[~frame_mask], 0.0)
  assert float(jnp.max(jnp.abs(gradient[frame_mask]))) > 0


def test_latent_mse_under_padding_equals_the_unpadded_sequences_pooled():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
  truth = rng.normal(size=pred.shape).astype(np.float32)
  frame_mask = np.array([[True] * 4, [True, True, False, False]])
  truth[1, 2:] = np.nan
  expected = np.mean(np.concatenate([(pred[0] - truth[0]) ** 2, (pred[1, :2] - truth[1, :2]) ** 2]))
  np.testing.assert_allclose(float(latent_mse(pred, truth, frame_mask)), expected, rtol=1e-6)


def test_bad_shapes_raise_clear_errors():
  pred = jnp.zeros((1, 4, NUM_VERTICES, 3))
  with pytest.raises(ValueError, match="cut the prediction to the truth's length"):
    vertex_mse(pred, jnp.zeros((1, 3, NUM_VERTICES, 3)))
  with pytest.raises(ValueError, match="frame_mask must be"):
    velocity_mse(pred, pred, jnp.ones((1, 3), bool))
  with pytest.raises(ValueError, match="region_weights must be"):
    vertex_mse(pred, pred, region_weights=jnp.ones(3))
  with pytest.raises(ValueError, match="region_vertex_indices must lie in"):
    region_weights(NUM_VERTICES, [7], 2.0)
