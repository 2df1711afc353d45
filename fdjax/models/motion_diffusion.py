"""Speech-driven motion diffusion: denoisers over vertex offsets, and the decoder that trains and
samples them (DiffSpeaker, DiffPoseTalk, FaceDiffuser).

Where it sits: a decoder kind of the `audio2mesh` task (`SpeechToMesh`'s `decoder`). The audio
encoder runs once; the denoiser (`TransformerDenoiser` or `RecurrentDenoiser`) maps noisy
offsets `x_t [B, T, V*3]`, the timestep `t [B]`, audio features aligned to the mesh frames, a
style index and the frame mask to the prediction of `config.model.decoder.prediction_type`.
`DiffusionDecoder` noises the true offsets in training (`fdjax.diffusion.noise_batch`, condition
dropout by `drop_conditions`) and samples with `fdjax.diffusion.sample` (guided by
`guided_denoise_fn`) in `generate`. Audio and style have learned null embeddings, parameters of
the denoiser, chosen per example by the `drop_audio` / `drop_style` [B] bool inputs.
Design in docs/design.md section 16.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax import diffusion
from fdjax.models.attention import padding_mask
from fdjax.models.motion_decoders import (
  FACEFORMER_VARIANTS,
  ConditionEmbedding,
  TransformerEncoder,
  _decode_variant,
  alibi_slopes,
  check_template,
  dense,
  group_audio_frames,
  layer_norm,
  motion_block,
  periodic_alibi_bias,
  periodic_positional_encoding,
)

Array = jax.Array

# The guided conditions, in the order the sequential guidance rule nests them (DiffPoseTalk).
CONDITIONS = ("audio", "style")


def timestep_encoding(timesteps: Array, features: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal encoding of diffusion timesteps `[B]` -> `[B, features]` (cos then sin, as
  DDPM's and diffusers' `get_timestep_embedding` with flip_sin_to_cos)."""
  if features % 2:
    raise ValueError(f"the timestep encoding needs an even width, got {features}")
  half = features // 2
  frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None]  # [B, D/2]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _embedding_init(*axes: str):
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


class DenoiserConditions(nn.Module):
  """What the denoisers condition on, embedded to the model width: per-frame audio `[B, T, D]`
  and one global vector `[B, D]` (timestep MLP + style). A dropped audio (style) is the learned
  `null_audio` (`null_style`) embedding instead, per example.

  With `previous_frames` P > 0 the first P of the frames are the previous window's: their audio
  is never the null audio, and where `drop_previous` (a sequence's first window) it is the
  learned `null_previous_audio [P, D]` instead."""

  features: int  # D, the denoiser's width
  num_styles: int  # speaking styles (training subjects); 0 disables the style embedding
  audio_frames_per_frame: int = 1  # audio features per mesh frame: 1 VOCASET, 2 BIWI
  previous_frames: int = 0  # P, leading frames that belong to the previous window
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(
    self,
    timesteps: Array,
    audio_features: Array,
    style: Array | None,
    drop_audio: Array,
    drop_style: Array,
    num_frames: int,
    drop_previous: Array | None = None,
  ) -> tuple[Array, Array]:
    """Args: timesteps `[B]`; audio_features `[B, T * r, D_audio]` (T = `num_frames`, the
    previous frames included); style `[B]`; drop_audio, drop_style, drop_previous `[B]` bool.
    Returns audio `[B, T, D]` and the global condition `[B, D]`."""
    batch_size = timesteps.shape[0]
    previous = self.previous_frames
    grouped = group_audio_frames(audio_features, num_frames, self.audio_frames_per_frame)
    grouped = grouped.reshape(batch_size, num_frames, -1).astype(self.dtype)  # [B, T, r*D_a]
    audio = dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="audio_projection")(
      grouped
    )  # [B, T, D]
    null_audio = self.param("null_audio", _embedding_init("embed"), (self.features,))
    in_window = jnp.arange(num_frames) >= previous  # [T]: the frames being denoised
    dropped = drop_audio[:, None, None] & in_window[None, :, None]
    audio = jnp.where(dropped, null_audio.astype(audio.dtype), audio)
    if previous:
      start = self.param(
        "null_previous_audio", _embedding_init("time", "embed"), (previous, self.features)
      )
      start = jnp.pad(start.astype(audio.dtype), ((0, num_frames - previous), (0, 0)))
      dropped = drop_previous[:, None, None] & ~in_window[None, :, None]
      audio = jnp.where(dropped, start[None], audio)

    style_embedding = ConditionEmbedding(
      features=self.features, num_styles=self.num_styles, dtype=self.dtype, name="style"
    )(style, batch_size=batch_size)  # [B, D]
    null_style = self.param("null_style", _embedding_init("embed"), (self.features,))
    style_embedding = jnp.where(drop_style[:, None], null_style.astype(self.dtype), style_embedding)

    time = timestep_encoding(timesteps, self.features).astype(self.dtype)
    time = dense(self.features, ("embed", "mlp"), dtype=self.dtype, name="timestep_hidden")(time)
    time = dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="timestep_out")(
      nn.silu(time)
    )  # [B, D]
    return audio, time + style_embedding


def _drop_flags(flags: Array | None, batch_size: int) -> Array:
  return jnp.zeros((batch_size,), bool) if flags is None else flags.astype(bool)


def frame_width(denoiser: nn.Module) -> int:
  """F, the width of one frame of x_t: `motion_width` (a motion code's D), else V * 3."""
  return denoiser.motion_width or denoiser.num_vertices * 3


def _check_noisy(x_t: Array, denoiser: nn.Module) -> None:
  width = frame_width(denoiser)
  if x_t.ndim != 3 or x_t.shape[-1] != width:
    raise ValueError(f"x_t must be [B, T, F] with F={width}, got shape {tuple(x_t.shape)}")


