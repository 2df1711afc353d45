"""fdjax/metrics/image.py: PSNR and SSIM equal scikit-image's."""

import jax
import jax.numpy as jnp
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fdjax.metrics import image


def test_psnr_and_ssim_equal_scikit_image():
  rng = np.random.default_rng(0)
  truth = rng.uniform(0, 1, (3, 24, 31, 3))
  smooth = np.cumsum(rng.normal(0, 0.02, truth.shape), axis=2)  # correlated errors
  prediction = np.clip(truth + smooth + rng.normal(0, 0.15, truth.shape), 0, 1)
  with jax.enable_x64(True):
    ours_psnr = np.asarray(image.psnr(jnp.asarray(prediction), jnp.asarray(truth)))
    ours_ssim = np.asarray(image.ssim(jnp.asarray(prediction), jnp.asarray(truth)))
  for i in range(len(truth)):
    expected_psnr = peak_signal_noise_ratio(truth[i], prediction[i], data_range=1.0)
    expected_ssim = structural_similarity(
      truth[i],
      prediction[i],
      data_range=1.0,
      channel_axis=-1,
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
    )
    assert abs(ours_psnr[i] - expected_psnr) < 1e-6
    assert abs(ours_ssim[i] - expected_ssim) < 1e-6
  assert 0.2 < ours_ssim.mean() < 0.95  # neither trivial end
