"""Rigid transforms and their errors: Kabsch/Procrustes, and the stabilisation metrics.

A rigid transform is a `[..., 4, 4]` homogeneous matrix acting on column vectors, `x -> R x + t`
(`R = T[..., :3, :3]`, `t = T[..., :3, 3]`, last row `0 0 0 1`); points are `[..., N, 3]` in
metres. The stabilize task's target `transform [B, 4, 4]` takes mesh A's skull onto mesh B's
(docs/design.md section 19).

Metrics (docs/design.md section 5), each per pair `[...]`, to be averaged by the caller:

- rotation error: the angle of `R_pred^T R_true`, in degrees (`atan2(|axis|, cos)` of the
  relative rotation, accurate at small angles where `arccos` of the trace is not);
- translation error: `|t_pred - t_true|` in mm (it depends on where the frame's origin is;
  the skull vertex error does not);
- skull vertex error: the mean over the points of a named region (the rigid skull region of
  mesh A) of `|T_pred x - T_true x|`, in mm.

`kabsch(source, target, weights)` is the weighted least-squares rigid transform (Procrustes
without scale), used by the Procrustes baselines and inside the learned stabiliser. Everything
is written with `jax.numpy` (jit, vmap and grad apply); numpy inputs work too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MM_PER_METRE = 1000.0


def make_transform(rotation: Array, translation: Array) -> Array:
  """`rotation [..., 3, 3]`, `translation [..., 3]` -> `transform [..., 4, 4]`."""
  rotation, translation = jnp.asarray(rotation), jnp.asarray(translation)
  top = jnp.concatenate([rotation, translation[..., :, None]], axis=-1)  # [..., 3, 4]
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], top.dtype), (*top.shape[:-2], 1, 4))
  return jnp.concatenate([top, bottom], axis=-2)


def apply_transform(transform: Array, points: Array) -> Array:
  """`transform [..., 4, 4]` applied to `points [..., N, 3]` -> `[..., N, 3]`."""
  transform = jnp.asarray(transform)
  return (
    jnp.einsum("...ij,...nj->...ni", transform[..., :3, :3], points) + transform[..., None, :3, 3]
  )


def invert_transform(transform: Array) -> Array:
  """The inverse of a rigid `transform [..., 4, 4]`: `x -> R^T (x - t)`."""
  transform = jnp.asarray(transform)
  rotation_t = jnp.swapaxes(transform[..., :3, :3], -1, -2)
  return make_transform(
    rotation_t, -jnp.einsum("...ij,...j->...i", rotation_t, transform[..., :3, 3])
  )


def kabsch(source: Array, target: Array, weights: Array | None = None) -> Array:
  """The rigid transform minimising `sum_n w_n |T source_n - target_n|^2`: `[..., 4, 4]`.

  Args:
    source, target: `[..., N, 3]` corresponding points.
    weights: `[..., N]` non-negative (a mask: 0 leaves a point out); None for all ones. At
      least three non-collinear points need positive weight.

  The rotation is `V diag(1, 1, d) U^T` from the SVD `U S V^T` of the weighted covariance, `d`
  the sign that makes it a proper rotation (no reflection).
  """
  source, target = jnp.asarray(source, jnp.float32), jnp.asarray(target, jnp.float32)
  if weights is None:
    weights = jnp.ones(source.shape[:-1], source.dtype)
  weights = jnp.asarray(weights, source.dtype)[..., None]  # [..., N, 1]
  total = jnp.maximum(jnp.sum(weights, axis=-2, keepdims=True), 1e-12)
  source_mean = jnp.sum(weights * source, axis=-2, keepdims=True) / total  # [..., 1, 3]
  target_mean = jnp.sum(weights * target, axis=-2, keepdims=True) / total
  covariance = jnp.einsum(
    "...ni,...nj->...ij", weights * (source - source_mean), target - target_mean
  )  # [..., 3, 3]
  u, _, vh = jnp.linalg.svd(covariance)
  sign = jnp.sign(jnp.linalg.det(jnp.einsum("...ij,...jk->...ik", u, vh)))
  sign = jnp.where(sign == 0, 1.0, sign)
  correction = jnp.stack([jnp.ones_like(sign), jnp.ones_like(sign), sign], axis=-1)
  rotation = jnp.einsum("...ji,...j,...kj->...ik", vh, correction, u)  # V diag(1,1,d) U^T
  translation = target_mean[..., 0, :] - jnp.einsum(
    "...ij,...j->...i", rotation, source_mean[..., 0, :]
  )
  return make_transform(rotation, translation)


def rotation_error_deg(predicted: Array, truth: Array) -> Array:
  """Angle of `R_pred^T R_true` in degrees, per transform: `[..., 4, 4]` x2 -> `[...]`."""
  relative = jnp.einsum(
    "...ji,...jk->...ik", jnp.asarray(predicted)[..., :3, :3], jnp.asarray(truth)[..., :3, :3]
  )
  cosine = (jnp.trace(relative, axis1=-2, axis2=-1) - 1.0) / 2.0
  skew = jnp.stack(
    [
      relative[..., 2, 1] - relative[..., 1, 2],
      relative[..., 0, 2] - relative[..., 2, 0],
      relative[..., 1, 0] - relative[..., 0, 1],
    ],
    axis=-1,
  )  # 2 sin(angle) times the axis
  sine = jnp.linalg.norm(skew, axis=-1) / 2.0
  return jnp.degrees(jnp.arctan2(sine, cosine))


def translation_error_mm(predicted: Array, truth: Array) -> Array:
  """`|t_pred - t_true|` in mm (translations in metres): `[..., 4, 4]` x2 -> `[...]`."""
  difference = jnp.asarray(predicted)[..., :3, 3] - jnp.asarray(truth)[..., :3, 3]
  return MM_PER_METRE * jnp.linalg.norm(difference, axis=-1)


def skull_vertex_error_mm(predicted: Array, truth: Array, points: Array) -> Array:
  """Mean over `points [..., N, 3]` (a skull region, metres) of `|T_pred x - T_true x|` in mm.

  `[..., 4, 4]` x2 -> `[...]`.
  """
  difference = apply_transform(predicted, points) - apply_transform(truth, points)
  return MM_PER_METRE * jnp.mean(jnp.linalg.norm(difference, axis=-1), axis=-1)