def _embedded_inputs(
  denoiser: nn.Module,
  x_t: Array,
  timesteps: Array,
  audio_features: Array,
  style: Array | None,
  frame_mask: Array,
  drop_audio: Array | None,
  drop_style: Array | None,
  previous: Array | None,
  drop_previous: Array | None,
) -> tuple[Array, Array, Array, Array]:
  """The front both denoisers share, built inside `denoiser`'s compact call: the projected
  motion `[B, P + T, D]`, the audio `[B, P + T, D]`, the global condition `[B, D]` and the mask
  `[B, P + T]` of the sequence the denoiser runs over.

  With `denoiser.previous_frames` P > 0 that sequence is the previous window's last P clean
  frames `previous [B, P, V*3]` (projected by the same layer as x_t; always valid), then the T
  noisy frames; the audio features then cover the P + T frames. Where `drop_previous [B]` (or
  when `previous` is None) the previous frames are the learned `null_previous [P, D]` and their
  audio `null_previous_audio`: a sequence's first window has nothing before it.
  """
  _check_noisy(x_t, denoiser)
  batch_size, num_frames = frame_mask.shape
  num_previous = denoiser.previous_frames
  if num_previous:
    if previous is None:
      previous = jnp.zeros((batch_size, num_previous, x_t.shape[-1]), x_t.dtype)
      drop_previous = jnp.ones((batch_size,), bool)
    elif previous.shape != (batch_size, num_previous, x_t.shape[-1]):
      raise ValueError(
        f"previous must be [B, P, V*3]=({batch_size}, {num_previous}, {x_t.shape[-1]}), got "
        f"{tuple(previous.shape)}"
      )
    drop_previous = _drop_flags(drop_previous, batch_size)
  elif previous is not None:
    raise ValueError(f"{type(denoiser).__name__} has previous_frames=0 but was given previous")
  audio, condition = DenoiserConditions(
    features=denoiser.d_model,
    num_styles=denoiser.num_styles,
    audio_frames_per_frame=denoiser.audio_frames_per_frame,
    previous_frames=num_previous,
    dtype=denoiser.dtype,
    name="conditions",
  )(
    timesteps,
    audio_features,
    style,
    _drop_flags(drop_audio, batch_size),
    _drop_flags(drop_style, batch_size),
    num_previous + num_frames,
    drop_previous,
  )
  motion = x_t if not num_previous else jnp.concatenate([previous.astype(x_t.dtype), x_t], axis=1)
  motion = dense(
    denoiser.d_model, ("vertices", "embed"), dtype=denoiser.dtype, name="motion_projection"
  )(motion.astype(denoiser.dtype))  # [B, P + T, D]
  if num_previous:
    start = denoiser.param(
      "null_previous", _embedding_init("time", "embed"), (num_previous, denoiser.d_model)
    )
    start = jnp.pad(start.astype(motion.dtype), ((0, num_frames), (0, 0)))
    is_previous = jnp.arange(num_previous + num_frames) < num_previous
    dropped = drop_previous[:, None, None] & is_previous[None, :, None]
    motion = jnp.where(dropped, start[None], motion)
    frame_mask = jnp.concatenate([jnp.ones((batch_size, num_previous), bool), frame_mask], axis=1)
  return motion, audio, condition, frame_mask.astype(bool)


def _prediction(denoiser: nn.Module, x: Array) -> Array:
  """The zero-initialised output both denoisers share: `[B, P + T, *]` -> `[B, T, V*3]` float32
  (the previous frames, if any, are inputs, not predicted)."""
  x = x[:, denoiser.previous_frames :]
  prediction = dense(
    frame_width(denoiser),
    ("embed", "vertices"),
    dtype=denoiser.dtype,
    zero_init=True,
    name="prediction_projection",
  )(x)
  return prediction.astype(jnp.float32)


# Sizes. DiffSpeaker and DiffPoseTalk are transformers of a few layers (DiffSpeaker: one biased
# layer over all frames): FaceFormer's sizes per dataset, twice as wide on VOCASET; these widths
# train on a CPU. `tiny` is for tests.
TRANSFORMER_DENOISER_VARIANTS: dict[str, dict] = {
  **FACEFORMER_VARIANTS,
  "vocaset": {**FACEFORMER_VARIANTS["vocaset"], "d_model": 128, "mlp_dim": 256},
}


