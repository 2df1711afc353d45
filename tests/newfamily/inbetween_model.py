"""The model of the test family `inbetween`: facial-motion in-betweening from keyframes.

Keyframes `[B, K, E]` of expression coefficients, one every `stride` frames, become the frames
`[B, T, E]` between and at them, `T = (K - 1) * stride + 1`: linear interpolation of the
keyframes, refined by a per-frame MLP of the two keyframes around the frame and its phase, with
BatchNorm (whose running statistics live in the `batch_stats` collection). Every shape follows
from the input, so a symbolic number of keyframes exports.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def interpolate_keyframes(keyframes: jnp.ndarray, stride: int) -> dict[str, jnp.ndarray]:
  """Per-frame views of keyframes `[B, K, E]` at `T = (K - 1) * stride + 1` frames.

  Returns `frames` (linear interpolation), `start` and `end` (the keyframes before and after
  each frame), all `[B, T, E]`, and `phase` `[B, T, 1]` (the position between them, in [0, 1)).
  """
  batch, _, features = keyframes.shape
  weight = jnp.arange(stride, dtype=keyframes.dtype) / stride  # [stride]

  def per_frame(segments: jnp.ndarray, last: jnp.ndarray) -> jnp.ndarray:
    # segments [B, K - 1, stride, C], last [B, 1, C] -> [B, T, C]
    return jnp.concatenate([segments.reshape(batch, -1, segments.shape[-1]), last], axis=1)

  start, end = keyframes[:, :-1, None], keyframes[:, 1:, None]  # [B, K - 1, 1, E]
  shape = (batch, keyframes.shape[1] - 1, stride, features)
  last = keyframes[:, -1:]  # [B, 1, E]
  phase = jnp.broadcast_to(weight[:, None], shape[:-1] + (1,))  # [B, K - 1, stride, 1]
  return {
    "frames": per_frame(start + (end - start) * weight[:, None], last),
    "start": per_frame(jnp.broadcast_to(start, shape), last),
    "end": per_frame(jnp.broadcast_to(end, shape), last),
    "phase": per_frame(phase, jnp.zeros((batch, 1, 1), keyframes.dtype)),
  }


class InbetweenNet(nn.Module):
  """Keyframes -> frames: interpolation plus a BatchNorm MLP residual."""

  stride: int = 4  # frames from one keyframe to the next
  hidden: int = 32  # width of the residual MLP
  momentum: float = 0.9  # BatchNorm running-statistics momentum

  @nn.compact
  def __call__(self, keyframes: jnp.ndarray, train: bool = False):
    """`keyframes [B, K, E]` -> (`frames [B, T, E]`, aux with the interpolation)."""
    views = interpolate_keyframes(keyframes, self.stride)
    frames, features = views["frames"], keyframes.shape[-1]
    h = jnp.concatenate(
      [views["start"], views["end"], views["phase"], jnp.sin(jnp.pi * views["phase"])], axis=-1
    )  # [B, T, 2 E + 2]
    h = nn.Dense(
      self.hidden,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      name="hidden",
    )(h)
    h = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.momentum,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      name="norm",
    )(h)
    h = nn.gelu(h)
    residual = nn.Dense(
      features,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name="out",
    )(h)
    return frames + residual, {"interpolated": frames}
