"""The one multi-head attention of fdjax, and the feed-forward and transformer blocks on it.

Where it sits: every model in `fdjax/models` that attends (wav2vec2/HuBERT, CLIP, ViViT, the
temporal heads, the FaceFormer and non-autoregressive decoders, CodeTalker) builds its layers
from `MultiHeadAttention`, `FeedForward` and `TransformerBlock`, and every attention runs through
`dot_product_attention` (`jax.nn.dot_product_attention`: XLA, or cuDNN's fused kernel on GPU,
chosen by `config.precision.attention_impl`). Parameter names are fields, so each model keeps
the names its checkpoints and converters read.

Convention: queries `[B, Tq, H, Dh]`, keys and values `[B, Tk, H, Dh]`; `mask` is boolean,
broadcastable to `[B, H, Tq, Tk]`, True where a query may attend to a key; `bias` is added to
the scaled scores (same broadcast). Scores and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models.layers import DenseGeneral, activation, layer_norm

Array = jax.Array
Dtype = Any

# "auto": cuDNN's fused kernel where `cudnn_unsupported` finds nothing against it, else XLA.
IMPLEMENTATIONS = ("auto", "xla", "cudnn")

# The score of a masked key, as `jax.nn.dot_product_attention` uses it: finite, so a fully
# masked row gives uniform weights instead of NaN, and exp() of it underflows to zero next to
# any unmasked score.
MASKED_SCORE = float(-0.7 * np.finfo(np.float32).max)

# cuDNN's flash attention: half-precision inputs, head dims that are multiples of 8 up to 128.
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_CUDNN_MAX_HEAD_DIM = 128


def cudnn_unsupported(
  query: Array, key: Array, value: Array, bias: Array | None = None, mask: Array | None = None
) -> str | None:
  """Why cuDNN's fused attention cannot take these inputs on this backend; None when it can."""
  device = jax.devices()[0]
  platform_version = getattr(getattr(device, "client", None), "platform_version", "")
  if device.platform != "gpu" or "cuda" not in str(platform_version).lower():
    return f"the default device is {device.platform}, not a CUDA GPU"
  if {jnp.dtype(query.dtype), jnp.dtype(key.dtype), jnp.dtype(value.dtype)} - set(_CUDNN_DTYPES):
    return f"it takes float16 or bfloat16 inputs, got {query.dtype}, {key.dtype}, {value.dtype}"
  if len({query.dtype, key.dtype, value.dtype}) > 1:
    return "query, key and value must share a dtype"
  shapes = [query.shape, key.shape, value.shape]
  shapes += [t.shape for t in (bias, mask) if t is not None]
  if not all(isinstance(d, int) for shape in shapes for d in shape):
    return "the shapes are symbolic (jax.export)"
  if query.ndim != 4 or any(t is not None and t.ndim > 4 for t in (bias, mask)):
    return "it takes [B, T, H, Dh] inputs and masks of rank 4 at most"
  head_dim = query.shape[-1]
  if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
    return f"the head dim must be a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}, got {head_dim}"
  if (bias is not None or mask is not None) and (query.shape[1] % 2 or key.shape[1] % 2):
    return f"with a mask or bias the lengths must be even, got {query.shape[1]}, {key.shape[1]}"
  return None


def padding_mask(valid: Array) -> Array:
  """bool `[B, Tk]` valid keys -> bool `[B, 1, 1, Tk]`: every query attends to the valid keys."""
  return valid.astype(bool)[:, None, None, :]


def attention_weights(
  query: Array,
  key: Array,
  *,
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
) -> Array:
  """The attention probabilities `[B, H, Tq, Tk]`, in the dtype of `key`.

  The explicit formulation, for the models that need the weights (attention rollout) or drop
  some of them (attention dropout); it is the arithmetic of `jax.nn.dot_product_attention`'s
  XLA path, step for step.
  """
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  scores = scores * jnp.asarray(scale, jnp.float32)
  if bias is not None:
    scores = (scores + bias).astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, MASKED_SCORE)
  return jax.nn.softmax(scores, axis=-1).astype(key.dtype)


