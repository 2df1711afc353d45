"""SyncNet (Chung and Zisserman 2016), the network behind LSE-D / LSE-C, in Flax.

The layout is syncnet_python's `SyncNetModel.S` (the `syncnet_v2.model` weights Wav2Lip's
evaluation uses): an audio stream over a [13, 20] MFCC window (0.2 s: 13 coefficients x 20
steps of 10 ms) and a video stream over 5 consecutive 224x224 face-crop frames (BGR, values
0..255, not normalised), each ending in a 1024-d embedding; in sync, the two embeddings of the
same 0.2 s lie close. `fdjax.metrics.sync` builds the inputs and the scores. Module names are
the torch state-dict names (`netcnnaud.0.weight` ...), so `load(path)` reads the checkpoint the
user provides (nothing is downloaded).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models import torch_convert

Array = jax.Array

MFCC_STEPS = 20  # MFCC steps (100 Hz) per window: 0.2 s, 4 steps per video frame at 25 fps
VIDEO_FRAMES = 5  # frames per video window
FRAME_SIZE = 224  # face-crop pixels


def _batch_norm(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


class _AudioCNN(nn.Module):
  """`netcnnaud`: [B, 13, 20, 1] -> [B, 1, 1, 512]; children named by Sequential index."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    layers = [(0, 64, (3, 3), 1), (4, 192, (3, 3), 1), (8, 384, (3, 3), 1)]
    layers += [(11, 256, (3, 3), 1), (14, 256, (3, 3), 1), (18, 512, (5, 4), 0)]
    for index, features, kernel, pad in layers:
      x = nn.Conv(features, kernel, padding=((pad, pad), (pad, pad)), name=str(index))(x)
      x = nn.relu(_batch_norm(str(index + 1))(x))
      if index == 4:
        x = nn.max_pool(x, (3, 3), strides=(1, 2))
      elif index == 14:
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
    return x


class _VideoCNN(nn.Module):
  """`netcnnlip`: [B, 5, 224, 224, 3] -> [B, 1, 1, 1, 512]."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def unit(x, index, features, kernel, stride=(1, 1, 1), pad=(0, 0, 0)):
      padding = [(p, p) for p in pad]
      x = nn.Conv(features, kernel, strides=stride, padding=padding, name=str(index))(x)
      return nn.relu(_batch_norm(str(index + 1))(x))

    def pool(x, pad=0):
      padding = ((0, 0), (pad, pad), (pad, pad))
      return nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding=padding)

    x = pool(unit(x, 0, 96, (5, 7, 7), (1, 2, 2)))
    x = pool(unit(x, 4, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), pad=1)
    x = unit(x, 8, 256, (1, 3, 3), pad=(0, 1, 1))
    x = unit(x, 11, 256, (1, 3, 3), pad=(0, 1, 1))
    x = pool(unit(x, 14, 256, (1, 3, 3), pad=(0, 1, 1)))
    return unit(x, 18, 512, (1, 6, 6))


class _Head(nn.Module):
  """`netfcaud` / `netfclip`: Linear 512, BatchNorm1d, ReLU, Linear."""

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.relu(_batch_norm("1")(nn.Dense(512, name="0")(x)))
    return nn.Dense(self.features, name="3")(x)


class SyncNet(nn.Module):
  """Audio and video embeddings: see `embed_audio` and `embed_video`."""

  embedding_size: int = 1024

  def setup(self):
    self.netcnnaud = _AudioCNN()
    self.netfcaud = _Head(self.embedding_size)
    self.netcnnlip = _VideoCNN()
    self.netfclip = _Head(self.embedding_size)

  def embed_audio(self, mfcc: Array) -> Array:
    """[B, 13, 20] MFCC windows -> [B, embedding_size]."""
    x = self.netcnnaud(mfcc[..., None])
    return self.netfcaud(x.reshape(x.shape[0], -1))

  def embed_video(self, frames: Array) -> Array:
    """[B, 5, 224, 224, 3] BGR 0..255 -> [B, embedding_size]."""
    x = self.netcnnlip(frames)
    return self.netfclip(x.reshape(x.shape[0], -1))

  def __call__(self, mfcc: Array, frames: Array) -> tuple[Array, Array]:
    return self.embed_audio(mfcc), self.embed_video(frames)


def load(path: str | os.PathLike) -> tuple[SyncNet, dict[str, Any]]:
  """(model, variables) from a local `syncnet_v2.model`-style state dict."""
  state = torch_convert.read_torch_state_dict(path, what="SyncNet")
  model = SyncNet()
  mfcc = jax.ShapeDtypeStruct((1, 13, MFCC_STEPS), jnp.float32)
  frames = jax.ShapeDtypeStruct((1, VIDEO_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), jnp.float32)
  return model, torch_convert.variables_from_state_dict(state, model, mfcc, frames)
