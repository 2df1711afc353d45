"""Training losses for speech-driven mesh animation.

Where this sits: a task's `loss_fn` calls a motion decoder (`fdjax/models/motion_decoders.py`,
`fdjax/models/codetalker.py`) and compares its `vertices [B, T, V, 3]` with the captured ones
here. Evaluation metrics (LVE, FDD, MVE) live in `fdjax/metrics/`, not here.

All losses are masked means that are exact under padding: every valid frame (or valid pair of
consecutive frames, for velocities) of every sequence counts once, pooled over the batch, so a
padded batch gives the same value as the unpadded sequences concatenated, whatever the padding
holds (even NaN), and padded positions get exactly zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _frame_mask(frame_mask: Array | None, pred: Array) -> Array:
  if frame_mask is None:
    return jnp.ones(pred.shape[:2], bool)
  if frame_mask.shape != pred.shape[:2]:
    raise ValueError(
      f"frame_mask must be [B, T]={tuple(pred.shape[:2])}, got {tuple(frame_mask.shape)}"
    )
  return frame_mask.astype(bool)


def _check_shapes(pred: Array, truth: Array, region_weights: Array | None) -> None:
  if pred.ndim != 4 or pred.shape[-1] != 3:
    raise ValueError(f"pred must be [B, T, V, 3], got {tuple(pred.shape)}")
  if truth.shape != pred.shape:
    raise ValueError(
      f"truth must match pred's shape {tuple(pred.shape)}, got {tuple(truth.shape)}; cut the "
      "prediction to the truth's length first"
    )
  if region_weights is not None and region_weights.shape != (pred.shape[2],):
    raise ValueError(
      f"region_weights must be [V]=({pred.shape[2]},), got {tuple(region_weights.shape)}"
    )


def _weighted_mean(squared_error: Array, valid: Array, region_weights: Array | None) -> Array:
  """Mean of `squared_error [B, T, V]` over valid `[B, T]` entries, vertices weighted."""
  if region_weights is None:
    region_weights = jnp.ones(squared_error.shape[-1], jnp.float32)
  region_weights = region_weights.astype(jnp.float32)
  per_frame = jnp.einsum("btv,v->bt", squared_error, region_weights)  # [B, T]
  total = jnp.sum(jnp.where(valid, per_frame, 0.0))
  normaliser = jnp.sum(valid) * jnp.sum(region_weights) * 3.0
  return total / jnp.maximum(normaliser, 1e-12)


def vertex_mse(
  pred: Array,
  truth: Array,
  frame_mask: Array | None = None,
  region_weights: Array | None = None,
) -> Array:
  """Mean squared vertex error over valid frames, vertices and coordinates.

  Without weights this is FaceFormer's `MSELoss` on `[T, V*3]` pooled over every valid frame of
  the batch. With `region_weights [V]` it is the weighted mean `sum_v w_v e_v / sum_v w_v`, so
  weights of all ones give the plain mean and a lip weight above one stresses the mouth
  (see `region_weights`).

  Args:
    pred: `[B, T, V, 3]` predicted vertices (or offsets).
    truth: `[B, T, V, 3]` captured vertices (or offsets), same length as `pred`.
    frame_mask: `[B, T]` bool, True on real frames; default all.
    region_weights: `[V]` non-negative vertex weights; default all ones.

  Returns:
    scalar float32.
  """
  _check_shapes(pred, truth, region_weights)
  valid = _frame_mask(frame_mask, pred)
  keep = valid[:, :, None, None]
  pred = jnp.where(keep, pred.astype(jnp.float32), 0.0)
  truth = jnp.where(keep, truth.astype(jnp.float32), 0.0)
  squared_error = jnp.sum((pred - truth) ** 2, axis=-1)  # [B, T, V]
  return _weighted_mean(squared_error, valid, region_weights)


def velocity_mse(
  pred: Array,
  truth: Array,
  frame_mask: Array | None = None,
  region_weights: Array | None = None,
) -> Array:
  """Mean squared error of frame-to-frame vertex velocities.

  The velocity of frame `t >= 1` is `x[t] - x[t-1]`; it counts when both frames are valid, so
  no pair straddles the end of a sequence and its padding.

  Args:
    pred: `[B, T, V, 3]`.
    truth: `[B, T, V, 3]`.
    frame_mask: `[B, T]` bool; default all valid.
    region_weights: `[V]` vertex weights, as in `vertex_mse`.

  Returns:
    scalar float32 (0 when no sequence has two valid frames).
  """
  _check_shapes(pred, truth, region_weights)
  valid = _frame_mask(frame_mask, pred)
  keep = valid[:, :, None, None]
  pred = jnp.where(keep, pred.astype(jnp.float32), 0.0)
  truth = jnp.where(keep, truth.astype(jnp.float32), 0.0)
  pair_valid = valid[:, 1:] & valid[:, :-1]  # [B, T-1]
  velocity_error = (pred[:, 1:] - pred[:, :-1]) - (truth[:, 1:] - truth[:, :-1])
  squared_error = jnp.sum(velocity_error**2, axis=-1)  # [B, T-1, V]
  return _weighted_mean(squared_error, pair_valid, region_weights)


def latent_mse(pred: Array, truth: Array, frame_mask: Array | None = None) -> Array:
  """Mean squared error of per-frame latents `[B, T, ...]` over valid frames.

  CodeTalker's stage-2 regression of predicted latents onto the quantised latents of the true
  motion (`CodePredictor` aux `latents` vs `target_latents`).
  """
  if truth.shape != pred.shape or pred.ndim < 2:
    raise ValueError(
      f"pred and truth must share a [B, T, ...] shape, got {tuple(pred.shape)} and "
      f"{tuple(truth.shape)}"
    )
  valid = _frame_mask(frame_mask, pred)
  keep = valid.reshape(valid.shape + (1,) * (pred.ndim - 2))
  error = jnp.where(keep, pred.astype(jnp.float32) - truth.astype(jnp.float32), 0.0)
  per_frame_size = int(np.prod(pred.shape[2:]))
  return jnp.sum(error**2) / jnp.maximum(jnp.sum(valid) * per_frame_size, 1)


def sequence_mean_mse(pred: Array, truth: Array, frame_mask: Array | None = None) -> Array:
  """Squared error of each sequence's time-averaged mesh, averaged over sequences.

  EMOTE's split of the loss supervises emotion at the sequence level: what the face holds over
  the sequence, not when each frame moves. Per sequence, the mean of `pred` and of `truth` over
  its valid frames `[V, 3]`; their squared difference averaged over vertices and coordinates;
  the mean of that over the sequences that have a valid frame.

  Args:
    pred, truth: `[B, T, V, 3]`.
    frame_mask: `[B, T]` bool; default all valid.

  Returns:
    scalar float32.
  """
  _check_shapes(pred, truth, None)
  valid = _frame_mask(frame_mask, pred)
  counts = jnp.sum(valid, axis=1).astype(jnp.float32)  # [B]
  keep = valid[:, :, None, None]

  def average(x):  # [B, T, V, 3] -> [B, V, 3] over valid frames
    return (
      jnp.sum(jnp.where(keep, x.astype(jnp.float32), 0.0), 1)
      / jnp.maximum(counts, 1)[:, None, None]
    )

  per_sequence = jnp.mean((average(pred) - average(truth)) ** 2, axis=(1, 2))  # [B]
  has_frames = counts > 0
  return jnp.sum(jnp.where(has_frames, per_sequence, 0.0)) / jnp.maximum(jnp.sum(has_frames), 1)


def region_weights(
  num_vertices: int,
  region_vertex_indices: Sequence[int] | np.ndarray,
  region_weight: float,
  elsewhere: float = 1.0,
) -> np.ndarray:
  """Vertex weights `[V]`: `region_weight` on the given vertices (e.g. the lips), `elsewhere`
  (1) on the others.

  Region masks are data (docs/design.md section 5): pass the indices loaded from the mask file the
  config names.
  """
  indices = np.asarray(region_vertex_indices, dtype=np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= num_vertices):
    raise ValueError(
      f"region_vertex_indices must lie in [0, {num_vertices}), got range "
      f"[{indices.min()}, {indices.max()}]"
    )
  if region_weight < 0:
    raise ValueError(f"region_weight must be non-negative, got {region_weight}")
  weights = np.full(num_vertices, elsewhere, np.float32)
  weights[indices] = region_weight
  return weights