def dot_product_attention(
  query: Array,
  key: Array,
  value: Array,
  *,
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
  implementation: str = "auto",
) -> Array:
  """Scaled dot-product attention under an additive bias and a boolean mask.

  Args:
    query: `[B, Tq, H, Dh]`.
    key, value: `[B, Tk, H, Dh]`.
    bias: broadcastable to `[B, H, Tq, Tk]`, added to the scaled scores.
    mask: bool, broadcastable to `[B, H, Tq, Tk]`; True = may attend.
    scale: score scale; default `Dh ** -0.5`.
    implementation: "xla"; "cudnn" (an error naming the reason where it cannot run: not a CUDA
      GPU, float32 inputs, a head dim cuDNN lacks, odd lengths with a mask, symbolic shapes);
      "auto", cuDNN where it can run and XLA elsewhere (always XLA on CPU).

  Returns:
    `[B, Tq, H, Dh]` in the dtype of `value`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  if implementation != "xla":
    reason = cudnn_unsupported(query, key, value, bias, mask)
    if reason is None:
      return _cudnn_attention(query, key, value, bias, mask, scale)
    if implementation == "cudnn":
      raise ValueError(
        f"attention_impl='cudnn' cannot run here: {reason}. Use 'auto' (cuDNN where it can "
        "run, XLA elsewhere) or 'xla'"
      )
  return jax.nn.dot_product_attention(
    query, key, value, bias=bias, mask=mask, scale=scale, implementation="xla"
  )


def _cudnn_attention(query, key, value, bias, mask, scale) -> Array:
  # cuDNN wants bias and mask at full length [b, h, Tq, Tk] (b, h may stay 1), in query dtype.
  lengths = (query.shape[1], key.shape[1])

  def full(t):
    t = t.reshape((1,) * (4 - t.ndim) + t.shape)
    return jnp.broadcast_to(t, t.shape[:2] + lengths)

  bias = None if bias is None else full(bias).astype(query.dtype)
  mask = None if mask is None else full(mask)
  return jax.nn.dot_product_attention(
    query, key, value, bias=bias, mask=mask, scale=scale, implementation="cudnn"
  )


def aligned_attention(
  query: Array, key: Array, value: Array, implementation: str = "auto"
) -> Array:
  """Attention of each query position to its own group of r keys (FaceFormer's alignment).

  The same as a dense `[T, T * r]` mask that lets frame t see keys `t * r .. t * r + r - 1`,
  computed as `dot_product_attention` over a `[B * T]` batch with one query and r keys each,
  in linear memory.

  Args:
    query: `[B, T, H, Dh]`.
    key, value: `[B, T, r, H, Dh]`.

  Returns:
    `[B, T, H, Dh]`.
  """
  batch, frames, heads, head_dim = query.shape
  group = key.shape[2]
  grouped = (batch * frames, group, heads, head_dim)
  out = dot_product_attention(
    query.reshape(batch * frames, 1, heads, head_dim),
    key.reshape(grouped),
    value.reshape(grouped),
    implementation=implementation,
  )
  return out.reshape(query.shape)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with query, key, value and output projections named by fields.

  Self-attention when `inputs_kv` is None, else cross-attention. `inputs_kv` with one more axis
  than `inputs_q` (`[B, T, r, D]`) holds each query position's own r entries, and each position
  attends to those alone (`aligned_attention`).
  """

  num_heads: int  # attention heads H; the width D must divide evenly
  # parameter names of the query, key, value and output projections
  projection_names: tuple[str, str, str, str] = ("query", "key", "value", "out")
  kernel_init: Callable = nn.initializers.xavier_uniform()  # drawn in the flat [in, out] shape
  lora_rank: int = 0  # LoRA rank on the projections named in `lora_targets` (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ()  # projection names that get LoRA
  dropout_rate: float = 0.0  # dropout on the attention probabilities (training only)
  sow_weights: bool = False  # sow the probabilities as intermediates "attention_weights"
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn" (see `dot_product_attention`)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(
    self,
    inputs_q: Array,
    inputs_kv: Array | None = None,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    past: tuple[Array, Array] | None = None,
    cache_slot: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, tuple[Array, Array]]:
    """Attends `inputs_q` to itself, to `past` and itself, or to `inputs_kv`.

    Args:
      inputs_q: `[B, Tq, D]`.
      inputs_kv: `[B, Tk, D]` (cross-attention), `[B, Tq, r, D]` (aligned groups), or None.
      bias, mask: as in `dot_product_attention`, over the keys attended to (`past` first).
      past: keys and values `[B, P, H, Dh]` of the P positions before `inputs_q` (a stream's
        history); with `cache_slot`, a fixed-size cache `[B, S, H, Dh]` instead.
      cache_slot: `[S]` bool, the cache slot(s) where this call's keys and values are written
        before attending to the whole cache (frame-by-frame decoding).
      train: enables dropout on the probabilities.

    Returns:
      `[B, Tq, D]`, and the keys and values to keep: this call's `[B, Tq, H, Dh]`, or with
      `cache_slot` the cache with them written in.
    """
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    query_name, key_name, value_name, out_name = self.projection_names

    def projection(name, features, axis, kernel_axes, bias_axes):
      return DenseGeneral(
        features=features,
        kernel_axes=kernel_axes,
        bias_axes=bias_axes,
        axis=axis,
        kernel_init=self.kernel_init,
        bias_init=nn.initializers.zeros_init(),
        lora_rank=self.lora_rank if name in self.lora_targets else 0,
        lora_alpha=self.lora_alpha,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )

    heads = (self.num_heads, head_dim)
    in_axes, head_axes = ("embed", "heads", "head_dim"), ("heads", "head_dim")
    source = inputs_q if inputs_kv is None else inputs_kv
    query = projection(query_name, heads, -1, in_axes, head_axes)(inputs_q)  # [B, Tq, H, Dh]
    key = projection(key_name, heads, -1, in_axes, head_axes)(source)
    value = projection(value_name, heads, -1, in_axes, head_axes)(source)
    keys, values = key, value
    kept = (key, value)
    if cache_slot is not None:
      # A select rather than dynamic_update_slice: it costs what the attention read of the
      # cache costs anyway, and needs no proof that the cache has the slot, which jax.export
      # cannot give for symbolic lengths.
      write = cache_slot[None, :, None, None]
      keys = jnp.where(write, key.astype(past[0].dtype), past[0])
      values = jnp.where(write, value.astype(past[1].dtype), past[1])
      kept = (keys, values)
    elif past is not None:
      keys = jnp.concatenate([past[0].astype(key.dtype), key], axis=1)  # [B, P + Tq, H, Dh]
      values = jnp.concatenate([past[1].astype(value.dtype), value], axis=1)

    if source.ndim == inputs_q.ndim + 1:
      if bias is not None or mask is not None or past is not None:
        raise ValueError("aligned groups of keys take no bias, mask or past")
      batch, frames = query.shape[:2]
      group = key.shape[2]
      out = self._attend(
        query.reshape(batch * frames, 1, *heads),
        keys.reshape(batch * frames, group, *heads),
        values.reshape(batch * frames, group, *heads),
        None,
        None,
        train,
      ).reshape(query.shape)
    else:
      out = self._attend(query, keys, values, bias, mask, train)  # [B, Tq, H, Dh]
    out = projection(out_name, width, (-2, -1), ("heads", "head_dim", "embed"), ("embed",))(out)
    return out, kept

  def _attend(self, query, key, value, bias, mask, train) -> Array:
    sow = self.sow_weights and self.is_mutable_collection("intermediates")
    if not sow and not (train and self.dropout_rate > 0):
      return dot_product_attention(
        query, key, value, bias=bias, mask=mask, implementation=self.attention_impl
      )
    weights = attention_weights(query, key, bias=bias, mask=mask)  # [B, H, Tq, Tk]
    if sow:
      self.sow("intermediates", "attention_weights", weights)
    weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=not train)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


