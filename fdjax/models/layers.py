"""Small layers shared by the models.

`DenseGeneral` exists because Flax's `nn.DenseGeneral` creates its kernel flat and reshapes it
after boxing, so a kernel with one logical axis name per dimension (`("embed", "heads",
"head_dim")`) gets a sharding constraint of rank 3 applied to a rank-2 value, which fails as
soon as a mesh is active. Here the initialiser still draws the kernel in its flat 2-D shape (so
fan-in/fan-out, and thus every variance-scaling initialiser, behave exactly as in Flax) but
reshapes it before the logical-axis box is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _reshaped(init: Callable, flat_shape: tuple[int, ...]) -> Callable:
  def reshaped_init(rng, shape, dtype=jnp.float32):
    return jnp.reshape(init(rng, flat_shape, dtype), shape)

  return reshaped_init


class DenseGeneral(nn.Module):
  """`x` contracted over `axis` with a kernel [*in_dims, *features]; logical names per dim."""

  features: int | Sequence[int]  # output dims appended in place of the contracted axes
  kernel_axes: tuple[str | None, ...]  # logical names of the kernel's dims (in, then out)
  bias_axes: tuple[str | None, ...] = ()  # logical names of the bias's dims (the out dims)
  axis: int | Sequence[int] = -1  # input axes to contract
  use_bias: bool = True  # add a bias of shape `features`
  kernel_init: Callable = nn.initializers.lecun_normal()  # drawn in the flat [in, out] shape
  bias_init: Callable = nn.initializers.zeros_init()  # bias initialiser
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_dims = tuple(x.shape[a] for a in axis)
    flat = (math.prod(in_dims), math.prod(features))
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(_reshaped(self.kernel_init, flat), self.kernel_axes),
      in_dims + features,
      self.param_dtype,
    )
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    contract = (axis, tuple(range(len(axis))))
    y = lax.dot_general(x, kernel, (contract, ((), ())))
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(_reshaped(self.bias_init, flat[1:]), self.bias_axes),
        features,
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y
