"""Tests for fdjax.metrics.rigid: Kabsch and the rigid errors against scipy / direct numpy."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fdjax.metrics import rigid


def _random_transforms(rng, count, max_deg=180.0, translation=0.05):
  rotvec = rng.normal(size=(count, 3))
  rotvec *= (
    np.radians(rng.uniform(0, max_deg, (count, 1))) / np.linalg.norm(rotvec, axis=1)[:, None]
  )
  matrix = np.tile(np.eye(4), (count, 1, 1))
  matrix[:, :3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
  matrix[:, :3, 3] = rng.normal(0, translation, (count, 3))
  return matrix  # [count, 4, 4] float64


def test_rotation_error_is_the_angle_of_the_relative_rotation_as_scipy_gives_it():
  rng = np.random.default_rng(0)
  truth = _random_transforms(rng, 64)
  # Perturbations from 1e-3 degrees (where arccos of the trace loses it in float32) to 179.
  angles = np.concatenate([[1e-3, 1e-2, 0.1], rng.uniform(0, 179, 61)])
  axes = rng.normal(size=(64, 3))
  axes /= np.linalg.norm(axes, axis=1, keepdims=True)
  predicted = truth.copy()
  delta = Rotation.from_rotvec(axes * np.radians(angles)[:, None]).as_matrix()
  predicted[:, :3, :3] = truth[:, :3, :3] @ delta
  expected = np.degrees(
    (
      Rotation.from_matrix(predicted[:, :3, :3]).inv() * Rotation.from_matrix(truth[:, :3, :3])
    ).magnitude()
  )
  np.testing.assert_allclose(expected, angles, atol=1e-6)  # the construction, checked by scipy
  got = np.asarray(rigid.rotation_error_deg(predicted.astype(np.float32), truth.astype(np.float32)))
  np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-4)
  np.testing.assert_allclose(got[:3], angles[:3], rtol=0.05)  # small angles keep their size


def test_translation_and_skull_vertex_errors_are_direct_distances_in_millimetres():
  rng = np.random.default_rng(1)
  predicted, truth = _random_transforms(rng, 8), _random_transforms(rng, 8)
  points = rng.normal(0, 0.08, (8, 50, 3))
  np.testing.assert_allclose(
    rigid.translation_error_mm(predicted, truth),
    1000 * np.linalg.norm(predicted[:, :3, 3] - truth[:, :3, 3], axis=-1),
    rtol=1e-5,
  )
  moved = lambda t: np.einsum("bij,bnj->bni", t[:, :3, :3], points) + t[:, None, :3, 3]
  expected = 1000 * np.linalg.norm(moved(predicted) - moved(truth), axis=-1).mean(-1)
  np.testing.assert_allclose(
    rigid.skull_vertex_error_mm(predicted, truth, points), expected, rtol=1e-4
  )
  assert np.all(np.asarray(rigid.skull_vertex_error_mm(truth, truth, points)) < 1e-3)


def test_transform_helpers_compose_and_invert():
  rng = np.random.default_rng(2)
  transform = _random_transforms(rng, 4).astype(np.float32)
  points = rng.normal(0, 0.1, (4, 10, 3)).astype(np.float32)
  back = rigid.apply_transform(
    rigid.invert_transform(transform), rigid.apply_transform(transform, points)
  )
  np.testing.assert_allclose(back, points, atol=1e-6)
  rebuilt = rigid.make_transform(transform[:, :3, :3], transform[:, :3, 3])
  np.testing.assert_array_equal(rebuilt, transform)


def test_kabsch_matches_scipy_weighted_alignment_and_ignores_zero_weights():
  rng = np.random.default_rng(3)
  source = rng.normal(0, 0.05, (3, 200, 3))
  truth = _random_transforms(rng, 3)
  target = np.einsum("bij,bnj->bni", truth[:, :3, :3], source) + truth[:, None, :3, 3]
  np.testing.assert_allclose(rigid.kabsch(source, target), truth, atol=2e-6)  # exact data
  noisy = target + rng.normal(0, 0.002, target.shape)
  noisy[:, :20] += 0.5  # outliers, given zero weight
  weights = rng.uniform(0.5, 2.0, (3, 200))
  weights[:, :20] = 0.0
  got = np.asarray(rigid.kabsch(source, noisy, weights))
  for b in range(3):
    w = weights[b]
    mean_s = (w[:, None] * source[b]).sum(0) / w.sum()
    mean_t = (w[:, None] * noisy[b]).sum(0) / w.sum()
    rotation, _ = Rotation.align_vectors(noisy[b] - mean_t, source[b] - mean_s, weights=w)
    np.testing.assert_allclose(got[b, :3, :3], rotation.as_matrix(), atol=2e-5)
    np.testing.assert_allclose(got[b, :3, 3], mean_t - rotation.as_matrix() @ mean_s, atol=2e-6)


@pytest.mark.parametrize("planar", [False, True])
def test_kabsch_returns_a_rotation_never_a_reflection(planar):
  rng = np.random.default_rng(4)
  source = rng.normal(0, 0.05, (100, 3))
  if planar:
    source[:, 2] = 0.0
  target = source * np.array([1.0, 1.0, -1.0])  # the mirror image
  rotation = np.asarray(rigid.kabsch(source, target))[:3, :3]
  assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-5)
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