class FeedForward(nn.Module):
  """Position-wise MLP: dense -> activation -> dropout -> dense -> dropout."""

  mlp_dim: int  # hidden width
  activation: str = "gelu"  # activation name (`layers.ACTIVATIONS`)
  activation_dropout: float = 0.0  # dropout after the activation (training only)
  output_dropout: float = 0.0  # dropout on the output (training only)
  dense_names: tuple[str, str] = ("wi", "wo")  # parameter names of the two dense layers
  kernel_init: Callable = nn.initializers.lecun_normal()  # kernels of both layers
  lora_rank: int = 0  # LoRA rank on the layers named in `lora_targets` (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ()  # dense names that get LoRA
  sequence_axis: str | None = "time"  # logical name of the sequence axis of [B, T, D] inputs
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """`[..., D]` -> `[..., D]`."""

    def dense(name, features, kernel_axes):
      return DenseGeneral(
        features=features,
        kernel_axes=kernel_axes,
        bias_axes=kernel_axes[1:],
        kernel_init=self.kernel_init,
        bias_init=nn.initializers.zeros_init(),
        lora_rank=self.lora_rank if name in self.lora_targets else 0,
        lora_alpha=self.lora_alpha,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )

    hidden_name, output_name = self.dense_names
    h = dense(hidden_name, self.mlp_dim, ("embed", "mlp"))(x)
    if h.ndim == 3:
      h = nn.with_logical_constraint(h, ("batch", self.sequence_axis, "mlp"))
    h = activation(self.activation)(h)
    h = nn.Dropout(rate=self.activation_dropout)(h, deterministic=not train)
    h = dense(output_name, x.shape[-1], ("mlp", "embed"))(h)
    return nn.Dropout(rate=self.output_dropout)(h, deterministic=not train)


