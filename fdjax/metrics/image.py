"""Image-reconstruction metrics: PSNR and SSIM, in JAX (differentiable, batched).

Used by the Gaussian avatar task for its D-SSIM loss term and for evaluation on held-out views
and expressions. Definitions (images in [0, `data_range`], channels last):

- PSNR: `10 log10(data_range^2 / MSE)` with the MSE over every pixel and channel of one image.
- SSIM (Wang et al. 2004) as the papers report it and scikit-image computes it with
  `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
  channel_axis=-1`: local statistics under an 11-tap Gaussian window (sigma 1.5, truncated at
  3.5 sigma), `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`, averaged over the positions where the window
  lies inside the image (scikit-image crops the 5-pixel border) and over channels.

Both equal scikit-image's within 1e-6 (tests/metrics/test_image_metrics.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5


def psnr(prediction: Array, truth: Array, data_range: float = 1.0) -> Array:
  """Peak signal-to-noise ratio in dB: [..., H, W, C] x2 -> [...]."""
  error = jnp.mean(jnp.square(prediction - truth), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range**2 / error)


def gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """The normalised 1D Gaussian window [2 r + 1], r = int(truncate * sigma + 0.5)."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (x / sigma) ** 2)
  return taps / taps.sum()


def _filter_valid(x: Array, taps: np.ndarray) -> Array:
  """Separable filter over H and W keeping positions whose window fits: [..., H, W, C] ->
  [..., H - 2r, W - 2r, C]."""
  k = len(taps)
  h, w = x.shape[-3] - k + 1, x.shape[-2] - k + 1
  taps = jnp.asarray(taps, x.dtype)
  rows = sum(taps[i] * x[..., i : i + h, :, :] for i in range(k))
  return sum(taps[i] * rows[..., :, i : i + w, :] for i in range(k))


def ssim_map(prediction: Array, truth: Array, data_range: float = 1.0) -> Array:
  """Local SSIM where the window fits: [..., H, W, C] x2 -> [..., H - 10, W - 10, C]."""
  if min(prediction.shape[-3:-1]) < 11:
    raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {prediction.shape[-3:-1]}")
  taps = gaussian_taps()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mean_p, mean_t = _filter_valid(prediction, taps), _filter_valid(truth, taps)
  var_p = _filter_valid(prediction * prediction, taps) - mean_p * mean_p
  var_t = _filter_valid(truth * truth, taps) - mean_t * mean_t
  cov = _filter_valid(prediction * truth, taps) - mean_p * mean_t
  numerator = (2 * mean_p * mean_t + c1) * (2 * cov + c2)
  return numerator / ((mean_p * mean_p + mean_t * mean_t + c1) * (var_p + var_t + c2))


def ssim(prediction: Array, truth: Array, data_range: float = 1.0) -> Array:
  """Mean SSIM per image: [..., H, W, C] x2 -> [...] (see the module docstring)."""
  return jnp.mean(ssim_map(prediction, truth, data_range), axis=(-3, -2, -1))
