"""Video-generation metrics: per-clip PSNR / SSIM, the Fréchet distance, FID and FVD.

Where it sits: the talking-head evaluation (docs/design.md section 5) compares generated clips
with real ones. Definitions:

- Per-clip PSNR and SSIM: `fdjax.metrics.image` on each frame (scikit-image's definitions),
  averaged over the clip's frames, as video papers report them.
- Fréchet distance between two feature sets: `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`
  with pytorch-fid's numerics (`calculate_frechet_distance`: scipy's `sqrtm`; `eps` added to both
  diagonals when the product's root is not finite; a small imaginary part dropped, a large one an
  error). Means and covariances as pytorch-fid takes them (`np.cov(rowvar=False)`).
- FID: the distance between pool3 features of `fdjax.models.fid_inception` over frames, each
  resized to 299x299 (bilinear, half-pixel centres, no antialiasing: torch's `F.interpolate`) and
  scaled from [0, 1] to [-1, 1], as pytorch-fid does.
- FVD: the distance between the 400 logits of `fdjax.models.i3d` over clips, each frame resized
  to 224x224 the same way and scaled from 0..255 to [-1, 1], as the PyTorch FVD code (cd-fvd,
  TATS) does; clips of 16 frames are the usual protocol.
The networks' weights come from local PyTorch checkpoints the user provides
(`fid_inception.load`, `i3d.load`); the distances are tested against pytorch-fid itself and the
networks against the PyTorch reference networks (tests/metrics/test_video_metrics.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from fdjax.metrics import image

Array = jax.Array

INCEPTION_SIZE = 299
I3D_SIZE = 224


def _as_unit(frames: Any) -> Array:
  """uint8 0..255 or float 0..1 frames -> float in [0, 1] (float64 stays float64)."""
  frames = jnp.asarray(frames)
  if frames.dtype == jnp.uint8:
    return frames.astype(jnp.float32) / 255.0
  return frames


def clip_psnr(prediction: Any, truth: Any) -> Array:
  """Mean over frames of per-frame PSNR (dB): [..., T, H, W, C] x2 -> [...]; uint8 or [0, 1]."""
  return jnp.mean(image.psnr(_as_unit(prediction), _as_unit(truth)), axis=-1)


def clip_ssim(prediction: Any, truth: Any) -> Array:
  """Mean over frames of per-frame SSIM: [..., T, H, W, C] x2 -> [...]; uint8 or [0, 1]."""
  return jnp.mean(image.ssim(_as_unit(prediction), _as_unit(truth)), axis=-1)


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased) of [N, D] features, in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
      f"Fréchet distance of different dimensions: means {mu1.shape} vs {mu2.shape}, "
      f"covariances {sigma1.shape} vs {sigma2.shape}"
    )
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(sigma1)) * eps  # the product is (nearly) singular
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of_features(features1: Any, features2: Any) -> float:
  """The Fréchet distance between the Gaussians fitted to two [N, D] feature sets."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of torch's bilinear resize (align_corners=False, no antialias)."""
  # torch computes the source coordinates in float32; so do we, to give its weights exactly.
  scale = np.float32(size_in / size_out)
  source = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  source = np.maximum(source, np.float32(0.0))
  lower = np.floor(source).astype(int)
  upper = np.minimum(lower + 1, size_in - 1)
  weight_upper = (source - lower.astype(np.float32)).astype(np.float64)
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), lower), 1.0 - weight_upper)
  np.add.at(matrix, (np.arange(size_out), upper), weight_upper)
  return matrix


def resize_bilinear(frames: Array, size: int) -> Array:
  """[..., H, W, C] -> [..., size, size, C], as torch's `F.interpolate(mode="bilinear")`."""
  rows = jnp.asarray(bilinear_matrix(frames.shape[-3], size), frames.dtype)
  cols = jnp.asarray(bilinear_matrix(frames.shape[-2], size), frames.dtype)
  precision = jax.lax.Precision.HIGHEST
  frames = jnp.einsum("oh,...hwc->...owc", rows, frames, precision=precision)
  return jnp.einsum("pw,...owc->...opc", cols, frames, precision=precision)


def _batched(
  apply: Callable[[np.ndarray], Array], inputs: np.ndarray, batch_size: int
) -> np.ndarray:
  # The evaluation networks run at full float32 precision (no TF32 / bf16 passes on GPUs), so
  # a score does not depend on the accelerator it was computed on.
  count = len(inputs)
  if count > batch_size and count % batch_size:  # whole batches: one compilation
    padding = np.zeros((batch_size - count % batch_size, *inputs.shape[1:]), inputs.dtype)
    inputs = np.concatenate([inputs, padding])
  with jax.default_matmul_precision("highest"):
    outputs = [apply(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
  return np.concatenate([np.asarray(o) for o in outputs], axis=0)[:count]


@functools.partial(jax.jit, static_argnames=("model", "size", "output"))
def _network_features(
  model: nn.Module, variables: Any, batch: Array, size: int, output: int
) -> Array:
  """Resize each frame to size x size, scale to [-1, 1], and take the network's `output`."""
  x = resize_bilinear(_as_unit(batch).astype(jnp.float32), size)
  return model.apply(variables, 2.0 * x - 1.0)[output]


def inception_features(
  model: nn.Module,
  variables: Any,
  frames: Any,
  batch_size: int = 32,
  size: int = INCEPTION_SIZE,
) -> np.ndarray:
  """[N, H, W, 3] frames (uint8, or float in [0, 1]) -> pool3 features [N, 2048]."""
  apply = functools.partial(_network_features, model, variables, size=size, output=0)
  return _batched(apply, np.asarray(frames), batch_size)


def i3d_features(
  model: nn.Module,
  variables: Any,
  clips: Any,
  batch_size: int = 4,
  size: int = I3D_SIZE,
  pre_logits: bool = False,
) -> np.ndarray:
  """[N, T, H, W, 3] clips (uint8 0..255, or float in [0, 1]) -> logits [N, 400] (FVD's), or
  with `pre_logits` the pooled Mixed_5c features [N, 1024] some FVD variants take."""
  output = 1 if pre_logits else 0
  apply = functools.partial(_network_features, model, variables, size=size, output=output)
  return _batched(apply, np.asarray(clips), batch_size)


def fid(model: nn.Module, variables: Any, real_frames: Any, generated_frames: Any, **kw) -> float:
  """FID between two sets of frames [N, H, W, 3] (see the module docstring)."""
  return frechet_distance_of_features(
    inception_features(model, variables, real_frames, **kw),
    inception_features(model, variables, generated_frames, **kw),
  )


def fvd(model: nn.Module, variables: Any, real_clips: Any, generated_clips: Any, **kw) -> float:
  """FVD between two sets of clips [N, T, H, W, 3] (see the module docstring)."""
  return frechet_distance_of_features(
    i3d_features(model, variables, real_clips, **kw),
    i3d_features(model, variables, generated_clips, **kw),
  )
