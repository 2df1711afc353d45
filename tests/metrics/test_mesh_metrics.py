"""Tests for fdjax.metrics.mesh: hand-computed LVE (both forms), FDD (signed), MVE, masks."""

import numpy as np
import pytest

from fdjax.metrics import mesh


def _lip_example():
  """T=2, V=3, lips = {0, 1}; vertex 2 is not a lip vertex and carries a large error."""
  truth = np.zeros((2, 3, 3))
  prediction = np.zeros((2, 3, 3))
  prediction[0, 0] = (1, 0, 0)  # squared 1
  prediction[0, 1] = (0, 2, 0)  # squared 4 -> frame max 4 (distance 2)
  prediction[0, 2] = (10, 0, 0)
  prediction[1, 0] = (0, 0, 3)  # squared 9 -> frame max 9 (distance 3)
  prediction[1, 1] = (1, 1, 0)  # squared 2
  prediction[1, 2] = (0, 10, 0)
  return prediction, truth, np.array([0, 1])


def test_lve_squared_is_mean_over_frames_of_max_squared_lip_distance():
  prediction, truth, lips = _lip_example()
  assert mesh.lip_vertex_error_squared(prediction, truth, lips) == pytest.approx((4 + 9) / 2)


def test_lve_mm_is_mean_over_frames_of_max_lip_distance_in_millimetres():
  prediction, truth, lips = _lip_example()
  # Metres -> mm: distances 2 and 3 units are 2000 and 3000 mm.
  assert mesh.lip_vertex_error_mm(prediction, truth, lips) == pytest.approx(2500.0)
  assert mesh.lip_vertex_error_mm(prediction, truth, lips, mm_per_unit=1.0) == pytest.approx(2.5)


def test_prediction_longer_than_truth_is_cut_and_shorter_is_an_error():
  prediction, truth, lips = _lip_example()
  longer = np.concatenate([prediction, np.full((3, 3, 3), 100.0)])
  assert mesh.lip_vertex_error_squared(longer, truth, lips) == pytest.approx(6.5)
  assert mesh.mean_vertex_error(longer, truth) == pytest.approx(
    mesh.mean_vertex_error(prediction, truth)
  )
  with pytest.raises(ValueError, match="prediction has 1 frames but the truth has 2"):
    mesh.lip_vertex_error_squared(prediction[:1], truth, lips)


def test_lve_pools_frames_over_sequences_and_respects_frame_mask():
  prediction, truth, lips = _lip_example()
  # A batch of two: the second sequence has one valid frame with max squared distance 1.
  batch_prediction = np.zeros((2, 2, 3, 3))
  batch_prediction[0] = prediction
  batch_prediction[1, 0, 0] = (1, 0, 0)
  batch_prediction[1, 1, 0] = (50, 0, 0)  # padding frame: must not count
  batch_truth = np.zeros((2, 2, 3, 3))
  frame_mask = np.array([[True, True], [True, False]])
  value = mesh.lip_vertex_error_squared(batch_prediction, batch_truth, lips, frame_mask=frame_mask)
  # Pooled over 3 frames, not the mean of per-sequence means ((6.5 + 1) / 2).
  assert value == pytest.approx((4 + 9 + 1) / 3)


def test_lve_accepts_bool_masks_and_region_masks():
  prediction, truth, _ = _lip_example()
  bool_mask = np.array([True, True, False])
  region = mesh.RegionMask.from_array(bool_mask, 3, "lips")
  for lips in (bool_mask, region):
    assert mesh.lip_vertex_error_squared(prediction, truth, lips) == pytest.approx(6.5)
  only_vertex_two = mesh.lip_vertex_error_squared(prediction, truth, np.array([2]))
  assert only_vertex_two == pytest.approx(100.0)


