"""The I3D network that FVD is computed with, in Flax (channels last).

I3D (Carreira and Zisserman 2017): Inception-v1 inflated to 3D, trained on Kinetics-400. FVD
(Unterthiner et al. 2018) takes its 400 logits for 16-frame 224x224 clips scaled to [-1, 1]
(`fdjax.metrics.video.i3d_features` resizes and scales as the PyTorch FVD code does). The layout
is DeepMind's (`Conv3d_1a_7x7` ... `Mixed_5c`, TensorFlow "SAME" padding, BatchNorm eps 1e-5)
as the PyTorch port `pytorch_i3d.InceptionI3d` (piergiaj; shipped by cd-fvd and used by TATS
and StyleGAN-V's FVD) names it, so `load(path)` reads its `i3d_pretrained_400.pt`-style state
dict the user provides (nothing is downloaded). The port pads its max pools with zeros, which
equals TensorFlow's padding there because every pooled input is a ReLU output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models import torch_convert

Array = jax.Array


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding of one axis: the total split with the extra one at the end."""
  total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
  return total // 2, total - total // 2


def _zero_padded_max_pool(x: Array, kernel: Sequence[int], stride: Sequence[int]) -> Array:
  """[B, T, H, W, C] max pool after zero "SAME" padding, as the PyTorch port computes it."""
  pads = [(0, 0)] + [_same_pads(s, k, st) for s, k, st in zip(x.shape[1:4], kernel, stride)]
  x = jnp.pad(x, pads + [(0, 0)])
  return nn.max_pool(x, tuple(kernel), strides=tuple(stride), padding="VALID")


class Unit3D(nn.Module):
  """3D convolution with "SAME" padding, optional BatchNorm (eps 1e-5) and ReLU."""

  features: int
  kernel: Sequence[int] = (1, 1, 1)
  stride: Sequence[int] = (1, 1, 1)
  use_batch_norm: bool = True
  use_bias: bool = False
  activate: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pads = [_same_pads(s, k, st) for s, k, st in zip(x.shape[1:4], self.kernel, self.stride)]
    x = nn.Conv(
      self.features,
      tuple(self.kernel),
      strides=tuple(self.stride),
      padding=pads,
      use_bias=self.use_bias,
      name="conv3d",
    )(x)
    if self.use_batch_norm:
      x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return nn.relu(x) if self.activate else x


class InceptionModule(nn.Module):
  """Four branches: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1."""

  out_channels: Sequence[int]  # b0, b1a, b1b, b2a, b2b, b3b

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.out_channels
    b0 = Unit3D(c[0], name="b0")(x)
    b1 = Unit3D(c[2], (3, 3, 3), name="b1b")(Unit3D(c[1], name="b1a")(x))
    b2 = Unit3D(c[4], (3, 3, 3), name="b2b")(Unit3D(c[3], name="b2a")(x))
    b3 = Unit3D(c[5], name="b3b")(_zero_padded_max_pool(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


_MIXED = {
  "Mixed_3b": (64, 96, 128, 16, 32, 32),
  "Mixed_3c": (128, 128, 192, 32, 96, 64),
  "Mixed_4b": (192, 96, 208, 16, 48, 64),
  "Mixed_4c": (160, 112, 224, 24, 64, 64),
  "Mixed_4d": (128, 128, 256, 24, 64, 64),
  "Mixed_4e": (112, 144, 288, 32, 64, 64),
  "Mixed_4f": (256, 160, 320, 32, 128, 128),
  "Mixed_5b": (256, 160, 320, 32, 128, 128),
  "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class InceptionI3d(nn.Module):
  """[B, T, H, W, 3] in [-1, 1] -> (logits [B, num_classes], pre-logits [B, 1024]).

  The final 2x7x7 average pool needs T >= 9 frames and H, W >= 193 pixels (16 x 224 for FVD);
  logits and pre-logits are averaged over the pooled time steps, as the PyTorch port does.
  """

  num_classes: int = 400  # Kinetics-400

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
    x = _zero_padded_max_pool(x, (1, 3, 3), (1, 2, 2))
    x = Unit3D(64, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = _zero_padded_max_pool(x, (1, 3, 3), (1, 2, 2))
    x = InceptionModule(_MIXED["Mixed_3b"], name="Mixed_3b")(x)
    x = InceptionModule(_MIXED["Mixed_3c"], name="Mixed_3c")(x)
    x = _zero_padded_max_pool(x, (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = InceptionModule(_MIXED[name], name=name)(x)
    x = _zero_padded_max_pool(x, (2, 2, 2), (2, 2, 2))
    x = InceptionModule(_MIXED["Mixed_5b"], name="Mixed_5b")(x)
    x = InceptionModule(_MIXED["Mixed_5c"], name="Mixed_5c")(x)
    if x.shape[1] < 2 or x.shape[2] != 7 or x.shape[3] != 7:
      raise ValueError(
        f"I3D: Mixed_5c gives {x.shape[1:4]} (time, height, width); the 2x7x7 pool needs at least "
        "2 steps and exactly 7x7 (inputs of T >= 9 frames and 193..224 pixels)"
      )
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")  # [B, T', 1, 1, 1024]
    logits = Unit3D(
      self.num_classes, use_batch_norm=False, use_bias=True, activate=False, name="logits"
    )(x)  # dropout is the identity at evaluation
    return jnp.mean(logits, axis=(1, 2, 3)), jnp.mean(x, axis=(1, 2, 3))


def load(path: str | os.PathLike, num_classes: int = 400) -> tuple[InceptionI3d, dict[str, Any]]:
  """(model, variables) from a local PyTorch I3D state dict (`i3d_pretrained_400.pt` layout)."""
  state = torch_convert.read_torch_state_dict(path, what="I3D")
  model = InceptionI3d(num_classes=num_classes)
  dummy = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
  return model, torch_convert.variables_from_state_dict(state, model, dummy)