class TransformerDenoiser(nn.Module):
  """DiffSpeaker/DiffPoseTalk-style denoiser: biased self-attention over all frames.

  The noisy offsets are projected to the width, the global condition (timestep + style) and the
  periodic positional encoding are added, and the audio either is added frame by frame
  (`audio_conditioning="aligned"`: each frame's own aligned features) or is read by a
  cross-attention branch in every layer (`"cross_attention"`, over the valid frames). Layers
  are `motion_block`s with FaceFormer's symmetric periodic ALiBi bias and the padding mask
  (`TransformerEncoder` when aligned). A zero-initialised Dense gives the prediction. With
  `previous_frames` P > 0 the layers run over the previous window's last P clean frames then
  the T noisy ones (`_embedded_inputs`), as DiffPoseTalk's decoder does.
  """

  num_vertices: int = 5023  # V, mesh vertices
  # Width of a frame of x_t when it is not vertex offsets (a motion code's D); 0: V * 3
  motion_width: int = 0
  d_model: int = 128  # transformer width
  num_heads: int = 4  # attention heads (one ALiBi slope each)
  num_layers: int = 1  # transformer layers
  mlp_dim: int = 256  # MLP hidden width
  period: int = 30  # frames per period of the positional encoding and the temporal bias
  audio_frames_per_frame: int = 1  # audio features per mesh frame: 1 VOCASET, 2 BIWI
  audio_conditioning: str = "aligned"  # "aligned" (added per frame) or "cross_attention"
  attention_window: int = 0  # frames each side a frame attends to; 0 = the whole sequence
  num_styles: int = 8  # speaking styles (training subjects); 0 disables
  previous_frames: int = 0  # P clean frames of the previous window leading x_t (DiffPoseTalk)
  dropout_rate: float = 0.1  # dropout on the encoded input and the residual branches
  pre_norm: bool = False  # False = post-norm layers
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(
    self,
    x_t: Array,
    timesteps: Array,
    audio_features: Array,
    style: Array | None,
    frame_mask: Array,
    *,
    drop_audio: Array | None = None,
    drop_style: Array | None = None,
    previous: Array | None = None,
    drop_previous: Array | None = None,
    train: bool = False,
  ) -> Array:
    """Args: x_t `[B, T, V*3]`; timesteps `[B]` int; audio_features `[B, (P + T) * r,
    D_audio]` (P = `previous_frames`: the previous frames' audio first); style `[B]` int;
    frame_mask `[B, T]` bool; drop_audio, drop_style `[B]` bool (True: the null embedding);
    previous `[B, P, V*3]` the previous window's last clean frames (None: the learned start
    for every example) and drop_previous `[B]` bool (True: the start). Returns the prediction
    `[B, T, V*3]` (float32)."""
    if self.audio_conditioning not in ("aligned", "cross_attention"):
      raise ValueError(
        f"audio_conditioning={self.audio_conditioning!r}: expected aligned or cross_attention"
      )
    x, audio, condition, frame_mask = _embedded_inputs(
      self,
      x_t,
      timesteps,
      audio_features,
      style,
      frame_mask,
      drop_audio,
      drop_style,
      previous,
      drop_previous,
    )  # [B, P + T, D] each, condition [B, D], frame_mask [B, P + T]
    num_frames = frame_mask.shape[1]
    encoding = periodic_positional_encoding(jnp.arange(num_frames), self.d_model, self.period)
    x = x + condition[:, None] + encoding.astype(x.dtype)[None]
    if self.audio_conditioning == "aligned":
      x = nn.Dropout(rate=self.dropout_rate)(x + audio, deterministic=not train)
      x = TransformerEncoder(
        d_model=self.d_model,
        num_heads=self.num_heads,
        num_layers=self.num_layers,
        mlp_dim=self.mlp_dim,
        period=self.period,
        attention_window=self.attention_window,
        dropout_rate=self.dropout_rate,
        pre_norm=self.pre_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        name="encoder",
      )(x, frame_mask, train)
    else:
      x = self._cross_attention_layers(x, audio, frame_mask, train)
    return _prediction(self, x)  # [B, T, V*3]

  def _cross_attention_layers(self, x, audio, frame_mask, train) -> Array:
    positions = jnp.arange(x.shape[1])
    bias = periodic_alibi_bias(
      positions, positions, alibi_slopes(self.num_heads), self.period, causal=False
    )  # [H, T, T]
    mask = padding_mask(frame_mask)  # [B, 1, 1, T] keys
    if self.attention_window > 0:
      local = jnp.abs(positions[:, None] - positions[None, :]) <= self.attention_window
      mask = mask & local[None, None]
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    for index in range(self.num_layers):
      x, _ = motion_block(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        pre_norm=self.pre_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        cross_attention=True,
        name=f"layer_{index}",
      )(x, mask, train, bias=bias[None], memory=audio, memory_mask=mask)
    if self.pre_norm:
      x = layer_norm(self.dtype, name="final_norm")(x)
    return x


# FaceDiffuser's shape: a multi-layer GRU over the frames; widths that train on a CPU.
RECURRENT_DENOISER_VARIANTS: dict[str, dict] = {
  "vocaset": dict(
    num_vertices=5023, d_model=128, num_layers=2, audio_frames_per_frame=1, num_styles=8
  ),
  "biwi": dict(
    num_vertices=23370, d_model=128, num_layers=2, audio_frames_per_frame=2, num_styles=6
  ),
  "tiny": dict(
    num_vertices=8,
    d_model=16,
    num_layers=1,
    audio_frames_per_frame=1,
    num_styles=3,
    dropout_rate=0.0,
  ),
}


class RecurrentDenoiser(nn.Module):
  """FaceDiffuser-style denoiser: the projected noisy offsets, the aligned audio and the global
  condition (timestep + style) concatenated per frame, through stacked GRUs (`nn.RNN` over
  `nn.GRUCell`, stopping at each example's last valid frame), then a zero-initialised Dense.
  Same call as `TransformerDenoiser`."""

  num_vertices: int = 5023  # V, mesh vertices
  # Width of a frame of x_t when it is not vertex offsets (a motion code's D); 0: V * 3
  motion_width: int = 0
  d_model: int = 128  # width of the embeddings and of the GRU state
  num_layers: int = 2  # stacked GRU layers
  bidirectional: bool = False  # each layer also reads the frames backwards (FaceDiffuser: no)
  audio_frames_per_frame: int = 1  # audio features per mesh frame: 1 VOCASET, 2 BIWI
  num_styles: int = 8  # speaking styles (training subjects); 0 disables
  previous_frames: int = 0  # P clean frames of the previous window read before x_t
  dropout_rate: float = 0.1  # dropout between GRU layers (FaceDiffuser: 0.3)
  unroll: int | bool = 1  # frames per iteration of the GRU's scan; True: fully unrolled
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(
    self,
    x_t: Array,
    timesteps: Array,
    audio_features: Array,
    style: Array | None,
    frame_mask: Array,
    *,
    drop_audio: Array | None = None,
    drop_style: Array | None = None,
    previous: Array | None = None,
    drop_previous: Array | None = None,
    train: bool = False,
  ) -> Array:
    """As `TransformerDenoiser.__call__` (the previous frames, if any, are read first)."""
    motion, audio, condition, frame_mask = _embedded_inputs(
      self,
      x_t,
      timesteps,
      audio_features,
      style,
      frame_mask,
      drop_audio,
      drop_style,
      previous,
      drop_previous,
    )  # [B, P + T, D] each, condition [B, D], frame_mask [B, P + T]
    condition = jnp.broadcast_to(condition[:, None], motion.shape)
    x = jnp.concatenate([motion, audio, condition], axis=-1)  # [B, P + T, 3D]
    lengths = frame_mask.sum(axis=1).astype(jnp.int32)  # [B]
    for index in range(self.num_layers):
      if index:
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
      forward = nn.RNN(
        nn.GRUCell(features=self.d_model, dtype=self.dtype),
        unroll=self.unroll,
        name=f"gru_{index}",
      )
      if self.bidirectional:
        backward = nn.RNN(
          nn.GRUCell(features=self.d_model, dtype=self.dtype),
          unroll=self.unroll,
          name=f"gru_{index}_backward",
        )
        x = nn.Bidirectional(forward, backward, name=f"bidirectional_{index}")(
          x, seq_lengths=lengths
        )  # [B, T, 2D]
      else:
        x = forward(x, seq_lengths=lengths)  # [B, T, D]
    return _prediction(self, x)  # [B, T, V*3]


