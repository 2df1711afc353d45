"""Small layers shared by the models.

`DenseGeneral` exists because Flax's `nn.DenseGeneral` creates its kernel flat and reshapes it
after boxing, so a kernel with one logical axis name per dimension (`("embed", "heads",
"head_dim")`) gets a sharding constraint of rank 3 applied to a rank-2 value, which fails as
soon as a mesh is active. Here the initialiser still draws the kernel in its flat 2-D shape (so
fan-in/fan-out, and thus every variance-scaling initialiser, behave exactly as in Flax) but
reshapes it before the logical-axis box is made. It also carries the optional LoRA update of
CLIP's parameter-efficient fine-tuning. The activations and the layer norm the models share sit
here too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  # Names as `transformers.activations.ACT2FN` spells them (the `hidden_act` of HF configs).
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "tanh": jnp.tanh,
}


def activation(name: str, field: str = "activation") -> Callable[[Array], Array]:
  """The activation called `name`; an unknown name is an error naming the config `field`."""
  if name not in ACTIVATIONS:
    raise ValueError(f"{field}={name!r} is not one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(
  *,
  epsilon: float = 1e-5,
  use_fast_variance: bool = False,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm with logically named parameters; `use_fast_variance=False` is torch's two-pass
  variance E[(x - mean)^2], True Flax's E[x^2] - mean^2."""
  return nn.LayerNorm(
    epsilon=epsilon,
    dtype=dtype,
    param_dtype=param_dtype,
    use_fast_variance=use_fast_variance,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


def _reshaped(init: Callable, flat_shape: tuple[int, ...]) -> Callable:
  def reshaped_init(rng, shape, dtype=jnp.float32):
    return jnp.reshape(init(rng, flat_shape, dtype), shape)

  return reshaped_init


class DenseGeneral(nn.Module):
  """`x` contracted over `axis` with a kernel [*in_dims, *features]; logical names per dim.

  With `lora_rank > 0`, plus the low-rank update `(lora_alpha / lora_rank) * (x A) B` with
  `A: [*in_dims, rank]` drawn like a fan-in uniform layer and `B: [rank, *features]` zero, so
  the update starts at zero (PEFT's default).
  """

  features: int | Sequence[int]  # output dims appended in place of the contracted axes
  kernel_axes: tuple[str | None, ...]  # logical names of the kernel's dims (in, then out)
  bias_axes: tuple[str | None, ...] = ()  # logical names of the bias's dims (the out dims)
  axis: int | Sequence[int] = -1  # input axes to contract
  use_bias: bool = True  # add a bias of shape `features`
  kernel_init: Callable = nn.initializers.lecun_normal()  # drawn in the flat [in, out] shape
  bias_init: Callable = nn.initializers.zeros_init()  # bias initialiser
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype
  lora_rank: int = 0  # rank of the LoRA update (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator: the update is multiplied by alpha / rank

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
    if self.lora_rank > 0:
      n_in = len(axis)
      a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
      lora_a = self.param(
        "lora_a",
        nn.with_logical_partitioning(
          _reshaped(a_init, (flat[0], self.lora_rank)), (*self.kernel_axes[:n_in], None)
        ),
        (*in_dims, self.lora_rank),
        self.param_dtype,
      )
      lora_b = self.param(
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, (None, *self.kernel_axes[n_in:])),
        (self.lora_rank, *features),
        self.param_dtype,
      )
      low_rank = lax.dot_general(x, lora_a.astype(self.dtype), (contract, ((), ())))  # [..., r]
      update = jnp.tensordot(low_rank, lora_b.astype(self.dtype), axes=1)
      y = y + (self.lora_alpha / self.lora_rank) * update
    return y