def _fdd_sequences():
  """Two sequences with a non-zero template; upper face = vertex 0 only."""
  template = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  # Sequence A (2 frames): truth |motion|^2 of vertex 0 = [0, 4] -> std 2; prediction [1, 1] -> 0.
  truth_a = np.repeat(template[None], 2, axis=0)
  truth_a[1, 0] += (2, 0, 0)
  prediction_a = np.repeat(template[None], 2, axis=0)
  prediction_a[:, 0] += (0, 1, 0)
  prediction_a[:, 1] += (7, 7, 7)  # not upper face: ignored
  # Sequence B (4 frames): truth |motion|^2 = [0, 0, 1, 1] -> std 0.5; prediction static -> 0.
  truth_b = np.repeat(template[None], 4, axis=0)
  truth_b[2:, 0] += (0, 0, 1)
  prediction_b = np.repeat(template[None], 4, axis=0)
  return template, (prediction_a, truth_a), (prediction_b, truth_b)


def test_fdd_hand_computed_and_signed():
  template, (prediction_a, truth_a), _ = _fdd_sequences()
  upper = np.array([0])
  # Positive: the prediction moves the upper face less than the truth.
  assert mesh.upper_face_dynamics_deviation(
    prediction_a, truth_a, template, upper
  ) == pytest.approx(2.0)
  # Swapping prediction and truth flips the sign.
  assert mesh.upper_face_dynamics_deviation(
    truth_a, prediction_a, template, upper
  ) == pytest.approx(-2.0)


def test_fdd_is_unweighted_mean_over_sequences():
  template, (prediction_a, truth_a), (prediction_b, truth_b) = _fdd_sequences()
  accumulator = mesh.MeshMetricsAccumulator(
    mesh.RegionMask.from_array(np.array([0]), 2, "lips"),
    mesh.RegionMask.from_array(np.array([0]), 2, "upper"),
  )
  accumulator.add(prediction_a, truth_a, template)
  accumulator.add(prediction_b, truth_b, template)
  # (2 + 0.5) / 2, not the frame-weighted (2*2 + 0.5*4) / 6.
  assert accumulator.compute()["fdd"] == pytest.approx(1.25)
  # The batched function with a frame mask gives the same.
  prediction = np.zeros((2, 4, 2, 3))
  truth = np.zeros((2, 4, 2, 3))
  prediction[0, :2], truth[0, :2] = prediction_a, truth_a
  prediction[1], truth[1] = prediction_b, truth_b
  frame_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  value = mesh.upper_face_dynamics_deviation(
    prediction, truth, np.stack([template, template]), np.array([0]), frame_mask=frame_mask
  )
  assert value == pytest.approx(1.25)


def test_mve_is_mean_euclidean_distance_over_frames_and_vertices():
  truth = np.zeros((1, 2, 3))
  prediction = np.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])  # distances 5 and 1
  assert mesh.mean_vertex_error(prediction, truth) == pytest.approx(3.0)
  two_frames = np.concatenate([prediction, np.zeros((1, 2, 3))])  # second frame exact
  assert mesh.mean_vertex_error(two_frames, np.zeros((2, 2, 3))) == pytest.approx(1.5)


def _reference_metrics(sequences, lips, upper):
  """A loop-by-loop transcription of section 5, independent of the vectorised code."""
  lip_max_squared, lip_max_root, distances, fdds = [], [], [], []
  for prediction, truth, template in sequences:
    prediction = prediction[: len(truth)]
    for t in range(len(truth)):
      squared = [float(np.sum((prediction[t, v] - truth[t, v]) ** 2)) for v in lips]
      lip_max_squared.append(max(squared))
      lip_max_root.append(max(np.sqrt(squared)) * 1000)
      distances.extend(np.linalg.norm(prediction[t] - truth[t], axis=-1))
    stds_truth = [np.std(np.sum((truth[:, v] - template[v]) ** 2, -1)) for v in upper]
    stds_prediction = [np.std(np.sum((prediction[:, v] - template[v]) ** 2, -1)) for v in upper]
    fdds.append(np.mean(stds_truth) - np.mean(stds_prediction))
  return {
    "lve_squared": np.mean(lip_max_squared),
    "lve_mm": np.mean(lip_max_root),
    "fdd": np.mean(fdds),
    "mve": np.mean(distances),
  }