class Adapter(nn.Module):
  """Bottleneck adapter `y + up(gelu(down(y)))`; `up` starts at zero, so it starts as identity."""

  bottleneck_dim: int  # width of the bottleneck
  dtype: Dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, y: Array) -> Array:
    width = y.shape[-1]
    h = nn.Dense(
      features=self.bottleneck_dim,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
      name="down",
    )(y)
    h = jax.nn.gelu(h)
    h = nn.Dense(
      features=width,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name="up",
    )(h)
    return y + h


@dataclasses.dataclass(frozen=True)
class BlockNames:
  """Submodule names of a `TransformerBlock`: the parameter paths checkpoints and converters read
  (and, for the dropout, the name its random stream is drawn under)."""

  attention: str = "attention"  # the self-attention
  cross_attention: str = "cross_attention"  # the cross-attention, when there is one
  feed_forward: str | None = "feed_forward"  # None: the MLP's layers sit in the block (CLIP)
  # one norm per branch: self-attention, cross-attention (when there is one), MLP
  norms: tuple[str, ...] = ("attention_norm", "feed_forward_norm")
  projections: tuple[str, str, str, str] = ("query", "key", "value", "out")  # per attention
  mlp: tuple[str, str] = ("wi", "wo")  # the MLP's two dense layers
  dropout: str | None = None  # the residual dropout; None: Flax's automatic "Dropout_0"