# The denoisers' linear input (of the noisy offsets) and output layers (`_embedded_inputs`,
# `_prediction`), which sampling in their projection (`diffusion.sample_projected`) steps over.
PROJECTIONS = ("motion_projection", "prediction_projection")


def _projection_interceptor(projected: Array):
  """Flax method interceptor: `motion_projection` returns `projected` plus its bias for the
  noisy frames (their input unread; any previous frames leading them are projected as usual),
  `prediction_projection` returns its input (the hidden state) unprojected."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and module.name == PROJECTIONS[0]:
      noisy = (projected + module.variables["params"]["bias"]).astype(module.dtype)
      num_previous = args[0].shape[1] - projected.shape[1]  # clean frames leading x_t
      if not num_previous:
        return noisy
      leading = next_fun(args[0][:, :num_previous], **kwargs)
      return jnp.concatenate([leading, noisy], axis=1)
    if context.method_name == "__call__" and module.name == PROJECTIONS[1]:
      return args[0]
    return next_fun(*args, **kwargs)

  return interceptor


def guided_denoise_fn(
  denoiser: nn.Module,
  params: Any,
  audio_features: Array,
  style: Array | None,
  frame_mask: Array,
  guidance: diffusion.Guidance | None,
  scales: Array | tuple[float, ...] | None = None,
  *,
  previous: Array | None = None,
  drop_previous: Array | None = None,
  projected: bool = False,
) -> diffusion.DenoiseFn:
  """`denoise_fn(x_t, t)` of an (unbound) denoiser with `params`, for `diffusion.sample`.

  With `guidance` (its conditions among `CONDITIONS`), classifier-free guidance by
  `diffusion.guided_denoise_fn`: the guided conditions travel as keep flags `[B]` (null: False)
  that become the denoiser's `drop_*` inputs, and the audio features, style, mask and previous
  frames ride along (unguided) so that the condition subsets are batched into one call.
  Without, the conditional prediction.

  `projected`: the function of `diffusion.sample_projected` instead, `(z_t [B, T, D], t) ->
  hidden [B, T, D']`: z_t (the noisy offsets times the `motion_projection` kernel) replaces what
  that layer computes, and the function returns what the `prediction_projection` layer would
  project (both layers intercepted, `_projection_interceptor`). The guidance combination is the
  same on hidden states, its weights summing to one. The previous frames, if any, are
  projected as usual: only the noisy frames' projection is replaced.
  """
  batch_size = frame_mask.shape[0]
  inputs = {
    "audio_features": audio_features,
    "style_index": style,
    "frame_mask": frame_mask,
    "previous": previous,
    "drop_previous": drop_previous,
  }
  inputs = {k: v for k, v in inputs.items() if v is not None}

  def model_fn(x_t: Array, t: Array, conditions: Mapping[str, Array]) -> Array:
    drops = {f"drop_{name}": ~conditions[name] for name in CONDITIONS if name in conditions}

    def call(x_t: Array) -> Array:
      return denoiser.apply(
        {"params": params},
        x_t,
        t,
        conditions["audio_features"],
        conditions.get("style_index"),
        conditions["frame_mask"],
        previous=conditions.get("previous"),
        drop_previous=conditions.get("drop_previous"),
        **drops,
      )

    if not projected:
      return call(x_t)
    with nn.intercept_methods(_projection_interceptor(x_t)):
      # The noisy offsets themselves are never read: a placeholder of their shape.
      return call(jnp.zeros(x_t.shape[:-1] + (frame_width(denoiser),), x_t.dtype))

  if guidance is None or not guidance.conditions:
    return lambda x_t, t: model_fn(x_t, t, inputs)
  unknown = set(guidance.conditions) - set(CONDITIONS)
  if unknown:
    raise ValueError(f"guided conditions {sorted(unknown)}: the denoisers know {CONDITIONS}")
  keep = {name: jnp.ones((batch_size,), bool) for name in guidance.conditions}
  nulls = {name: jnp.zeros((), bool) for name in guidance.conditions}
  return diffusion.guided_denoise_fn(guidance, model_fn, {**inputs, **keep}, nulls, scales)


class DiffusionDecoder(nn.Module):
  """A denoiser trained and sampled as a speech-to-motion decoder (the `audio2mesh` decoder
  kinds `diffspeaker`, `diffposetalk` and `facediffuser`); same inputs and outputs as the other
  decoders.

  `__call__` (training) diffuses the true offsets `x_0 = (vertices - template) *
  sample_scale` to a random timestep per example, drops audio and style to their nulls with
  their probabilities, and returns the vertices of the x_0 the prediction implies (so the task's
  vertex and velocity losses apply to it) with the prediction, target and loss weight in aux.
  `generate` samples x_0 from noise drawn from the `sample` rng stream (a fixed key from
  `sample_seed` when none is given) or from one `seed` per example, guided by
  `guidance_scales`; with `projected_sampling` the chain runs on the denoiser's projected input.

  Windows (DiffPoseTalk): with the denoiser's `previous_frames` P > 0, a training example's
  first P frames are the previous window's (true motion, or the learned start with
  `previous_drop_probability`) and the rest are denoised; `generate` then samples
  `window_frames` at a time, each window conditioned on the last P frames sampled before it
  (`sample_window`), in one `lax.scan` over the windows. `window_frames` > 0 with P = 0 samples
  independent windows.
  """

  denoiser: nn.Module  # TransformerDenoiser or RecurrentDenoiser; parameters under "denoiser/"
  num_train_timesteps: int = 1000  # N, the forward process's steps
  beta_schedule: str = "scaled_linear"  # linear, scaled_linear or squaredcos_cap_v2 (cosine)
  beta_start: float = 0.00085  # first beta (linear schedules); Stable Diffusion's, DiffSpeaker's
  beta_end: float = 0.012  # last beta (linear schedules)
  # Rescale the betas so x_T is pure noise (Lin et al. 2023): else a denoiser learns to read the
  # signal left in x_T, which sampling from pure noise does not have. Not with epsilon.
  zero_terminal_snr: bool = False
  prediction_type: str = "sample"  # what the denoiser predicts: sample (x_0), epsilon or v
  min_snr_gamma: float = 0.0  # min-SNR-gamma loss weights; 0 = uniform
  # Offsets in metres times this are the diffused x_0: 1000 (millimetres) gives VOCASET-like
  # offsets a spread near the unit noise's
  sample_scale: float = 1000.0
  audio_drop_probability: float = 0.1  # training: chance an example's audio is the null
  style_drop_probability: float = 0.1  # training: chance an example's style is the null
  # Training with previous frames: chance an example starts from the learned start instead of
  # its true previous frames, as a sequence's first window does (DiffPoseTalk: one clip in two)
  previous_drop_probability: float = 0.5
  audio_guidance_scale: float = 1.0  # sampling: audio's classifier-free guidance scale
  style_guidance_scale: float = 1.0  # sampling: style's scale (sequential rule, after audio)
  sampling_method: str = "ddim"  # ddim or ddpm (ancestral)
  # The chain runs on the denoiser's projected input (`diffusion.sample_projected`: no V*3-wide
  # projection inside the loop; equal up to float rounding); False: on x_t itself
  projected_sampling: bool = True
  sampling_steps: int = 50  # denoising steps at prediction (a subset of the N)
  eta: float = 0.0  # DDIM: 0 deterministic given the initial noise
  timestep_spacing: str = "leading"  # how the steps are chosen (diffusion.inference_timesteps)
  sample_seed: int = 0  # the noise key when `generate` gets no `sample` rng
  # Frames sampled per window at prediction (each after the last `previous_frames` of the one
  # before); 0 = the whole sequence at once (one window)
  window_frames: int = 0

  DENOISER: ClassVar[type[nn.Module]] = TransformerDenoiser
  VARIANTS: ClassVar[dict[str, dict]] = TRANSFORMER_DENOISER_VARIANTS

  @classmethod
  def from_variant(cls, variant: str, **overrides: Any) -> DiffusionDecoder:
    """A named denoiser size (`VARIANTS`) with fields overridden; overrides that name this
    class's fields configure the diffusion, the rest the denoiser (which drops the numerics,
    such as `attention_impl`, it does not use)."""
    own = {f.name for f in dataclasses.fields(cls)} - {"denoiser", "parent", "name"}
    denoiser_fields = {f.name for f in dataclasses.fields(cls.DENOISER)}
    fields = {**_decode_variant(cls.__name__, cls.VARIANTS, variant)}
    decoder = {}
    for key, value in overrides.items():
      if key in own:
        decoder[key] = value
      elif key in denoiser_fields:
        fields[key] = value
      elif key != "attention_impl":
        raise ValueError(f"{cls.__name__} has no field {key!r} (nor has {cls.DENOISER.__name__})")
    return cls(denoiser=cls.DENOISER(**fields), **decoder)

  @property
  def num_vertices(self) -> int:
    return self.denoiser.num_vertices

  @property
  def frame_width(self) -> int:
    return frame_width(self.denoiser)

  @property
  def audio_frames_per_frame(self) -> int:
    return self.denoiser.audio_frames_per_frame

  @property
  def previous_frames(self) -> int:
    return self.denoiser.previous_frames

  def schedule(self) -> diffusion.Schedule:
    if self.zero_terminal_snr and self.prediction_type == "epsilon":
      raise ValueError(
        "zero_terminal_snr=True with prediction_type='epsilon': x_0 cannot be recovered from "
        "the noise at the last timestep (pure noise); use sample or v_prediction"
      )
    return diffusion.make_schedule(
      self.beta_schedule,
      self.num_train_timesteps,
      self.beta_start,
      self.beta_end,
      zero_terminal_snr=self.zero_terminal_snr,
    )

  def sampler(self) -> diffusion.Sampler:
    return diffusion.Sampler(
      method=self.sampling_method,
      num_steps=self.sampling_steps,
      eta=self.eta,
      timestep_spacing=self.timestep_spacing,
    )

  def guidance(self, scales: tuple[float, float] | None = None) -> diffusion.Guidance:
    """Audio then style (DiffPoseTalk's order), each with its drop probability and scale."""
    if scales is None:
      scales = (self.audio_guidance_scale, self.style_guidance_scale)
    return diffusion.Guidance(
      conditions=CONDITIONS,
      drop_probabilities=(self.audio_drop_probability, self.style_drop_probability),
      scales=tuple(scales),
    )

  def _key(self, stream: str) -> Array:
    return self.make_rng(stream) if self.has_rng(stream) else jax.random.key(self.sample_seed)

  def _mask(self, frame_mask, batch_size, num_frames) -> Array:
    if frame_mask is None:
      return jnp.ones((batch_size, num_frames), bool)
    if frame_mask.shape != (batch_size, num_frames):
      raise ValueError(
        f"frame_mask must be [B, T]=({batch_size}, {num_frames}), got {tuple(frame_mask.shape)}"
      )
    return frame_mask.astype(bool)

  def _check_template(self, template: Array, batch_size: int) -> None:
    check_template(template, self.num_vertices, batch_size)

  def _to_vertices(self, sample: Array, template: Array, frame_mask: Array) -> tuple[Array, Array]:
    batch_size, num_frames = frame_mask.shape
    offsets = sample.reshape(batch_size, num_frames, self.num_vertices, 3) / self.sample_scale
    offsets = jnp.where(frame_mask[:, :, None, None], offsets.astype(jnp.float32), 0.0)
    return template[:, None].astype(jnp.float32) + offsets, offsets

  def __call__(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    vertices: Array,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    frame_mask: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """One denoising step at a random timestep per example (its noise, timesteps and condition
    drops from the `dropout` rng stream).

    Args: audio_features `[B, T * r, D_audio]`; template `[B, V, 3]`; style `[B]` int;
    vertices `[B, T, V, 3]` the truth; frame_mask `[B, T]` bool. With `previous_frames` P > 0
    the first P frames are the previous window's (given, not denoised); an example whose P
    first frames are not all valid starts from the learned start.

    Returns: `vertices [B, T, V, 3]` of the implied x_0 (the truth on the P previous frames),
    and aux with "offsets", "prediction", "target" and "noisy_sample" `[B, T, V*3]` (the
    denoiser's output, its regression target and its input x_t; zero on the previous frames),
    "timesteps" and "loss_weight" `[B]`, "loss_mask" `[B, T]` (the frames the loss scores: the
    valid denoised ones) and "velocity_mask" `[B, T - 1]` (frame pairs t - 1, t whose velocity
    it scores: t scored, t - 1 scored or a previous frame the denoiser saw).
    """
    if emotion is not None or intensity is not None:
      raise ValueError("the diffusion decoders condition on audio and style only")
    batch_size, num_frames = vertices.shape[:2]
    num_previous = self.previous_frames
    if num_previous >= num_frames:
      raise ValueError(
        f"training examples of {num_frames} frames leave none to denoise after the "
        f"previous_frames={num_previous}: make data.window_frames larger"
      )
    self._check_template(template, batch_size)
    frame_mask = self._mask(frame_mask, batch_size, num_frames)
    offsets = vertices.astype(jnp.float32) - template[:, None].astype(jnp.float32)
    sample = offsets.reshape(batch_size, num_frames, -1) * self.sample_scale  # [B, T, V*3]
    previous, window = sample[:, :num_previous], sample[:, num_previous:]
    window_mask = frame_mask[:, num_previous:]
    schedule = self.schedule()
    noise_key, drop_key, previous_key = jax.random.split(self._key("dropout"), 3)
    noisy = diffusion.noise_batch(
      noise_key,
      schedule,
      window,
      prediction_type=self.prediction_type,
      min_snr_gamma=self.min_snr_gamma or None,
    )
    keep = {name: jnp.ones((batch_size,), bool) for name in CONDITIONS}
    if train:
      nulls = {name: jnp.zeros((), bool) for name in CONDITIONS}
      keep = diffusion.drop_conditions(self.guidance(), drop_key, keep, nulls)
    has_previous = frame_mask[:, :num_previous].all(axis=1)  # [B]
    if train and num_previous:
      drawn = jax.random.uniform(previous_key, (batch_size,))
      has_previous = has_previous & (drawn >= self.previous_drop_probability)
    prediction = self.denoiser(
      noisy.noisy_sample,
      noisy.timesteps,
      audio_features,
      style,
      window_mask,
      drop_audio=~keep["audio"],
      drop_style=~keep["style"],
      previous=previous if num_previous else None,
      drop_previous=~has_previous if num_previous else None,
      train=train,
    )  # [B, T - P, V*3]
    estimate = diffusion.to_sample(
      schedule, prediction, noisy.noisy_sample, noisy.timesteps, self.prediction_type
    )
    predicted, offsets = self._to_vertices(
      jnp.concatenate([previous, estimate], axis=1), template, frame_mask
    )
    is_previous = jnp.arange(num_frames) < num_previous  # [T]
    loss_mask = frame_mask & ~is_previous[None]
    seen = loss_mask | (is_previous[None] & has_previous[:, None])
    pad = lambda x: jnp.pad(x, ((0, 0), (num_previous, 0), (0, 0)))  # noqa: E731
    aux = {
      "offsets": offsets,
      "prediction": pad(prediction),
      "target": pad(noisy.target),
      "noisy_sample": pad(noisy.noisy_sample),
      "timesteps": noisy.timesteps,
      "loss_weight": noisy.weight,
      "loss_mask": loss_mask,
      "velocity_mask": loss_mask[:, 1:] & seen[:, :-1],
    }
    return predicted, aux

  def generate(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    num_frames: int | None = None,
    frame_mask: Array | None = None,
    guidance_scales: tuple[float, float] | Array | None = None,
    seed: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Samples `vertices [B, T, V, 3]` (aux "offsets") with `sampling_method` over
    `sampling_steps`, from initial noise and step noise drawn from one key (the `sample` rng),
    or with `seed [B]` int from one key per example (`jax.random.key(seed[b])`: an example's
    sample is then the same whatever else is in the batch).

    Guidance scales (audio, style), a tuple, an array `[2]` or one pair per example `[B, 2]`,
    default to the fields; guidance is skipped when all are 1 (the conditional prediction, one
    denoiser call per step): decided when tracing for a tuple, at run time for an array.

    With `window_frames` or `previous_frames` set, the sequence is sampled window by window
    (`sample_window`): window k from the key(s) `fold_in(key, k)`, after the last
    `previous_frames` frames of window k - 1 (the learned start for k = 0); the last window is
    padded and masked, so the valid frames do not depend on how far the sequence is padded."""
    if emotion is not None or intensity is not None:
      raise ValueError("the diffusion decoders condition on audio and style only")
    batch_size = audio_features.shape[0]
    if num_frames is None:
      num_frames = (
        frame_mask.shape[1]
        if frame_mask is not None
        else audio_features.shape[1] // self.audio_frames_per_frame
      )
    self._check_template(template, batch_size)
    frame_mask = self._mask(frame_mask, batch_size, num_frames)
    windowed = bool(self.window_frames or self.previous_frames)
    if self.is_initializing():
      # Parameters are created by a call of the denoiser, never inside the sampling loop.
      self._init_denoiser(audio_features, style, frame_mask, windowed)
    # One key, or one per example ([B] key array).
    key = self._key("sample") if seed is None else jax.vmap(jax.random.key)(seed)
    if windowed:
      sample = self._sample_windows(audio_features, style, frame_mask, guidance_scales, key)
    else:
      shape = (batch_size, num_frames, self.frame_width)
      initial_noise, step_key = _initial_noise(key, shape)
      run = self._sampler_fn(style, guidance_scales)
      sample = run(audio_features, frame_mask, initial_noise, step_key)
    predicted, offsets = self._to_vertices(sample, template, frame_mask)
    return predicted, {"offsets": offsets}

  def sample_window(
    self,
    audio_features: Array,
    style: Array | None,
    previous: Array | None,
    *,
    frame_mask: Array,
    first: bool | Array,
    key: Array,
    guidance_scales: tuple[float, float] | Array | None = None,
  ) -> Array:
    """One window of the windowed sampler: x_0 `[B, W, V*3]` (in the sample's units) of the W
    frames of `frame_mask [B, W]`, given the audio features `[B, (P + W) * r, D_audio]` of the
    previous P frames and the window, and `previous [B, P, V*3]` the last P frames sampled
    before (ignored, replaced by the learned start, where `first`). Noise from `key` (one key,
    or a key array `[B]` of one per example)."""
    return self._window_fn(style, guidance_scales)(audio_features, frame_mask, previous, first, key)

  def _init_denoiser(self, audio_features, style, frame_mask, windowed) -> None:
    batch_size, num_frames = frame_mask.shape
    if windowed:
      window = self.window_frames or num_frames
      audio_features = self._padded_features(audio_features, num_frames, window)
      audio_features = audio_features[
        :, : (self.previous_frames + window) * self.audio_frames_per_frame
      ]
      num_frames, frame_mask = window, jnp.ones((batch_size, window), bool)
    x_t = jnp.zeros((batch_size, num_frames, self.frame_width), jnp.float32)
    timesteps = jnp.zeros((batch_size,), jnp.int32)
    self.denoiser(x_t, timesteps, audio_features, style, frame_mask)

  def _padded_features(self, audio_features: Array, num_frames: int, window: int) -> Array:
    """The features of T frames `[B, T * r, D]` with P frames of zeros before (the first
    window's previous frames, replaced by the learned start) and zeros after up to whole
    windows: `[B, (P + K * W) * r, D]`, K = ceil(T / W)."""
    num_windows = max(1, -(-num_frames // window))
    r = self.audio_frames_per_frame
    if audio_features.shape[1] < num_frames * r:
      raise ValueError(
        f"audio_features has {audio_features.shape[1]} frames but {num_frames} mesh frames need "
        f"{num_frames * r}"
      )
    after = (num_windows * window - num_frames) * r
    features = audio_features[:, : num_frames * r]
    return jnp.pad(features, ((0, 0), (self.previous_frames * r, after), (0, 0)))

  def _sample_windows(self, audio_features, style, frame_mask, guidance_scales, key) -> Array:
    """x_0 `[B, T, V*3]` window by window: a `lax.scan` over K = ceil(T / W) windows whose body
    samples one (`sample_window`, itself a scan over the sampling steps)."""
    batch_size, num_frames = frame_mask.shape
    window, num_previous = self.window_frames or num_frames, self.previous_frames
    r = self.audio_frames_per_frame
    if num_previous > window:
      raise ValueError(
        f"previous_frames={num_previous} must not exceed window_frames={window}: each window "
        "is conditioned on frames of the one before only"
      )
    if not isinstance(num_frames, int):
      raise ValueError(
        f"windowed generation (window_frames={self.window_frames}, previous_frames="
        f"{num_previous}) scans over a whole number of windows and needs a concrete number of "
        f"frames, got {num_frames}: export it at a fixed length (fdjax export --dim t=N)"
      )
    num_windows = max(1, -(-num_frames // window))
    features = self._padded_features(audio_features, num_frames, window)
    mask = jnp.pad(frame_mask, ((0, 0), (0, num_windows * window - num_frames)))
    width = self.frame_width
    window_fn = self._window_fn(style, guidance_scales)

    def body(previous, index):
      window_features = jax.lax.dynamic_slice_in_dim(
        features, index * window * r, (num_previous + window) * r, axis=1
      )
      window_mask = jax.lax.dynamic_slice_in_dim(mask, index * window, window, axis=1)
      first = index == 0
      sample = window_fn(
        window_features, window_mask, previous, first, _fold_in(key, index)
      )  # [B, W, V*3]
      return sample[:, window - num_previous :], sample

    start = jnp.zeros((batch_size, num_previous, width), jnp.float32)
    _, windows = jax.lax.scan(body, start, jnp.arange(num_windows))  # [K, B, W, V*3]
    windows = jnp.swapaxes(windows, 0, 1).reshape(batch_size, num_windows * window, width)
    return windows[:, :num_frames]

  def _window_fn(self, style, guidance_scales):
    """`window_fn(audio_features, frame_mask, previous, first, key) -> x_0`, the body of
    `sample_window`, free of module state (it runs inside the scan over windows)."""
    run = self._sampler_fn(style, guidance_scales)
    num_previous, width = self.previous_frames, self.frame_width

    def window_fn(audio_features, frame_mask, previous, first, key):
      batch_size, window = frame_mask.shape
      initial_noise, step_key = _initial_noise(key, (batch_size, window, width))
      if not num_previous:
        return run(audio_features, frame_mask, initial_noise, step_key)
      drop_previous = jnp.broadcast_to(jnp.asarray(first, bool), (batch_size,))
      return run(
        audio_features,
        frame_mask,
        initial_noise,
        step_key,
        previous=previous,
        drop_previous=drop_previous,
      )

    return window_fn

  def _sampler_fn(self, style, guidance_scales):
    """`run(audio_features, frame_mask, initial_noise [B, T, V*3], step_key, **previous) ->
    x_0`: `diffusion.sample` (or `sample_projected`) of the (guided) denoiser, free of module
    state: the unbound denoiser applied to its parameters (bound Flax modules cannot be called
    inside the scans). Guidance is skipped when the scales are a tuple of ones (at trace time)
    or an array of ones (at run time, `lax.cond`)."""
    scales = (self.audio_guidance_scale, self.style_guidance_scale)
    if guidance_scales is not None:
      scales = guidance_scales
    denoiser, params = self.denoiser.clone(parent=None), self.denoiser.variables["params"]
    guidance, sampler, schedule = self.guidance(), self.sampler(), self.schedule()
    prediction_type, projected = self.prediction_type, self.projected_sampling

    def sample(audio_features, frame_mask, initial_noise, step_key, guided_scales, previous):
      denoise_fn = guided_denoise_fn(
        denoiser,
        params,
        audio_features,
        style,
        frame_mask,
        None if guided_scales is None else guidance,  # None: unguided
        guided_scales,
        projected=projected,
        **previous,
      )
      common = dict(prediction_type=prediction_type)
      if projected:
        project_in, project_out = (nn.meta.unbox(params[name]) for name in PROJECTIONS)
        common.update(
          project_in=project_in["kernel"],
          project_out=project_out["kernel"],
          out_bias=project_out["bias"],
        )
      sample_fn = diffusion.sample_projected if projected else diffusion.sample
      return sample_fn(sampler, schedule, denoise_fn, initial_noise, step_key, **common)

    def run(audio_features, frame_mask, initial_noise, step_key, **previous):
      inputs = (audio_features, frame_mask, initial_noise, step_key)
      if isinstance(scales, tuple | list):
        unguided = all(float(s) == 1.0 for s in scales)
        return sample(*inputs, None if unguided else jnp.asarray(scales, jnp.float32), previous)
      array = jnp.asarray(scales, jnp.float32)
      array = array.T if array.ndim == 2 else array  # per example: [B, 2] -> [2, B]
      return jax.lax.cond(
        jnp.all(array == 1.0),
        lambda: sample(*inputs, None, previous),
        lambda: sample(*inputs, array, previous),
      )

    return run


def _initial_noise(key: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
  """(x_T `[B, ...]`, the key(s) of the steps' noise) from one key, or from a key array `[B]`
  of one key per example (example b's noise then depends on its own key alone)."""
  if key.ndim == 0:
    initial_key, step_key = jax.random.split(key)
    return jax.random.normal(initial_key, shape, jnp.float32), step_key
  keys = jax.vmap(jax.random.split)(key)  # [B, 2]
  initial = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys[:, 0])
  return initial, keys[:, 1]


def _fold_in(key: Array, index: Array) -> Array:
  """`jax.random.fold_in` of one key or of each key of a key array `[B]`."""
  if key.ndim == 0:
    return jax.random.fold_in(key, index)
  return jax.vmap(lambda k: jax.random.fold_in(k, index))(key)


class DiffSpeakerDecoder(DiffusionDecoder):
  """`DiffusionDecoder` over a `TransformerDenoiser` (the `diffspeaker` decoder kind)."""

  DENOISER: ClassVar[type[nn.Module]] = TransformerDenoiser
  VARIANTS: ClassVar[dict[str, dict]] = TRANSFORMER_DENOISER_VARIANTS


class DiffPoseTalkDecoder(DiffusionDecoder):
  """`DiffusionDecoder` over a `TransformerDenoiser` sampled in windows after the previous
  window's last frames (the `diffposetalk` decoder kind; the experiment config sets
  `previous_frames`, `window_frames`, the cosine schedule and the guidance)."""

  DENOISER: ClassVar[type[nn.Module]] = TransformerDenoiser
  VARIANTS: ClassVar[dict[str, dict]] = TRANSFORMER_DENOISER_VARIANTS


class FaceDiffuserDecoder(DiffusionDecoder):
  """`DiffusionDecoder` over a `RecurrentDenoiser` (the `facediffuser` decoder kind)."""

  DENOISER: ClassVar[type[nn.Module]] = RecurrentDenoiser
  VARIANTS: ClassVar[dict[str, dict]] = RECURRENT_DENOISER_VARIANTS


__all__ = (
  "CONDITIONS",
  "RECURRENT_DENOISER_VARIANTS",
  "TRANSFORMER_DENOISER_VARIANTS",
  "DenoiserConditions",
  "DiffPoseTalkDecoder",
  "DiffSpeakerDecoder",
  "DiffusionDecoder",
  "FaceDiffuserDecoder",
  "RecurrentDenoiser",
  "TransformerDenoiser",
  "guided_denoise_fn",
  "timestep_encoding",
)