def test_accumulator_matches_reference_loop_and_names_masks():
  rng = np.random.default_rng(0)
  num_vertices = 12
  lips = mesh.RegionMask.from_array(np.array([1, 3, 5, 7]), num_vertices, "lips_test")
  upper = mesh.RegionMask.from_array(np.array([0, 2, 4, 6, 8, 10]), num_vertices, "upper_test")
  sequences = []
  for length in (5, 9, 3):
    template = rng.normal(size=(num_vertices, 3))
    truth = template + 0.01 * rng.normal(size=(length, num_vertices, 3))
    prediction = template + 0.01 * rng.normal(size=(length + 1, num_vertices, 3))
    sequences.append((prediction, truth, template))
  accumulator = mesh.MeshMetricsAccumulator(lips, upper)
  for prediction, truth, template in sequences:
    accumulator.add(prediction, truth, template)
  result = accumulator.compute()
  expected = _reference_metrics(sequences, lips.indices, upper.indices)
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, rel=1e-12), key
  assert result["mve_mm"] == pytest.approx(expected["mve"] * 1000, rel=1e-12)
  assert result["num_sequences"] == 3 and result["num_frames"] == 17
  assert result["lip_mask"] == "lips_test" and result["upper_face_mask"] == "upper_test"

  # The same sequences as one padded batch with a padding row give the same numbers.
  batched = mesh.MeshMetricsAccumulator(lips, upper)
  max_length = 10
  prediction = np.zeros((4, max_length, num_vertices, 3))
  truth = np.zeros((4, max_length - 1, num_vertices, 3))
  template = np.zeros((4, num_vertices, 3))
  frame_mask = np.zeros((4, max_length - 1), bool)
  for row, (p, t, tpl) in enumerate(sequences):
    prediction[row, : len(p)], truth[row, : len(t)], template[row] = p, t, tpl
    frame_mask[row, : len(t)] = True
  per_sequence = batched.add_batch(prediction, truth, template, frame_mask)
  assert len(per_sequence) == 3
  for key in mesh.MeshMetricsAccumulator.METRIC_NAMES:
    assert batched.compute()[key] == pytest.approx(result[key], rel=1e-12), key


def test_baselines_are_scored_by_the_same_code():
  rng = np.random.default_rng(1)
  template = rng.normal(size=(6, 3))
  static = mesh.static_template_prediction(template, 4)
  assert static.shape == (4, 6, 3) and np.array_equal(static[3], template)

  offset = rng.normal(size=(6, 3))
  moving = mesh.mean_motion_prediction(template, offset, 3)
  np.testing.assert_allclose(moving, np.repeat((template + offset)[None], 3, axis=0))
  per_frame_offset = rng.normal(size=(2, 6, 3))
  held = mesh.mean_motion_prediction(template, per_frame_offset, 4)
  np.testing.assert_allclose(held[:2], template + per_frame_offset)
  np.testing.assert_allclose(held[2:], np.repeat((template + per_frame_offset[1])[None], 2, 0))

  mean = mesh.training_mean_offset(
    [
      (template + 1.0 + np.zeros((2, 6, 3)), template),
      (template + 4.0 + np.zeros((1, 6, 3)), template),
    ]
  )
  np.testing.assert_allclose(mean, np.full((6, 3), 2.0))  # (1 + 1 + 4) / 3: pooled frames

  truth = template + 0.1 * rng.normal(size=(4, 6, 3))
  assert mesh.mean_vertex_error(static, truth) == pytest.approx(
    np.mean(np.linalg.norm(truth - template, axis=-1))
  )
  # A static prediction has no upper-face motion: FDD equals the truth's own mean std.
  upper = np.arange(6)
  expected = np.mean(np.std(np.sum((truth - template) ** 2, -1), axis=0))
  assert mesh.upper_face_dynamics_deviation(static, truth, template, upper) == pytest.approx(
    expected
  )