class TransformerBlock(nn.Module):
  """Self-attention, optional cross-attention and an MLP, each a residual branch, pre- or post-norm.

  Post-norm (`pre_norm=False`, PyTorch's and wav2vec2-base's): `x = norm(x + branch(x))`.
  Pre-norm: `x = x + branch(norm(x))`. The stack's final norm, when it has one, is the stack's.
  """

  num_heads: int  # attention heads
  mlp_dim: int  # hidden width of the MLP
  activation: str = "gelu"  # MLP activation (`layers.ACTIVATIONS`)
  pre_norm: bool = False  # normalise each branch's input (True) or each residual sum (False)
  cross_attention: bool = False  # a cross-attention branch over `memory` after self-attention
  layer_norm_eps: float = 1e-5  # eps of the layer norms
  norm_fast_variance: bool = False  # layer-norm variance E[x^2] - mean^2 (Flax) vs two-pass
  dropout: float = 0.0  # dropout on each branch's output before its residual sum
  attention_dropout: float = 0.0  # dropout on the attention probabilities
  activation_dropout: float = 0.0  # dropout inside the MLP, after its activation
  # the MLP drops its own output (`dropout`; HF wav2vec2's layout) instead of the block doing
  # it (PyTorch's): the same dropout, drawn from another random stream
  mlp_drops_output: bool = False
  layerdrop: float = 0.0  # probability of skipping the whole block in training
  adapter_dim: int = 0  # bottleneck adapters after self-attention and MLP (0 = none)
  lora_rank: int = 0  # LoRA rank on the projections named in `lora_targets` (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ()  # projection / MLP layer names that get LoRA
  attention_kernel_init: Callable = nn.initializers.xavier_uniform()  # q/k/v/out kernels
  mlp_kernel_init: Callable = nn.initializers.lecun_normal()  # MLP kernels
  names: BlockNames = BlockNames()  # parameter names
  sequence_axis: str | None = "time"  # logical name of the sequence axis (None: unnamed)
  sow_attention_weights: bool = False  # sow self-attention probabilities (attention rollout)
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn" (see `dot_product_attention`)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array | None = None,
    train: bool = False,
    past: tuple[Array, Array] | None = None,
    *,
    bias: Array | None = None,
    memory: Array | None = None,
    memory_mask: Array | None = None,
    cache_slot: Array | None = None,
  ) -> tuple[Array, tuple[Array, Array]]:
    """One block over `x [B, T, D]`.

    Args:
      x: `[B, T, D]`.
      mask, bias: of the self-attention, broadcastable to `[B, H, T, P + T]` (True = may attend).
      train: enables dropout and layerdrop (needs the "dropout" rng).
      past: keys and values of earlier positions, or a cache with `cache_slot`
        (see `MultiHeadAttention`).
      memory: `[B, S, D]` (or aligned groups `[B, T, r, D]`) for the cross-attention.
      memory_mask: bool mask of the cross-attention.
      cache_slot: `[S]` bool, where this call's keys and values go into the cache `past`.

    Returns:
      `[B, T, D]`, and the self-attention's keys and values to keep (see `MultiHeadAttention`).
    """
    names = self.names
    branches = 3 if self.cross_attention else 2
    if len(names.norms) != branches:
      raise ValueError(f"names.norms must name {branches} norms, got {names.norms}")
    inputs = x
    dropout = nn.Dropout(rate=self.dropout, name=names.dropout)
    attention = dict(
      num_heads=self.num_heads,
      projection_names=names.projections,
      kernel_init=self.attention_kernel_init,
      lora_rank=self.lora_rank,
      lora_alpha=self.lora_alpha,
      lora_targets=self.lora_targets,
      dropout_rate=self.attention_dropout,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )

    def residual(x, branch, norm_name, adapter_name=None, drop=True):
      norm = layer_norm(
        epsilon=self.layer_norm_eps,
        use_fast_variance=self.norm_fast_variance,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=norm_name,
      )
      h = branch(norm(x) if self.pre_norm else x)
      if adapter_name is not None and self.adapter_dim > 0:
        h = Adapter(bottleneck_dim=self.adapter_dim, dtype=self.dtype, name=adapter_name)(h)
      if drop:
        h = dropout(h, deterministic=not train)
      x = x + h
      if not self.pre_norm:
        x = norm(x)
      return nn.with_logical_constraint(x, ("batch", self.sequence_axis, "embed"))

    kept = None

    def self_attend(h):
      nonlocal kept
      h, kept = MultiHeadAttention(
        **attention, sow_weights=self.sow_attention_weights, name=names.attention
      )(h, bias=bias, mask=mask, past=past, cache_slot=cache_slot, train=train)
      return h

    def cross_attend(h):
      h, _ = MultiHeadAttention(**attention, name=names.cross_attention)(
        h, memory, mask=memory_mask, train=train
      )
      return h

    feed_forward = FeedForward(
      mlp_dim=self.mlp_dim,
      activation=self.activation,
      activation_dropout=self.activation_dropout,
      output_dropout=self.dropout if self.mlp_drops_output else 0.0,
      dense_names=names.mlp,
      kernel_init=self.mlp_kernel_init,
      lora_rank=self.lora_rank,
      lora_alpha=self.lora_alpha,
      lora_targets=self.lora_targets,
      sequence_axis=self.sequence_axis,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=names.feed_forward,
    )
    if names.feed_forward is None:
      nn.share_scope(self, feed_forward)

    norms = iter(names.norms)
    x = residual(x, self_attend, next(norms), "adapter_attention")
    if self.cross_attention:
      x = residual(x, cross_attend, next(norms))
    x = residual(
      x,
      lambda h: feed_forward(h, train),
      next(norms),
      "adapter_mlp",
      drop=not self.mlp_drops_output,
    )
    if train and self.layerdrop > 0:
      skip = jax.random.uniform(self.make_rng("dropout"), ()) < self.layerdrop
      x = jnp.where(skip, inputs, x)
    return x, kept
