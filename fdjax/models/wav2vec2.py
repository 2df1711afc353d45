"""wav2vec 2.0 and HuBERT speech encoders in Flax Linen (one trunk, configured by fields).

Where it sits: the audio half of the audio2mesh task family (FaceFormer, CodeTalker, SelfTalk,
EmoFace and the methods built on them). A normalised 16 kHz waveform `[B, S]` goes in; one
feature vector per 20 ms audio frame comes out `[B, T_a, D]` (or, given `num_frames` or a causal
`fps`, one per mesh frame). Parameter names follow Hugging Face `transformers`
(`fdjax.models.hf_convert` loads a local checkpoint one-to-one); the transformer layers are
`fdjax.models.attention` blocks. The trunk, the alignment of audio features to mesh frames as
each reference method does it, and the causal (streaming) variant are described in
docs/design.md section 12.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models.attention import BlockNames, TransformerBlock, padding_mask
from fdjax.models.layers import activation, layer_norm

Array = jax.Array
Dtype = Any

# Eps of the norms inside the conv stack: `transformers` builds them with torch's default.
_CONV_NORM_EPS = 1e-5
_BATCH_NORM_EPS = 1e-5

# Fields that carry the same name and meaning in `Wav2Vec2Config` / `HubertConfig`.
_HF_FIELDS = (
  "conv_dim",
  "conv_kernel",
  "conv_stride",
  "conv_bias",
  "feat_extract_norm",
  "feat_extract_activation",
  "feat_proj_layer_norm",
  "feat_proj_dropout",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
  "hidden_act",
  "hidden_dropout",
  "attention_dropout",
  "activation_dropout",
  "layerdrop",
  "layer_norm_eps",
  "num_conv_pos_embeddings",
  "num_conv_pos_embedding_groups",
  "conv_pos_batch_norm",
  "do_stable_layer_norm",
  "apply_spec_augment",
  "mask_time_prob",
  "mask_time_length",
  "mask_time_min_masks",
  "mask_feature_prob",
  "mask_feature_length",
  "mask_feature_min_masks",
  "initializer_range",
)

VARIANTS: dict[str, dict[str, Any]] = {
  # A CPU-sized encoder for demos and tests; same 20 ms frame hop as the real ones.
  "tiny": dict(
    conv_dim=(32,) * 7,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
  ),
  # facebook/wav2vec2-base(-960h) and facebook/hubert-base-ls960 shapes (the field defaults).
  "base": dict(),
  # facebook/wav2vec2-large-lv60 and facebook/hubert-large-ll60k shapes.
  "large": dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    conv_bias=True,
  ),
}


# The transformer layers' parameter names, as `transformers` names them (see hf_convert).
BLOCK_NAMES = BlockNames(
  norms=("layer_norm", "final_layer_norm"),
  projections=("q_proj", "k_proj", "v_proj", "out_proj"),
  mlp=("intermediate_dense", "output_dense"),
)


def _norm_init(init: Callable[..., Array]) -> Callable[..., Array]:
  return nn.with_logical_partitioning(init, ("norm",))


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance E[(x - mean)^2] like torch, not E[x^2] - mean^2.
  return layer_norm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def conv_output_lengths(
  num_samples: Array | int, conv_kernel: tuple[int, ...], conv_stride: tuple[int, ...]
) -> Array | int:
  """Number of frames an unpadded strided conv stack makes of `num_samples` samples ([B] or int)."""
  for kernel, stride in zip(conv_kernel, conv_stride, strict=True):
    num_samples = (num_samples - kernel) // stride + 1
  return num_samples


def interpolate_features(
  features: Array,
  num_frames: int,
  source_lengths: Array | None = None,
  target_lengths: Array | None = None,
) -> Array:
  """Linearly resamples features along time to `num_frames` (FaceFormer's VOCASET alignment).

  Same as `torch.nn.functional.interpolate(mode="linear", align_corners=True)` along time: the
  first and last valid frames map onto each other. With per-example lengths ([B] int) only the
  first `source_lengths[b]` input frames are read and they are spread over the first
  `target_lengths[b]` output frames; output frames past that repeat the last valid input frame.

  Args:
    features: [B, T_a, D] audio features.
    num_frames: output length N (static).
    source_lengths: [B] valid input frames per example; all T_a when None.
    target_lengths: [B] valid output frames per example; all N when None.

  Returns:
    [B, N, D] features at the mesh frame rate.
  """
  batch, num_audio_frames, _ = features.shape
  if isinstance(num_frames, int) and num_frames < 1:
    raise ValueError(f"num_frames must be positive, got {num_frames}")
  src = jnp.full((batch,), num_audio_frames) if source_lengths is None else source_lengths
  tgt = jnp.full((batch,), num_frames) if target_lengths is None else target_lengths
  src = jnp.maximum(jnp.asarray(src, jnp.int32), 1)
  tgt = jnp.asarray(tgt, jnp.int32)
  scale = (src - 1).astype(jnp.float32) / jnp.maximum(tgt - 1, 1).astype(jnp.float32)  # [B]
  position = jnp.arange(num_frames, dtype=jnp.float32)[None] * scale[:, None]  # [B, N]
  position = jnp.minimum(position, (src - 1)[:, None].astype(jnp.float32))
  lower = jnp.floor(position).astype(jnp.int32)
  upper = jnp.minimum(lower + 1, (src - 1)[:, None])
  weight = (position - lower)[..., None].astype(features.dtype)  # [B, N, 1]
  below = jnp.take_along_axis(features, lower[..., None], axis=1, mode="clip")
  above = jnp.take_along_axis(features, upper[..., None], axis=1, mode="clip")
  return below * (1 - weight) + above * weight


def pair_audio_frames(features: Array, num_frames: int, frames_per_frame: int = 2) -> Array:
  """Crops or zero-pads features to `frames_per_frame * num_frames` frames (BIWI alignment).

  FaceFormer and CodeTalker on BIWI keep the 50 Hz audio frames and give each 25 fps mesh frame
  two of them (frame t attends to audio frames 2t and 2t+1 through the decoder's alignment mask).

  Args:
    features: [B, T_a, D].
    num_frames: number of mesh frames N.
    frames_per_frame: audio frames per mesh frame R.

  Returns:
    [B, R * N, D]; frames past T_a are zeros.
  """
  length = frames_per_frame * num_frames
  # Pad by the full length, then cut: no comparison of lengths, so symbolic shapes export.
  features = jnp.pad(features, ((0, 0), (0, length), (0, 0)))
  return features[:, :length]


def causal_frame_indices(
  num_frames: Any, sample_rate: int, fps: float, hop: int, frames_per_frame: int = 1
) -> Array:
  """Audio frames each mesh frame reads under the causal alignment rule.

  Mesh frame t spans samples `[t * sr / fps, (t + 1) * sr / fps)`; audio frame i of a causal
  encoder ends at sample `(i + 1) * hop`. Frame t reads the `frames_per_frame` (r) audio frames
  that end last at or before its own end: `last(t) = floor((t + 1) * sr / (fps * hop)) - 1` and
  `last(t) - r + 1 .. last(t)`. At 16 kHz, hop 320: 30 fps reads audio frames 0, 2, 4, 5, 7, 9,
  ... (5 audio frames per 3 mesh frames); 25 fps with r = 2 reads 2t and 2t + 1 (BIWI's pairs).
  Integer arithmetic when `fps` is integral, so it also works for symbolic (export) lengths.

  Returns:
    [T, r] int32 audio frame indices; negative where a mesh frame ends before r audio frames
    do (mesh frames shorter than audio frames), which `align_causal` clips to frame 0.
  """
  frames = jnp.arange(num_frames, dtype=jnp.int32)[:, None] + 1  # [T, 1]
  if float(fps).is_integer():
    last = frames * sample_rate // (int(fps) * hop) - 1
  else:
    last = jnp.floor(frames * (sample_rate / (fps * hop))).astype(jnp.int32) - 1
  return last + jnp.arange(1 - frames_per_frame, 1, dtype=jnp.int32)[None]  # [T, r]


def align_causal(
  features: Array,
  num_frames: Any,
  *,
  sample_rate: int,
  fps: float,
  hop: int,
  frames_per_frame: int = 1,
) -> Array:
  """Gathers a causal encoder's audio frames for each mesh frame (`causal_frame_indices`).

  Args:
    features: [B, T_a, D] audio frames of a causal encoder (hop `hop` samples).
    num_frames: mesh frames T.
    sample_rate, fps: audio samples and mesh frames per second.
    hop: samples per audio frame (`Wav2Vec2Encoder.hop`).
    frames_per_frame: audio frames per mesh frame r.

  Returns:
    [B, T * r, D]: frame t's r audio frames at rows `t * r .. t * r + r - 1`. Indices past the
    last audio frame (audio shorter than the frames) repeat it; those frames are padding.
  """
  indices = causal_frame_indices(num_frames, sample_rate, fps, hop, frames_per_frame)
  indices = jnp.maximum(indices.reshape(1, -1, 1), 0)  # [1, T * r, 1]
  # take_along_axis's clip needs no proof that T_a >= 1, so symbolic lengths export.
  return jnp.take_along_axis(features, indices, axis=1, mode="clip")


def causal_resample_indices(
  num_frames: Any, sample_rate: int, fps: float, hop: int
) -> tuple[Array, Array, Array]:
  """Where each mesh frame reads a causal encoder's audio frames when resampled to its rate.

  Mesh frame t sits at the uniform rate position `p_t = t * (sr / hop) / fps` in audio frames
  (FaceFormer's rate mapping) and is interpolated between frames `floor(p_t)` and `ceil(p_t)`,
  each index clipped to `causal_frame_indices`' `last(t)` so that no frame that ends after mesh
  frame t ends is read. At 16 kHz, hop 320 and 30 fps the clip never triggers (frame t reads
  `5t // 3` and `ceil(5t / 3)`, both ending by its end); at rates just below the audio frame
  rate (48 fps) it does, and frame t then reads `last(t)` alone. Integer arithmetic when `fps` is
  integral, so the weights are exact, equal in every stream chunk (which starts on a mesh and an
  audio frame boundary) and work for symbolic (export) lengths.

  Returns:
    lower, upper: [T] int32 audio frame indices (>= 0); weight: [T] f32, the share of `upper`.
  """
  frames = jnp.arange(num_frames, dtype=jnp.int32)  # [T]
  if float(fps).is_integer():
    numerator, denominator = frames * sample_rate, int(fps) * hop
    lower = numerator // denominator
    remainder = numerator - lower * denominator
    upper = lower + (remainder > 0).astype(jnp.int32)
    weight = remainder.astype(jnp.float32) / denominator
  else:
    position = frames.astype(jnp.float32) * (sample_rate / (fps * hop))
    lower = jnp.floor(position).astype(jnp.int32)
    upper = jnp.ceil(position).astype(jnp.int32)
    weight = position - lower
  last = causal_frame_indices(num_frames, sample_rate, fps, hop)[:, 0]
  lower = jnp.maximum(jnp.minimum(lower, last), 0)
  upper = jnp.maximum(jnp.minimum(upper, last), 0)
  return lower, upper, weight


def resample_causal(
  features: Array, num_frames: Any, *, sample_rate: int, fps: float, hop: int
) -> Array:
  """Linearly resamples a causal encoder's audio frames to the mesh frame rate, causally.

  The causal counterpart of `interpolate_features` (see `causal_resample_indices`): mesh frame
  t is `(1 - w_t) * features[lower_t] + w_t * features[upper_t]`, and none of the frames it
  reads ends after it does.

  Args:
    features: [B, T_a, C] audio frames of a causal encoder (hop `hop` samples).
    num_frames: mesh frames T.
    sample_rate, fps: audio samples and mesh frames per second.
    hop: samples per audio frame.

  Returns:
    [B, T, C]. Indices past the last audio frame (audio shorter than the frames) read it; those
    frames are padding.
  """
  lower, upper, weight = causal_resample_indices(num_frames, sample_rate, fps, hop)
  # take_along_axis's clip needs no proof that T_a >= 1, so symbolic lengths export.
  below = jnp.take_along_axis(features, lower[None, :, None], axis=1, mode="clip")
  above = jnp.take_along_axis(features, upper[None, :, None], axis=1, mode="clip")
  weight = weight[None, :, None].astype(features.dtype)  # [1, T, 1]
  return below * (1 - weight) + above * weight


def span_mask(
  rng: Array,
  lengths: Array,
  size: int,
  mask_prob: float,
  mask_length: int,
  min_masks: int = 0,
) -> Array:
  """Random spans to mask for SpecAugment, with the span counts of `transformers`.

  Per example, `max(int(mask_prob * length / mask_length + u), min_masks)` spans of
  `mask_length` (u ~ U[0, 1) shared by the batch, as the reference does), with distinct start
  positions drawn uniformly from the starts that keep the span inside `length`. Spans may
  overlap, so `mask_prob` is an upper bound on the masked fraction.

  Args:
    rng: PRNG key.
    lengths: [B] int valid length per example.
    size: the axis length L (static).
    mask_prob: fraction of the axis to mask (before overlaps).
    mask_length: span length.
    min_masks: lower bound on the number of spans.

  Returns:
    [B, L] bool, True where masked.
  """
  batch = lengths.shape[0]
  # Upper bound for any u in [0, 1) and any length <= size, so top_k has a static k.
  max_spans = min(max(int(mask_prob * size / mask_length + 1), min_masks), size // mask_length)
  if max_spans <= 0 or mask_length > size:
    return jnp.zeros((batch, size), bool)
  offset_rng, start_rng = jax.random.split(rng)
  offset = jax.random.uniform(offset_rng, ())
  lengths = jnp.asarray(lengths, jnp.int32)
  num_spans = jnp.floor(mask_prob * lengths / mask_length + offset).astype(jnp.int32)
  num_spans = jnp.maximum(num_spans, min_masks)
  num_spans = jnp.where(num_spans * mask_length > size, size // mask_length, num_spans)
  num_starts = lengths - (mask_length - 1)
  num_spans = jnp.where(num_starts < num_spans, jnp.maximum(num_starts, 0), num_spans)
  position = jnp.arange(size)
  scores = jax.random.uniform(start_rng, (batch, size))
  scores = jnp.where(position[None] < num_starts[:, None], scores, -1.0)
  _, starts = jax.lax.top_k(scores, max_spans)  # [B, K] distinct random starts
  keep = jnp.arange(max_spans)[None] < num_spans[:, None]  # [B, K]
  inside = (position[None, None] >= starts[..., None]) & (
    position[None, None] < starts[..., None] + mask_length
  )  # [B, K, L]
  return jnp.any(inside & keep[..., None], axis=1)


class ConvLayer(nn.Module):
  """One strided conv of the feature extractor, with its optional norm and activation."""

  features: int  # output channels
  kernel_size: int  # taps
  stride: int  # hop in input frames
  use_bias: bool  # conv bias (False in base checkpoints, True in large ones)
  norm: str | None  # "group" (per-channel over time), "layer" (over channels) or None
  activation: str  # activation name
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, T, C_in] -> [B, (T - kernel) // stride + 1, C_out]."""
    x = nn.Conv(
      features=self.features,
      kernel_size=(self.kernel_size,),
      strides=(self.stride,),
      padding="VALID",
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      # kaiming normal, as `transformers` initialises these convs.
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.variance_scaling(2.0, "fan_in", "normal"), ("kernel", "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      name="conv",
    )(x)
    if self.norm == "group":
      # One group per channel: each channel normalised over time (wav2vec2-base's first layer).
      x = nn.GroupNorm(
        num_groups=self.features,
        epsilon=_CONV_NORM_EPS,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        use_fast_variance=False,
        scale_init=_norm_init(nn.initializers.ones),
        bias_init=_norm_init(nn.initializers.zeros),
        name="layer_norm",
      )(x)
    elif self.norm == "layer":
      x = _layer_norm(_CONV_NORM_EPS, self.dtype, self.param_dtype, "layer_norm")(x)
    return activation(self.activation, "feat_extract_activation")(x)


class FeatureExtractor(nn.Module):
  """The strided conv stack that turns samples into 20 ms frames (frozen by FaceFormer)."""

  conv_dim: tuple[int, ...]  # output channels per conv layer
  conv_kernel: tuple[int, ...]  # kernel size per conv layer
  conv_stride: tuple[int, ...]  # stride per conv layer
  conv_bias: bool  # convs have biases
  # "group": GroupNorm (over time) on layer 0 only; "frame": LayerNorm (over channels) on layer
  # 0 only; "layer": LayerNorm on every layer
  feat_extract_norm: str
  activation: str  # activation after each layer
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, audio: Array) -> Array:
    """[B, S] samples -> [B, T_a, conv_dim[-1]] features."""
    x = audio[..., None].astype(self.dtype)  # [B, S, 1]
    for i, (features, kernel, stride) in enumerate(
      zip(self.conv_dim, self.conv_kernel, self.conv_stride, strict=True)
    ):
      if self.feat_extract_norm == "layer":
        norm = "layer"
      elif i == 0:
        norm = "group" if self.feat_extract_norm == "group" else "layer"
      else:
        norm = None
      x = ConvLayer(
        features=features,
        kernel_size=kernel,
        stride=stride,
        use_bias=self.conv_bias,
        norm=norm,
        activation=self.activation,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"conv_layers_{i}",
      )(x)
      x = nn.with_logical_constraint(x, ("batch", "time", None))
    return x


class FeatureProjection(nn.Module):
  """Layer norm (optional in HuBERT) and a dense map from conv channels to the model width."""

  hidden_size: int  # model width D
  layer_norm: bool  # normalise the conv features first
  layer_norm_eps: float  # eps of that layer norm
  dropout: float  # dropout on the projected features
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, features: Array, train: bool) -> tuple[Array, Array]:
    """[B, T, C] -> ([B, T, D] projected, [B, T, C] the (normalised) features it projected)."""
    if self.layer_norm:
      features = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(
        features
      )
    hidden = nn.Dense(
      features=self.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      # uniform(+-1/sqrt(fan_in)), as `transformers` initialises this projection.
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), ("conv_out", "embed")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name="projection",
    )(features)
    hidden = nn.Dropout(rate=self.dropout)(hidden, deterministic=not train)
    return hidden, features


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed running statistics (HuBERT's `conv_pos_batch_norm`).

  The statistics sit in `params` (so one tree holds the whole model) behind `stop_gradient`, so
  they never get a gradient, and the base config's `optim.weight_decay_exclude` names them
  (`batch_norm/(mean|var)$`), so weight decay leaves them alone too: they stay as loaded.
  Normalising with batch statistics in training, as torch's train mode does, is not reproduced:
  the loaded statistics are used throughout.
  """

  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, T, D] -> [B, T, D]."""
    features = x.shape[-1]
    scale = self.param("scale", _norm_init(nn.initializers.ones), (features,), self.param_dtype)
    bias = self.param("bias", _norm_init(nn.initializers.zeros), (features,), self.param_dtype)
    mean = self.param("mean", _norm_init(nn.initializers.zeros), (features,), self.param_dtype)
    var = self.param("var", _norm_init(nn.initializers.ones), (features,), self.param_dtype)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    inverse = jax.lax.rsqrt(var.astype(jnp.float32) + _BATCH_NORM_EPS) * scale
    y = (x.astype(jnp.float32) - mean) * inverse + bias
    return y.astype(self.dtype)


def grouped_conv1d(
  x: Array,
  kernel: Array,
  padding: tuple[int, int],
  groups: int,
  method: str = "auto",
  taps_per_block: int = 16,
  allow_fft: bool = True,
) -> Array:
  """Grouped 1-D convolution `[B, T, C]` x `[K, C / G, C]` -> `[B, T + lo + hi - K + 1, C]`.

  XLA's CPU backend computes the gradient of a grouped convolution (wav2vec2's positional conv:
  K=128, 16 groups) far slower than its forward, so on CPU (`method="auto"`) it is computed in
  one of two other forms, each equal to the convolution to float32 rounding:
  - `"fft"` (inputs of at least K frames): per group, the product of the input's and the
    flipped kernel's real FFTs (length >= T + lo + hi, so no wrap-around reaches the output),
    a block-diagonal einsum over channels in the frequency domain; cost O(T log T), not O(T K).
  - `"shifted"` (shorter inputs, and symbolic lengths under `jax.export`): block-diagonal
    einsums over windows of `taps_per_block` shifted copies of the input (one einsum per tap
    would make the kernel's gradient K padded copies of the whole kernel summed).
  Elsewhere `"auto"` is the native grouped convolution (`"native"`). The FFT spreads every
  input frame's rounding over every output frame: where outputs must not depend on some inputs
  at all (a causal conv, whose stream must equal the offline run bit for bit), pass
  `allow_fft=False`.
  """
  taps = kernel.shape[0]
  if method == "auto":
    if jax.default_backend() != "cpu":
      method = "native"
    elif not allow_fft or not isinstance(x.shape[1], int):
      # A symbolic length (jax.export) also: the FFT size must be concrete.
      method = "shifted"
    else:
      method = "fft" if x.shape[1] >= taps else "shifted"
  if method == "native":
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1,),
      padding=(padding,),
      dimension_numbers=("NWC", "WIO", "NWC"),
      feature_group_count=groups,
    )
  batch, _, channels = x.shape
  per_group = channels // groups
  dtype = jnp.result_type(x, kernel)
  padded = jnp.pad(x, ((0, 0), padding, (0, 0)))
  length = padded.shape[1]
  frames = length - taps + 1
  padded = padded.reshape(batch, length, groups, per_group)  # [B, L, G, C/G]
  weights = kernel.reshape(taps, per_group, groups, per_group)  # [K, C/G in, G, C/G out]
  if method == "fft":
    size = 1 << (length - 1).bit_length()  # >= L: the circular wrap only reaches t < K - 1
    spectrum = jnp.fft.rfft(padded.astype(jnp.float32), n=size, axis=1)  # [B, F, G, C/G]
    # y[t] = sum_k x[t + k] w[k] is the linear convolution with the flipped kernel at t + K - 1.
    kernel_spectrum = jnp.fft.rfft(weights[::-1].astype(jnp.float32), n=size, axis=0)
    product = jnp.einsum("bfgc,fcgd->bfgd", spectrum, kernel_spectrum)
    y = jnp.fft.irfft(product, n=size, axis=1)[:, taps - 1 : taps - 1 + frames]
    return y.reshape(batch, frames, channels).astype(dtype)
  if method != "shifted":
    raise ValueError(f"method={method!r}: expected auto, native, fft or shifted")
  y = jnp.zeros((batch, frames, groups, per_group), dtype)
  for start in range(0, taps, taps_per_block):
    stop = min(start + taps_per_block, taps)
    window = jnp.stack([padded[:, tap : tap + frames] for tap in range(start, stop)], axis=2)
    y = y + jnp.einsum("btkgc,kcgd->btgd", window, weights[start:stop])  # window: [B, T, k, G, C/G]
  return y.reshape(batch, frames, channels)


class PositionalConvEmbedding(nn.Module):
  """Relative position information from a wide grouped conv over time (wav2vec 2.0's choice).

  The kernel is weight-normalised per tap (torch `weight_norm(dim=2)`):
  kernel[k] = kernel_g[k] * kernel_v[k] / ||kernel_v[k]||. With `batch_norm` (newer HuBERT) the
  input is batch-normalised instead and the kernel is a plain parameter.
  """

  kernel_size: int  # taps (128 in base models); an even size drops the last output frame
  groups: int  # channel groups of the conv
  batch_norm: bool  # HuBERT's conv_pos_batch_norm instead of the weight norm
  activation: str  # activation after the conv
  causal: bool = False  # pad kernel_size - 1 frames on the left only: no frame sees later ones
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> tuple[Array, Array | None]:
    """[B, T, D] -> ([B, T, D] positional embedding to add to x, updated context or None).

    `context` ([B, kernel_size - 1, D], causal only) holds the conv inputs of the frames before
    x, in place of the zero padding: a stream of chunks then gets the frames of the whole
    sequence. The updated context is the last kernel_size - 1 inputs, x included.
    """
    width = x.shape[-1]
    shape = (self.kernel_size, width // self.groups, width)  # [K, D / G, D]
    names = ("kernel", "conv_in", "conv_out")
    # Same spread as `transformers`' normal(0, 2 / sqrt(K * D)).
    std = 2.0 / np.sqrt(self.kernel_size * width)
    if self.batch_norm:
      x = FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="batch_norm")(x)
      kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(std), names),
        shape,
        self.param_dtype,
      )
    else:
      direction = self.param(
        "kernel_v",
        nn.with_logical_partitioning(nn.initializers.normal(std), names),
        shape,
        self.param_dtype,
      )
      # Expected norm of a tap of kernel_v at init, so that kernel ~ kernel_v at the start.
      tap_norm = std * np.sqrt(shape[1] * shape[2])
      magnitude = self.param(
        "kernel_g",
        nn.with_logical_partitioning(nn.initializers.constant(tap_norm), ("kernel",)),
        (self.kernel_size,),
        self.param_dtype,
      )
      norm = jnp.sqrt(jnp.sum(jnp.square(direction.astype(jnp.float32)), axis=(1, 2)))
      kernel = direction * (magnitude / norm)[:, None, None]
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      (width,),
      self.param_dtype,
    )
    x = x.astype(self.dtype)
    history = self.kernel_size - 1
    if context is not None:
      if not self.causal:
        raise ValueError("a positional conv context (streaming) needs causal=True")
      x = jnp.concatenate([context.astype(self.dtype), x], axis=1)  # [B, K - 1 + T, D]
      context = x[:, x.shape[1] - history :]
      padding = ((0, 0),)
    elif self.causal:
      padding = ((history, 0),)
    else:
      padding = ((self.kernel_size // 2, self.kernel_size // 2),)
    y = grouped_conv1d(
      x, kernel.astype(self.dtype), padding[0], self.groups, allow_fft=not self.causal
    )
    y = y + bias.astype(self.dtype)
    if not self.causal and self.kernel_size % 2 == 0:
      y = y[:, :-1]  # symmetric padding of an even kernel yields one frame too many
    return activation(self.activation, "feat_extract_activation")(y), context


class TransformerEncoder(nn.Module):
  """Positional conv embedding, then the transformer layers (scanned or unrolled)."""

  num_hidden_layers: int  # transformer layers L
  num_attention_heads: int  # attention heads
  intermediate_size: int  # MLP width
  hidden_act: str  # MLP activation
  num_conv_pos_embeddings: int  # taps of the positional conv
  num_conv_pos_embedding_groups: int  # groups of the positional conv
  conv_pos_batch_norm: bool  # batch norm instead of weight norm in the positional conv
  pos_conv_activation: str  # activation after the positional conv
  do_stable_layer_norm: bool  # pre-norm layers and a final layer norm
  layer_norm_eps: float  # eps of the layer norms
  hidden_dropout: float  # dropout on residual branches and after the positional embedding
  attention_dropout: float  # dropout on attention probabilities
  activation_dropout: float  # dropout inside the MLP
  layerdrop: float  # layer skip probability in training
  initializer_range: float  # std of dense kernels at init
  scan_layers: bool  # one scanned layer with stacked params (fast compile) or L unrolled ones
  remat: bool  # recompute layer activations in the backward pass
  causal: bool = False  # causal positional conv; frames attend to themselves and earlier ones
  attention_window: int = 0  # causal: frames attended to, the frame itself included; 0 = all
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array | None,
    train: bool,
    output_hidden_states: bool,
    stream_state: dict[str, Array] | None = None,
  ) -> tuple[Array, Array | None, dict[str, Array] | None]:
    """[B, T, D] -> ([B, T, D], [L + 1, B, T, D] layer inputs/outputs or None, stream state).

    With `stream_state` (causal, see `Wav2Vec2Encoder.initial_stream_state`) x is the next
    chunk of a stream: "position_context" replaces the positional conv's zero padding,
    "keys"/"values" [B, L, P, H, Dh] are every layer's keys and values of the P frames before
    x and "valid" [B, P] marks those that exist (False before the stream's start). The
    updated state (the same arrays, shifted by T frames) is returned; else None.
    """
    if mask is not None:
      x = jnp.where(mask[..., None], x, 0)  # padding must not leak through the positional conv
    position, position_context = PositionalConvEmbedding(
      kernel_size=self.num_conv_pos_embeddings,
      groups=self.num_conv_pos_embedding_groups,
      batch_norm=self.conv_pos_batch_norm,
      activation=self.pos_conv_activation,
      causal=self.causal,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="pos_conv_embed",
    )(x, None if stream_state is None else stream_state["position_context"])
    x = x + position
    if not self.do_stable_layer_norm:
      x = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(x)
    x = nn.Dropout(rate=self.hidden_dropout)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "time", "embed"))
    layer_input = x

    past = None
    attention_mask = None if mask is None else padding_mask(mask)  # [B, 1, 1, T] keys
    if stream_state is not None:
      history = stream_state["valid"].shape[1]
      key_valid = jnp.concatenate(
        [stream_state["valid"], jnp.ones(x.shape[:2], bool)], axis=1
      )  # [B, P + T]
      allowed = self._allowed(history + jnp.arange(x.shape[1]), jnp.arange(key_valid.shape[1]))
      attention_mask = allowed[None, None] & padding_mask(key_valid)  # [B, 1, T, P + T]
      # Layers first, as the scan slices them.
      past = (jnp.moveaxis(stream_state["keys"], 1, 0), jnp.moveaxis(stream_state["values"], 1, 0))
    elif self.causal:
      positions = jnp.arange(x.shape[1])
      allowed = self._allowed(positions, positions)[None, None]  # [1, 1, T, T]
      attention_mask = allowed if attention_mask is None else allowed & attention_mask

    kernel_init = nn.initializers.normal(self.initializer_range)
    block_fields = dict(
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      pre_norm=self.do_stable_layer_norm,
      layer_norm_eps=self.layer_norm_eps,
      dropout=self.hidden_dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
      mlp_drops_output=True,
      layerdrop=self.layerdrop,
      attention_kernel_init=kernel_init,
      mlp_kernel_init=kernel_init,
      names=BLOCK_NAMES,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    # static_argnums counts self as 0: `train` is argument 3.
    block_cls = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
    if self.scan_layers:

      def layer(block, x, layer_past):
        x, key_value = block(x, attention_mask, train, layer_past)
        kept = key_value if layer_past is not None else None
        return x, (x if output_hidden_states else None, kept)

      scanned = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0,
        length=self.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      # outputs [L, B, T, D] or None; new_key_values [L, B, T, H, Dh] twice or None
      x, (outputs, new_key_values) = scanned(block_cls(**block_fields, name="layers"), x, past)
    else:
      per_layer, per_layer_key_values = [], []
      for i in range(self.num_hidden_layers):
        layer_past = None if past is None else (past[0][i], past[1][i])
        x, key_value = block_cls(**block_fields, name=f"layers_{i}")(
          x, attention_mask, train, layer_past
        )
        per_layer.append(x)
        per_layer_key_values.append(key_value)
      outputs = jnp.stack(per_layer) if output_hidden_states else None
      new_key_values = None
      if past is not None:
        new_key_values = tuple(jnp.stack(kv) for kv in zip(*per_layer_key_values, strict=True))
    if self.do_stable_layer_norm:
      x = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(x)
    hidden_states = None
    if output_hidden_states:
      # As `transformers` reports them: the first layer's input, then every layer's output
      # (for pre-norm models the last one is before the final layer norm).
      hidden_states = jnp.concatenate([layer_input[None], outputs], axis=0)
    new_state = None
    if stream_state is not None:

      def shift(old, new):  # [L, B, P, H, Dh] + [L, B, T, H, Dh] -> the last P, batch first
        joined = jnp.concatenate([old.astype(new.dtype), new], axis=2)
        return jnp.moveaxis(joined[:, :, joined.shape[2] - history :], 0, 1).astype(old.dtype)

      new_state = {
        "position_context": position_context.astype(stream_state["position_context"].dtype),
        "keys": shift(past[0], new_key_values[0]),
        "values": shift(past[1], new_key_values[1]),
        "valid": key_valid[:, key_valid.shape[1] - history :],
      }
    return x, hidden_states, new_state

  def _allowed(self, query_positions: Array, key_positions: Array) -> Array:
    """[Tq, Tk] bool: causal, and within the attention window when there is one."""
    allowed = key_positions[None, :] <= query_positions[:, None]
    if self.attention_window > 0:
      allowed &= key_positions[None, :] > query_positions[:, None] - self.attention_window
    return allowed


class Wav2Vec2Encoder(nn.Module):
  """wav2vec 2.0 / HuBERT encoder: waveform [B, S] -> features [B, T_a, D].

  Field names and defaults follow `transformers.Wav2Vec2Config` (wav2vec2-base); build one
  from a checkpoint's config with `from_hf_config`, or by name with `from_variant`.

  Example:
    >>> encoder = Wav2Vec2Encoder.from_variant("tiny")
    >>> audio = jnp.zeros((2, 16000))
    >>> params = encoder.init(jax.random.key(0), audio)["params"]
    >>> hidden, aux = encoder.apply({"params": params}, audio)  # hidden [2, 49, 64]
  """

  conv_dim: tuple[int, ...] = (512,) * 7  # output channels per feature-extractor conv
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)  # kernel size per conv
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)  # stride per conv (product 320: 20 ms)
  conv_bias: bool = False  # feature-extractor convs have biases
  # "group": GroupNorm over time on conv 0 only; "frame": LayerNorm over channels on conv 0 only
  # (a causal stand-in for "group" with the same parameters); "layer": LayerNorm on every conv
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"  # activation of the convs and the positional conv
  feat_proj_layer_norm: bool = True  # layer norm before the projection (some HuBERTs drop it)
  feat_proj_dropout: float = 0.0  # dropout after the feature projection
  hidden_size: int = 768  # model width D
  num_hidden_layers: int = 12  # transformer layers
  num_attention_heads: int = 12  # attention heads
  intermediate_size: int = 3072  # MLP width
  hidden_act: str = "gelu"  # MLP activation
  hidden_dropout: float = 0.1  # dropout on residual branches and the positional embedding
  attention_dropout: float = 0.1  # dropout on attention probabilities
  activation_dropout: float = 0.1  # dropout inside the MLP
  layerdrop: float = 0.1  # probability of skipping a transformer layer in training
  layer_norm_eps: float = 1e-5  # eps of the transformer and projection layer norms
  num_conv_pos_embeddings: int = 128  # taps of the positional conv
  num_conv_pos_embedding_groups: int = 16  # groups of the positional conv
  conv_pos_batch_norm: bool = False  # HuBERT: frozen batch norm instead of weight norm
  do_stable_layer_norm: bool = False  # pre-norm transformer (large models) vs post-norm (base)
  apply_spec_augment: bool = True  # SpecAugment masking of projected features in training
  mask_time_prob: float = 0.05  # fraction of frames masked (upper bound) in training
  mask_time_length: int = 10  # frames per time-mask span
  mask_time_min_masks: int = 2  # minimum time-mask spans per example
  mask_feature_prob: float = 0.0  # fraction of channels zeroed (upper bound) in training
  mask_feature_length: int = 10  # channels per feature-mask span
  mask_feature_min_masks: int = 0  # minimum feature-mask spans
  initializer_range: float = 0.02  # std of dense kernels at init
  frame_alignment: str = "interpolate"  # with num_frames: "interpolate" (VOCASET) or "pairs" (BIWI)
  audio_frames_per_frame: int = 2  # audio frames per mesh frame for frame_alignment="pairs"
  causal: bool = False  # no frame depends on later audio (streaming)
  # causal: resample the conv features to this many frames per second (the mesh frame rate) before
  # the transformer, by `resample_causal`; 0 = keep one frame per hop (aligned by align_causal)
  fps: float = 0.0
  sample_rate: int = 16000  # audio samples per second (with fps: where mesh frames fall)
  attention_window: int = 0  # causal: frames each frame attends to, itself included; 0 = all
  scan_layers: bool = True  # scan over stacked layer params (fast compile) or unroll
  remat: bool = False  # rematerialise transformer layers in the backward pass
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (bfloat16 on accelerators)
  param_dtype: Dtype = jnp.float32  # parameter dtype

  def __post_init__(self) -> None:
    super().__post_init__()
    lengths = {len(self.conv_dim), len(self.conv_kernel), len(self.conv_stride)}
    if len(lengths) != 1:
      raise ValueError(
        "conv_dim, conv_kernel and conv_stride must have one entry per conv layer, got lengths "
        f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}"
      )
    if self.feat_extract_norm not in ("group", "frame", "layer"):
      raise ValueError(
        f"feat_extract_norm={self.feat_extract_norm!r} is not 'group', 'frame' or 'layer'"
      )
    if self.causal and self.feat_extract_norm == "group":
      raise ValueError(
        "causal=True with feat_extract_norm='group': the group norm normalises conv 0 over the "
        "whole clip, so every frame would depend on later audio; use 'frame' (same parameters) "
        "or 'layer'"
      )
    if self.attention_window < 0:
      raise ValueError(f"attention_window must be >= 0, got {self.attention_window}")
    if self.fps < 0:
      raise ValueError(f"fps must be >= 0, got {self.fps}")
    if self.fps and not self.causal:
      raise ValueError(
        f"fps={self.fps:g} resamples a causal encoder's frames to the mesh frame rate; a "
        "non-causal encoder aligns them with num_frames (frame_alignment)"
      )
    if self.fps * self.hop > self.sample_rate:
      raise ValueError(
        f"fps={self.fps:g} is above the audio frame rate ({self.sample_rate}/{self.hop} = "
        f"{self.sample_rate / self.hop:g} per second): mesh frames would end before the audio "
        "frames they read"
      )
    if self.attention_window and not self.causal:
      raise ValueError(
        f"attention_window={self.attention_window} limits a causal encoder's attention to the "
        "past; set causal=True"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by "
        f"num_conv_pos_embedding_groups={self.num_conv_pos_embedding_groups}"
      )
    if self.frame_alignment not in ("interpolate", "pairs"):
      raise ValueError(f"frame_alignment={self.frame_alignment!r} is not 'interpolate' or 'pairs'")
    activation(self.feat_extract_activation, "feat_extract_activation")
    activation(self.hidden_act, "hidden_act")

  @classmethod
  def from_hf_config(cls, hf_config: Mapping[str, Any], **overrides: Any) -> Wav2Vec2Encoder:
    """Builds the encoder a `Wav2Vec2Config` / `HubertConfig` (as a dict) describes.

    Keys this trunk does not use (vocabulary, heads, quantizer) are ignored; features it does
    not implement (adapters) are an error. `overrides` set any field (dtype, dropouts, ...).
    """
    model_type = hf_config.get("model_type")
    if model_type not in ("wav2vec2", "hubert"):
      raise ValueError(
        f"config model_type={model_type!r}: only 'wav2vec2' and 'hubert' share this trunk"
      )
    if hf_config.get("add_adapter"):
      raise ValueError("config add_adapter=True (adapter after the encoder): not supported")
    if hf_config.get("adapter_attn_dim") is not None:
      raise ValueError("config adapter_attn_dim is set (MMS attention adapters): not supported")
    position_type = hf_config.get("position_embeddings_type")
    if position_type not in (None, "conv"):
      raise ValueError(f"config position_embeddings_type={position_type!r}: not supported")
    fields: dict[str, Any] = {name: hf_config[name] for name in _HF_FIELDS if name in hf_config}
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
      if name in fields:
        fields[name] = tuple(int(v) for v in fields[name])
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_variant(cls, variant: str, **overrides: Any) -> Wav2Vec2Encoder:
    """Builds a named size ("tiny", "base", "large"); `overrides` set any field."""
    if variant not in VARIANTS:
      raise ValueError(f"unknown wav2vec2 variant {variant!r}; known: {sorted(VARIANTS)}")
    return cls(**{**VARIANTS[variant], **overrides})

  @property
  def receptive_field(self) -> int:
    """Samples that make exactly one audio frame: the shortest usable input."""
    field = 1
    for kernel, stride in zip(reversed(self.conv_kernel), reversed(self.conv_stride), strict=True):
      field = (field - 1) * stride + kernel
    return field

  @property
  def hop(self) -> int:
    """Samples between consecutive audio frames (320, 20 ms at 16 kHz, for wav2vec2)."""
    return int(np.prod(self.conv_stride))

  @property
  def causal_padding(self) -> int:
    """Zeros a causal encoder puts before the audio so that S samples make S // hop frames."""
    return max(self.receptive_field - self.hop, 0) if self.causal else 0

  def num_audio_frames(self, num_samples: Array | int) -> Array | int:
    """Audio frames T_a for `num_samples` samples (int or [B] array)."""
    return conv_output_lengths(
      num_samples + self.causal_padding, self.conv_kernel, self.conv_stride
    )

  def num_mesh_frames(self, num_samples: Any) -> Any:
    """Whole mesh frames (at `fps`) in `num_samples` samples: the frames a resampling causal
    encoder returns when not told `num_frames` (integer arithmetic for an integral fps, so it
    works on symbolic export lengths)."""
    if float(self.fps).is_integer():
      return num_samples * int(self.fps) // self.sample_rate
    return int(num_samples * self.fps // self.sample_rate)

  def initial_stream_state(self, batch_size: int) -> dict[str, Array]:
    """The state of a causal encoder before a stream's first chunk (see `__call__`).

    Returns:
      "audio_context" [B, receptive_field - hop] the last samples of the previous chunk (the
      conv stack's left context; zeros = the causal padding), "position_context"
      [B, num_conv_pos_embeddings - 1, D] the positional conv's inputs of the last frames,
      "keys" and "values" [B, L, attention_window - 1, H, Dh] every layer's keys and values of
      the last frames, "valid" [B, attention_window - 1] bool which of those frames exist.
      Frames are transformer frames: audio frames, or mesh frames when `fps` is set.
    """
    if not self.causal or self.attention_window < 1:
      raise ValueError(
        "streaming needs a causal encoder with a bounded attention window (causal=True, "
        f"attention_window >= 1); got causal={self.causal}, "
        f"attention_window={self.attention_window}"
      )
    history = self.attention_window - 1
    head_dim = self.hidden_size // self.num_attention_heads
    cache = (batch_size, self.num_hidden_layers, history, self.num_attention_heads, head_dim)
    return {
      "audio_context": jnp.zeros((batch_size, self.causal_padding), jnp.float32),
      "position_context": jnp.zeros(
        (batch_size, self.num_conv_pos_embeddings - 1, self.hidden_size), self.dtype
      ),
      "keys": jnp.zeros(cache, self.dtype),
      "values": jnp.zeros(cache, self.dtype),
      "valid": jnp.zeros((batch_size, history), bool),
    }

  @nn.compact
  def __call__(
    self,
    audio: Array,
    audio_mask: Array | None = None,
    train: bool = False,
    *,
    num_frames: int | None = None,
    frame_mask: Array | None = None,
    output_hidden_states: bool = False,
    stream_state: dict[str, Array] | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Encodes a batch of waveforms, or the next chunk of a batch of streams.

    Args:
      audio: [B, S] f32 waveform (normalised, 16 kHz for pretrained checkpoints).
      audio_mask: [B, S] bool valid samples (right padding); None when all are valid. Padded
        frames are zeroed before the positional conv and never attended to. Group-norm
        checkpoints (wav2vec2-base) were trained on zero-padded batches without a mask and
        `transformers` advises not passing one to them; it is honoured either way.
      train: enables dropout, layerdrop and SpecAugment (needs the "dropout" rng).
      num_frames: align the CNN features to N mesh frames before the transformer, by
        `frame_alignment` (N frames when "interpolate", R * N audio frames when "pairs"), or
        for a causal encoder with `fps` by `resample_causal` (N frames; default: the whole mesh
        frames in the audio). Not for a causal encoder with fps=0.
      frame_mask: [B, N] bool valid mesh frames; implies num_frames = N and gives each example's
        target length for the alignment.
      output_hidden_states: also return every layer's hidden states in aux.
      stream_state: (causal encoders) the state after the previous chunk of a stream, or
        `initial_stream_state` before the first; `audio` is then the next chunk, a whole number
        of hops (and with `fps` of mesh frames) long, and the frames equal those of the whole
        stream encoded at once.

    Returns:
      hidden: [B, T, D] with T = T_a (no alignment), N ("interpolate", or causal with fps) or
        R * N ("pairs").
      aux: "extract_features" [B, T, C] the (normalised) conv features fed to the projection,
        "frame_mask" [B, T] bool valid output frames, with output_hidden_states
        "hidden_states" [L + 1, B, T, D], and with stream_state "stream_state" (updated).
    """
    if audio.ndim != 2:
      raise ValueError(f"audio must be [B, S], got shape {audio.shape}")
    if self.causal and not self.fps and (num_frames is not None or frame_mask is not None):
      raise ValueError(
        "a causal encoder with fps=0 returns one frame per hop; align its frames to mesh frames "
        "with align_causal, or set fps, instead of passing num_frames or frame_mask"
      )
    # Only a concrete length can be checked; a symbolic one (jax.export) is the caller's promise.
    minimum = self.receptive_field - self.causal_padding
    if stream_state is None and isinstance(audio.shape[1], int) and audio.shape[1] < minimum:
      raise ValueError(
        f"audio has {audio.shape[1]} samples, fewer than the receptive field of the conv stack "
        f"({minimum} samples)"
      )
    new_audio_context = None
    if self.fps and num_frames is None and frame_mask is None:
      num_frames = self.num_mesh_frames(audio.shape[1])
    if stream_state is not None:
      self._check_chunk(audio, audio_mask, train)
      audio = jnp.concatenate(
        [stream_state["audio_context"].astype(audio.dtype), audio], axis=1
      )  # [B, P + S]
      new_audio_context = audio[:, audio.shape[1] - self.causal_padding :]
    elif self.causal:
      audio = jnp.pad(audio, ((0, 0), (self.causal_padding, 0)))
    features = FeatureExtractor(
      conv_dim=self.conv_dim,
      conv_kernel=self.conv_kernel,
      conv_stride=self.conv_stride,
      conv_bias=self.conv_bias,
      feat_extract_norm=self.feat_extract_norm,
      activation=self.feat_extract_activation,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="feature_extractor",
    )(audio)  # [B, T_a, C]
    batch, num_audio_frames = features.shape[:2]
    feature_lengths = None
    mask = None
    if audio_mask is not None:
      feature_lengths = self.num_audio_frames(jnp.sum(audio_mask, axis=-1, dtype=jnp.int32))
      mask = jnp.arange(num_audio_frames)[None] < feature_lengths[:, None]  # [B, T_a]
    if self.fps:
      features, mask = self._resample(features, feature_lengths, num_frames, frame_mask)
    elif frame_mask is not None or num_frames is not None:
      features, mask = self._align(features, feature_lengths, num_frames, frame_mask)

    hidden, extract_features = FeatureProjection(
      hidden_size=self.hidden_size,
      layer_norm=self.feat_proj_layer_norm,
      layer_norm_eps=self.layer_norm_eps,
      dropout=self.feat_proj_dropout,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="feature_projection",
    )(features, train)
    hidden = nn.with_logical_constraint(hidden, ("batch", "time", "embed"))

    if self.mask_time_prob > 0 or self.mask_feature_prob > 0:
      masked_spec_embed = self.param(
        "masked_spec_embed",
        nn.with_logical_partitioning(nn.initializers.uniform(1.0), ("embed",)),
        (self.hidden_size,),
        self.param_dtype,
      )
      if train and self.apply_spec_augment:
        hidden = self._spec_augment(hidden, mask, masked_spec_embed)

    hidden, hidden_states, new_stream_state = TransformerEncoder(
      num_hidden_layers=self.num_hidden_layers,
      num_attention_heads=self.num_attention_heads,
      intermediate_size=self.intermediate_size,
      hidden_act=self.hidden_act,
      num_conv_pos_embeddings=self.num_conv_pos_embeddings,
      num_conv_pos_embedding_groups=self.num_conv_pos_embedding_groups,
      conv_pos_batch_norm=self.conv_pos_batch_norm,
      pos_conv_activation=self.feat_extract_activation,
      do_stable_layer_norm=self.do_stable_layer_norm,
      layer_norm_eps=self.layer_norm_eps,
      hidden_dropout=self.hidden_dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
      layerdrop=self.layerdrop,
      initializer_range=self.initializer_range,
      scan_layers=self.scan_layers,
      remat=self.remat,
      causal=self.causal,
      attention_window=self.attention_window,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="encoder",
    )(hidden, mask, train, output_hidden_states, stream_state)

    if mask is None:
      mask = jnp.ones((batch, hidden.shape[1]), bool)
    aux = {"extract_features": extract_features, "frame_mask": mask}
    if output_hidden_states:
      aux["hidden_states"] = hidden_states
    if stream_state is not None:
      aux["stream_state"] = {"audio_context": new_audio_context, **new_stream_state}
    return hidden, aux

  def _check_chunk(self, audio: Array, audio_mask: Array | None, train: bool) -> None:
    if not self.causal or self.attention_window < 1:
      raise ValueError(
        "stream_state needs a causal encoder with a bounded attention window (causal=True, "
        "attention_window >= 1)"
      )
    if audio_mask is not None or train:
      raise ValueError("a stream chunk is all valid audio and runs without dropout")
    if not isinstance(audio.shape[1], int) or audio.shape[1] % self.hop:
      raise ValueError(
        f"a stream chunk must be a fixed whole number of hops ({self.hop} samples), got "
        f"{audio.shape[1]} samples"
      )
    if self.fps and (
      not float(self.fps).is_integer() or audio.shape[1] * int(self.fps) % self.sample_rate
    ):
      raise ValueError(
        f"a stream chunk resampled to {self.fps:g} fps must be a whole number of mesh frames "
        f"({self.sample_rate}/{self.fps:g} samples each) at an integral fps, got "
        f"{audio.shape[1]} samples"
      )

  def _resample(
    self,
    features: Array,
    feature_lengths: Array | None,
    num_frames: Any,
    frame_mask: Array | None,
  ) -> tuple[Array, Array | None]:
    """Resamples [B, T_a, C] causal conv features to the mesh frames; returns them and their
    valid mask (the mesh frames whose audio frames are all valid, and frame_mask)."""
    if frame_mask is not None:
      if num_frames is not None and num_frames != frame_mask.shape[1]:
        raise ValueError(f"num_frames={num_frames} but frame_mask has shape {frame_mask.shape}")
      num_frames = frame_mask.shape[1]
    features = resample_causal(
      features, num_frames, sample_rate=self.sample_rate, fps=self.fps, hop=self.hop
    )  # [B, T, C]
    mask = frame_mask
    if feature_lengths is not None:
      _, upper, _ = causal_resample_indices(num_frames, self.sample_rate, self.fps, self.hop)
      read_valid = upper[None] < feature_lengths[:, None]  # [B, T]
      mask = read_valid if mask is None else mask & read_valid
    return features, mask

  def _align(
    self,
    features: Array,
    feature_lengths: Array | None,
    num_frames: int | None,
    frame_mask: Array | None,
  ) -> tuple[Array, Array | None]:
    """Aligns [B, T_a, C] conv features to the mesh frames; returns them and their valid mask."""
    target_lengths = None
    if frame_mask is not None:
      if num_frames is not None and num_frames != frame_mask.shape[1]:
        raise ValueError(f"num_frames={num_frames} but frame_mask has shape {frame_mask.shape}")
      num_frames = frame_mask.shape[1]
      target_lengths = jnp.sum(frame_mask, axis=-1, dtype=jnp.int32)
    if self.frame_alignment == "interpolate":
      features = interpolate_features(features, num_frames, feature_lengths, target_lengths)
      return features, frame_mask
    ratio = self.audio_frames_per_frame
    audio_lengths = jnp.full((features.shape[0],), features.shape[1], jnp.int32)
    if feature_lengths is not None:
      audio_lengths = feature_lengths
    mesh_lengths = audio_lengths // ratio  # an odd trailing audio frame is dropped
    if target_lengths is not None:
      mesh_lengths = jnp.minimum(mesh_lengths, target_lengths)
    features = pair_audio_frames(features, num_frames, ratio)
    mask = jnp.arange(features.shape[1])[None] < (ratio * mesh_lengths)[:, None]
    return features, mask

  def _spec_augment(self, hidden: Array, mask: Array | None, masked_spec_embed: Array) -> Array:
    """Masks time spans (with the learned embedding) and channel spans (with zeros)."""
    batch, length, width = hidden.shape
    lengths = jnp.full((batch,), length, jnp.int32)
    if mask is not None:
      lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    rng = self.make_rng("dropout")
    time_rng, feature_rng = jax.random.split(rng)
    if self.mask_time_prob > 0:
      time_mask = span_mask(
        time_rng,
        lengths,
        length,
        self.mask_time_prob,
        self.mask_time_length,
        self.mask_time_min_masks,
      )  # [B, T]
      hidden = jnp.where(time_mask[..., None], masked_spec_embed.astype(hidden.dtype), hidden)
    if self.mask_feature_prob > 0:
      feature_mask = span_mask(
        feature_rng,
        jnp.full((batch,), width, jnp.int32),
        width,
        self.mask_feature_prob,
        self.mask_feature_length,
        self.mask_feature_min_masks,
      )  # [B, D]
      hidden = jnp.where(feature_mask[:, None, :], 0, hidden)
    return hidden