def test_load_region_mask_formats(tmp_path):
  np.save(tmp_path / "lips.npy", np.array([4, 1, 2]))
  np.save(tmp_path / "upper.npy", np.array([True, False, True, False, False]))
  (tmp_path / "fdd.txt").write_text("0, 3, 4\n")
  lips = mesh.load_region_mask(tmp_path / "lips.npy", 5)
  assert lips.name == "lips" and lips.indices.tolist() == [4, 1, 2]
  assert mesh.load_region_mask(tmp_path / "upper.npy", 5).indices.tolist() == [0, 2]
  text = mesh.load_region_mask(tmp_path / "fdd.txt", 5, name="faceformer_fdd")
  assert text.name == "faceformer_fdd" and text.indices.tolist() == [0, 3, 4]


def test_load_region_mask_errors_name_the_file(tmp_path):
  np.save(tmp_path / "too_far.npy", np.array([0, 5]))
  with pytest.raises(ValueError, match=r"too_far\.npy.*index 5 is out of range.*5 vertices"):
    mesh.load_region_mask(tmp_path / "too_far.npy", 5)
  np.save(tmp_path / "short.npy", np.array([True, False]))
  with pytest.raises(ValueError, match=r"short\.npy.*2 entries but the mesh has 5"):
    mesh.load_region_mask(tmp_path / "short.npy", 5)
  np.save(tmp_path / "floats.npy", np.array([0.5, 1.0]))
  with pytest.raises(ValueError, match=r"floats\.npy.*dtype float64"):
    mesh.load_region_mask(tmp_path / "floats.npy", 5)
  (tmp_path / "words.txt").write_text("1, two, 3")
  with pytest.raises(ValueError, match=r"words\.txt.*integer"):
    mesh.load_region_mask(tmp_path / "words.txt", 5)
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    mesh.load_region_mask(tmp_path / "missing.npy", 5)
  lips = mesh.RegionMask.from_array(np.array([0]), 5, "lips")
  with pytest.raises(ValueError, match="'lips' is for 5 vertices but the meshes have 3"):
    mesh.lip_vertex_error_squared(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), lips)


def test_diversity_hand_computed():
  # Two samples of one frame, two vertices: vertex 0 at (0,0,0) and (2,0,0) (std 1 about the
  # mean (1,0,0)); vertex 1 at (0,0,0) and (0,6,8) (distance 10 apart: std 5).
  samples = np.zeros((2, 1, 2, 3))
  samples[1, 0, 0] = (2, 0, 0)
  samples[1, 0, 1] = (0, 6, 8)
  assert mesh.sample_diversity(samples) == pytest.approx(3.0)
  assert mesh.sample_diversity(samples, mm_per_unit=1000.0) == pytest.approx(3000.0)
  assert mesh.sample_diversity(np.repeat(samples[:1], 4, axis=0)) == 0.0  # deterministic


def test_diversity_matches_a_direct_loop_and_averages_over_sequences():
  rng = np.random.default_rng(0)
  samples = rng.normal(size=(4, 3, 5, 6, 3))  # N=4 samples, B=3 sequences, T=5, V=6
  frame_mask = np.arange(5)[None] < np.array([[5], [2], [0]])  # the third is padding
  expected = []
  for b in range(3):
    frames = []
    for t in range(int(frame_mask[b].sum())):
      per_vertex = [
        np.sqrt(sum(np.var(samples[:, b, t, v, c]) for c in range(3))) for v in range(6)
      ]
      frames.append(np.mean(per_vertex))
    if frames:
      expected.append(np.mean(frames))
  per_sequence = mesh.sequence_diversity(samples, frame_mask)
  np.testing.assert_allclose(per_sequence[:2], expected, rtol=1e-12)
  assert np.isnan(per_sequence[2])
  # Sequences weigh alike, however long.
  assert mesh.sample_diversity(samples, frame_mask) == pytest.approx(np.mean(expected))
  with pytest.raises(ValueError, match="at least 2 samples"):
    mesh.sample_diversity(samples[:1])
