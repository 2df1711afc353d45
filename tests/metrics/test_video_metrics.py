"""fdjax/metrics/video.py against the references: scikit-image (per-clip PSNR, SSIM),
pytorch-fid (the Fréchet distance) and torch's `F.interpolate` (the resize FID and FVD use).
The networks are tested in test_video_networks.py."""

import importlib
import importlib.util
import sys
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fdjax.metrics import video


def _pytorch_fid_frechet_distance():
  """pytorch-fid's own `calculate_frechet_distance`. Its module imports torchvision (for its
  image loader), which cannot load beside the CPU-only torch here; stand-ins satisfy those
  imports, and the function under test uses numpy and scipy only."""
  torchvision = types.ModuleType("torchvision")
  torchvision.transforms = types.ModuleType("torchvision.transforms")
  inception = types.ModuleType("pytorch_fid.inception")
  inception.InceptionV3 = type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {2048: 3}})
  stand_ins = {
    "torchvision": torchvision,
    "torchvision.transforms": torchvision.transforms,
    "pytorch_fid.inception": inception,
  }
  with mock.patch.dict(sys.modules, stand_ins):
    sys.modules.pop("pytorch_fid.fid_score", None)
    return importlib.import_module("pytorch_fid.fid_score").calculate_frechet_distance


def test_clip_psnr_and_ssim_are_frame_means_of_scikit_image():
  rng = np.random.default_rng(0)
  truth = rng.uniform(0, 1, (2, 3, 20, 23, 3))  # [clips, T, H, W, C]
  prediction = np.clip(
    truth + rng.normal(0, 0.1 + 0.05 * np.arange(3)[:, None, None, None], truth.shape), 0, 1
  )
  with jax.enable_x64(True):
    psnr = np.asarray(video.clip_psnr(jnp.asarray(prediction), jnp.asarray(truth)))
    ssim = np.asarray(video.clip_ssim(jnp.asarray(prediction), jnp.asarray(truth)))
  for c in range(2):
    frames = range(truth.shape[1])
    expected_psnr = np.mean(
      [peak_signal_noise_ratio(truth[c, t], prediction[c, t], data_range=1.0) for t in frames]
    )
    expected_ssim = np.mean(
      [
        structural_similarity(
          truth[c, t],
          prediction[c, t],
          data_range=1.0,
          channel_axis=-1,
          gaussian_weights=True,
          sigma=1.5,
          use_sample_covariance=False,
        )
        for t in frames
      ]
    )
    assert abs(psnr[c] - expected_psnr) < 1e-6
    assert abs(ssim[c] - expected_ssim) < 1e-6
  assert 0.1 < ssim.min() < ssim.max() < 0.95


def test_clip_psnr_reads_uint8_frames_as_0_to_255():
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  prediction = np.clip(truth.astype(int) + rng.integers(-9, 10, truth.shape), 0, 255).astype(
    np.uint8
  )
  expected = np.mean([peak_signal_noise_ratio(truth[t], prediction[t]) for t in range(4)])
  assert abs(float(video.clip_psnr(prediction, truth)) - expected) < 1e-3  # float32 inside


@pytest.mark.parametrize(
  "n, dim", [(60, 8), (5, 12)], ids=["full_rank", "fewer_samples_than_dimensions"]
)
def test_frechet_distance_equals_pytorch_fid(n, dim):
  reference = _pytorch_fid_frechet_distance()
  rng = np.random.default_rng(n)
  a = rng.normal(0, 1, (n, dim))
  b = rng.normal(0.3, 1, (n, dim)) @ rng.normal(0, 0.5, (dim, dim)) + 0.1 * rng.normal(
    0, 1, (n, dim)
  )
  stats_a, stats_b = video.feature_statistics(a), video.feature_statistics(b)
  ours = video.frechet_distance(*stats_a, *stats_b)
  expected = reference(*stats_a, *stats_b)
  assert abs(ours - expected) < 1e-6 * max(1.0, abs(expected))
  assert ours == pytest.approx(video.frechet_distance_of_features(a, b))
  assert abs(video.frechet_distance_of_features(a, a)) < 1e-6
  assert ours > 0.1


def test_frechet_distance_without_a_square_root_takes_pytorch_fids_eps_path():
  """A product with no square root (nilpotent): both add eps to the diagonals, then both refuse
  the result's large imaginary part, with the same magnitude."""
  reference = _pytorch_fid_frechet_distance()
  sigma1, sigma2 = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])
  with pytest.raises(ValueError, match="Imaginary component") as expected:
    reference(np.zeros(2), sigma1, np.ones(2), sigma2)
  with pytest.raises(ValueError, match="imaginary component") as ours:
    video.frechet_distance(np.zeros(2), sigma1, np.ones(2), sigma2)
  assert float(str(ours.value).split()[-1]) == float(str(expected.value).split()[-1]) > 1e-3


def test_frechet_distance_refuses_different_dimensions():
  with pytest.raises(ValueError, match="different dimensions"):
    video.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_bilinear_resize_equals_torch_interpolate():
  rng = np.random.default_rng(2)
  frames = rng.uniform(0, 1, (2, 13, 21, 3)).astype(np.float32)
  for size in (7, 40):
    ours = np.asarray(video.resize_bilinear(jnp.asarray(frames), size))
    expected = F.interpolate(
      torch.from_numpy(frames).permute(0, 3, 1, 2),
      size=(size, size),
      mode="bilinear",
      align_corners=False,
    ).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-6)
