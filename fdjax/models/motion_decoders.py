"""Speech-driven motion decoders: audio features + template + style -> per-frame mesh vertices.

Where this sits: an audio encoder (`fdjax/models/wav2vec2.py`) turns the waveform into features
`[B, T_a, D_audio]` aligned to the mesh frame rate; a decoder here (`FaceFormerDecoder`,
autoregressive with a key/value cache; `NonAutoregressiveDecoder`, one pass) turns them into
vertex offsets added to the subject's neutral `template` `[B, V, 3]`. Their layers are
`fdjax.models.attention` blocks. The FaceFormer semantics kept, the deliberate deviations and
the numerics are described in docs/design.md section 13.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models import face_outputs, layers
from fdjax.models.attention import BlockNames, TransformerBlock, padding_mask

Array = jax.Array

# Parameter names of the decoder layers (PyTorch's `TransformerDecoderLayer` parts, as named
# since FaceFormer's port); the encoder layers keep `BlockNames`' defaults.
DECODER_BLOCK_NAMES = BlockNames(
  attention="self_attention",
  norms=("self_attention_norm", "cross_attention_norm", "feed_forward_norm"),
  dropout="dropout",
)


# What a FaceFormerDecoder's `__call__` feeds each frame (its `training` field).
TRAINING_MODES = ("teacher_forcing", "autoregressive", "scheduled_sampling")


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head slopes of ALiBi (Press et al. 2022), as FaceFormer uses them.

  For a power of two n the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...; other
  head counts take the power of two below and fill up with every other slope of the power of
  two above.

  Returns:
    `[H]` float32 slopes.
  """
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")

  def geometric(n: int) -> list[float]:
    first = 2.0 ** (-8.0 / n)
    return [first ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    slopes = geometric(num_heads)
  else:
    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(lower) + list(alibi_slopes(2 * lower)[0::2][: num_heads - lower])
  return np.asarray(slopes, dtype=np.float32)


def periodic_positional_encoding(positions: Array, d_model: int, period: int) -> Array:
  """FaceFormer's periodic positional encoding for any positions.

  Args:
    positions: integer positions, any shape `[...]`.
    d_model: even feature size.
    period: the encoding repeats every `period` positions.

  Returns:
    `[..., d_model]` float32, sin at even and cos at odd features.
  """
  if d_model % 2:
    raise ValueError(f"d_model must be even for the positional encoding, got {d_model}")
  phase = jnp.mod(positions, period).astype(jnp.float32)[..., None]  # [..., 1]
  frequencies = jnp.exp(
    jnp.arange(0, d_model, 2, dtype=jnp.float32) * (-math.log(10000.0) / d_model)
  )
  angles = phase * frequencies  # [..., D/2]
  encoding = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., D/2, 2]
  return encoding.reshape(*angles.shape[:-1], d_model)


def periodic_alibi_bias(
  query_positions: Array, key_positions: Array, slopes: np.ndarray, period: int, causal: bool
) -> Array:
  """FaceFormer's temporal bias: `-slope_h * floor(distance / period)`.

  Args:
    query_positions: `[Tq]` int positions.
    key_positions: `[Tk]` int positions.
    slopes: `[H]` per-head slopes (`alibi_slopes`).
    period: distances within one period get the same bias.
    causal: distance is `query - key` (future keys are masked separately); otherwise
      `|query - key|`, so the bias is symmetric.

  Returns:
    `[H, Tq, Tk]` float32 bias, to add to the attention scores.
  """
  distance = query_positions[:, None] - key_positions[None, :]  # [Tq, Tk]
  if causal:
    distance = jnp.maximum(distance, 0)
  else:
    distance = jnp.abs(distance)
  steps = jnp.floor_divide(distance, period).astype(jnp.float32)
  return -jnp.asarray(slopes)[:, None, None] * steps[None]


def alignment_mask(num_frames: int, num_audio_frames: int, audio_frames_per_frame: int) -> Array:
  """FaceFormer's alignment mask as a dense `[T, T_a]` bool (True = may attend).

  The decoders evaluate it with `attention.aligned_attention`; this dense form documents the
  rule and lets tests check the two agree.
  """
  frames = jnp.arange(num_frames)[:, None]
  audio = jnp.arange(num_audio_frames)[None, :]
  return jnp.floor_divide(audio, audio_frames_per_frame) == frames


def dense(
  features: int,
  names: tuple[str, str],
  *,
  dtype: Any,
  zero_init: bool = False,
  use_bias: bool = True,
  name: str | None = None,
) -> nn.Dense:
  """`nn.Dense` whose kernel and bias carry logical axis names (`names` = (in, out))."""
  kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(
    features=features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(kernel_init, names),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
    name=name,
  )


def layer_norm(dtype: Any, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with PyTorch's epsilon and logically named scale and bias."""
  return layers.layer_norm(epsilon=1e-5, use_fast_variance=True, dtype=dtype, name=name)


def motion_block(
  *,
  num_heads: int,
  mlp_dim: int,
  dropout_rate: float,
  pre_norm: bool,
  attention_impl: str,
  dtype: Any,
  cross_attention: bool = False,
  name: str | None = None,
) -> TransformerBlock:
  """A PyTorch-style transformer layer: ReLU MLP, dropout on every branch and after the MLP's
  activation, post-norm unless `pre_norm`; a decoder layer (`DECODER_BLOCK_NAMES`) with
  `cross_attention`, else an encoder layer."""
  return TransformerBlock(
    num_heads=num_heads,
    mlp_dim=mlp_dim,
    activation="relu",
    pre_norm=pre_norm,
    cross_attention=cross_attention,
    norm_fast_variance=True,
    dropout=dropout_rate,
    activation_dropout=dropout_rate,
    attention_kernel_init=nn.initializers.xavier_uniform(),
    mlp_kernel_init=nn.initializers.lecun_normal(),
    names=DECODER_BLOCK_NAMES if cross_attention else BlockNames(),
    attention_impl=attention_impl,
    dtype=dtype,
    name=name,
  )


def _check_int_indices(name: str, value: Array, batch_size: int) -> None:
  if value.shape != (batch_size,):
    raise ValueError(f"{name} must have shape [B]=({batch_size},), got {tuple(value.shape)}")
  if not jnp.issubdtype(value.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer index array, got dtype {value.dtype}")


def check_template(template: Array, num_vertices: int, batch_size: int) -> None:
  """Raises a clear error when `template` is not `[B, V, 3]` with the model's V."""
  if template.shape != (batch_size, num_vertices, 3):
    raise ValueError(
      f"template must have shape [B, V, 3]=({batch_size}, {num_vertices}, 3) "
      f"(num_vertices={num_vertices}), got {tuple(template.shape)}"
    )


def group_audio_frames(
  audio_features: Array, num_frames: int, audio_frames_per_frame: int
) -> Array:
  """Cuts `[B, T_a, D]` audio features into `[B, T, r, D]` groups aligned to mesh frames.

  Features beyond `T * r` are dropped (as FaceFormer's alignment mask ignores them); fewer than
  `T * r` is an error, since some frames would hear nothing.
  """
  if audio_features.ndim != 3:
    raise ValueError(
      f"audio_features must be [B, T_a, D_audio], got shape {tuple(audio_features.shape)}"
    )
  needed = num_frames * audio_frames_per_frame
  if audio_features.shape[1] < needed:
    raise ValueError(
      f"audio_features has {audio_features.shape[1]} frames but {num_frames} mesh frames need "
      f"{needed} (audio_frames_per_frame={audio_frames_per_frame}); resample the audio "
      "features to the mesh frame rate first"
    )
  batch, _, features = audio_features.shape
  return audio_features[:, :needed].reshape(batch, num_frames, audio_frames_per_frame, features)


class TransformerEncoder(nn.Module):
  """Encoder `motion_block`s with FaceFormer's symmetric temporal bias and a padding mask.

  Valid frames attend only to valid frames, so their outputs do not depend on padding.
  """

  d_model: int  # model width
  num_heads: int  # attention heads
  num_layers: int  # encoder layers
  mlp_dim: int  # MLP hidden width
  period: int  # frames per step of the temporal bias
  attention_window: int = 0  # frames each side a frame may attend to; 0 = the whole sequence
  dropout_rate: float = 0.1  # dropout on residual branches
  pre_norm: bool = False  # False = post-norm
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: Array, frame_mask: Array, train: bool = False) -> Array:
    """Args: x `[B, T, D]`; frame_mask `[B, T]` bool. Returns `[B, T, D]`."""
    num_frames = x.shape[1]
    positions = jnp.arange(num_frames)
    bias = periodic_alibi_bias(
      positions, positions, alibi_slopes(self.num_heads), self.period, causal=False
    )  # [H, T, T]
    mask = padding_mask(frame_mask)  # [B, 1, 1, T] keys
    if self.attention_window > 0:
      local = jnp.abs(positions[:, None] - positions[None, :]) <= self.attention_window
      mask = mask & local[None, None]
    for index in range(self.num_layers):
      x, _ = motion_block(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        pre_norm=self.pre_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        name=f"layer_{index}",
      )(x, mask, train, bias=bias[None])
      x = nn.with_logical_constraint(x, ("batch", "time", "embed"))
    if self.pre_norm:
      # Pre-norm stacks leave the residual stream unnormalised; close with a norm as is usual.
      x = layer_norm(self.dtype, name="final_norm")(x)
    return x


class ConditionEmbedding(nn.Module):
  """Speaking style plus optional emotion and intensity, as one `[B, D]` vector.

  Each is a one-hot index through a bias-free Dense (FaceFormer's `obj_vector`); the three are
  summed, which equals one Dense over their concatenated one-hots (EMOTE's conditioning).
  Indices outside `[0, num_*)` give a zero embedding (jax one-hot semantics).
  """

  features: int  # output width (the decoder's d_model)
  num_styles: int  # speaking styles (training subjects); 0 disables the style embedding
  num_emotions: int = 0  # emotion classes; 0 disables emotion conditioning
  num_intensities: int = 0  # emotion intensity levels; 0 disables intensity conditioning
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(
    self,
    style: Array | None,
    emotion: Array | None = None,
    intensity: Array | None = None,
    *,
    batch_size: int,
  ) -> Array:
    """Returns `[B, D]`. Indices are `[B]` int; an enabled one that is None is an error."""
    condition = jnp.zeros((batch_size, self.features), self.dtype)
    for field, count_field, count, value in (
      ("style", "num_styles", self.num_styles, style),
      ("emotion", "num_emotions", self.num_emotions, emotion),
      ("intensity", "num_intensities", self.num_intensities, intensity),
    ):
      if count <= 0:
        continue
      if value is None:
        raise ValueError(f"{field} is required: the model was built with {count_field}={count}")
      _check_int_indices(field, value, batch_size)
      one_hot = jax.nn.one_hot(value, count, dtype=self.dtype)  # [B, count]
      condition = condition + dense(
        self.features,
        ("vocab", "embed"),
        dtype=self.dtype,
        use_bias=False,
        name=f"{field}_embedding",
      )(one_hot)
    return condition


def _decode_variant(cls_name: str, variants: dict[str, dict], variant: str) -> dict:
  if variant not in variants:
    raise ValueError(f"unknown {cls_name} variant {variant!r}; known: {sorted(variants)}")
  return dict(variants[variant])


# FaceFormer's published sizes: 4 heads, 1 layer, MLP 2 * d_model; VOCASET at 30 fps with
# d_model 64 and period 30, BIWI at 25 fps with d_model 128, period 25 and 2 audio features per
# frame. `tiny` is for tests.
FACEFORMER_VARIANTS: dict[str, dict] = {
  "vocaset": dict(
    num_vertices=5023,
    d_model=64,
    num_heads=4,
    num_layers=1,
    mlp_dim=128,
    period=30,
    audio_frames_per_frame=1,
    num_styles=8,
  ),
  "biwi": dict(
    num_vertices=23370,
    d_model=128,
    num_heads=4,
    num_layers=1,
    mlp_dim=256,
    period=25,
    audio_frames_per_frame=2,
    num_styles=6,
  ),
  "tiny": dict(
    num_vertices=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    mlp_dim=32,
    period=4,
    audio_frames_per_frame=1,
    num_styles=3,
    dropout_rate=0.0,
  ),
}


class FaceFormerDecoder(nn.Module):
  """Autoregressive speech-to-motion decoder in the FaceFormer style.

  Inputs (docs/design.md section 3): `audio_features [B, T_a, D_audio]` aligned to the mesh frames
  (`T_a >= T * audio_frames_per_frame`), `template [B, V, 3]`, `style [B]` int32, optional
  `emotion`/`intensity [B]` int32, `vertices [B, T, V, 3]`, `frame_mask [B, T]` bool.
  Outputs `vertices [B, T, V, 3]` = template + predicted offsets.

  Use `__call__` (teacher forcing) for training and `generate` for prediction; initialise with
  `__call__`.
  """

  num_vertices: int = 5023  # V, mesh vertices (FLAME for VOCASET)
  d_model: int = 64  # transformer width (FaceFormer: 64 VOCASET, 128 BIWI)
  num_heads: int = 4  # attention heads (one ALiBi slope each)
  num_layers: int = 1  # decoder layers
  mlp_dim: int = 128  # decoder MLP hidden width (FaceFormer: 2 * d_model)
  period: int = 30  # frames per period of the positional encoding and the temporal bias
  audio_frames_per_frame: int = 1  # audio features per mesh frame: 1 VOCASET, 2 BIWI
  num_styles: int = 8  # speaking styles (training subjects); 0 disables
  num_emotions: int = 0  # emotion classes for EMOTE-style conditioning; 0 disables
  num_intensities: int = 0  # emotion intensity levels; 0 disables
  dropout_rate: float = 0.1  # dropout on the encoded input and the residual branches
  pre_norm: bool = False  # False = post-norm layers, as FaceFormer (PyTorch default)
  cache_window: int = 0  # frames a frame attends to, itself included (bounded cache); 0 = all
  # What `__call__` feeds frame t: "teacher_forcing" (the true frame t - 1, one parallel pass),
  # "autoregressive" (its own prediction of frame t - 1, as FaceFormer trains) or
  # "scheduled_sampling" (the truth with `truth_probability`, else its own prediction)
  training: str = "teacher_forcing"
  # The rollout's gradient (see `_rollout`): "recompute" (a reverse scan recomputing each frame,
  # memory linear in T) or "autodiff" (jax's own scan gradient, which keeps every frame's
  # caches: memory quadratic in T; a reference for checks)
  rollout_gradient: str = "recompute"
  # Frames per chunk of the recomputed gradient's parameter pass: its memory is about
  # chunk * T * d_model per layer, and each chunk adds one parameter-sized sum
  rollout_chunk: int = 32
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.cache_window < 0:
      raise ValueError(f"cache_window must be >= 0, got {self.cache_window}")
    if self.training not in TRAINING_MODES:
      raise ValueError(f"training={self.training!r}: expected one of {TRAINING_MODES}")
    if self.rollout_chunk < 1:
      raise ValueError(f"rollout_chunk must be >= 1, got {self.rollout_chunk}")
    if self.rollout_gradient not in ("recompute", "autodiff"):
      raise ValueError(
        f"rollout_gradient={self.rollout_gradient!r}: expected 'recompute' or 'autodiff'"
      )

  @classmethod
  def from_variant(cls, variant: str, **overrides: Any) -> FaceFormerDecoder:
    """Builds a named size (`FACEFORMER_VARIANTS`) with fields overridden by `overrides`."""
    return cls(**{**_decode_variant(cls.__name__, FACEFORMER_VARIANTS, variant), **overrides})

  def setup(self):
    self.audio_projection = dense(self.d_model, ("mlp", "embed"), dtype=self.dtype)
    self.vertex_embedding = dense(self.d_model, ("vertices", "embed"), dtype=self.dtype)
    self.condition_embedding = ConditionEmbedding(
      features=self.d_model,
      num_styles=self.num_styles,
      num_emotions=self.num_emotions,
      num_intensities=self.num_intensities,
      dtype=self.dtype,
    )
    self.layers = [
      motion_block(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        pre_norm=self.pre_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        cross_attention=True,
      )
      for _ in range(self.num_layers)
    ]
    # Zero-initialised so the untrained model predicts the template (FaceFormer's init).
    self.offset_projection = dense(
      self.num_vertices * 3, ("embed", "vertices"), dtype=self.dtype, zero_init=True
    )
    self.input_dropout = nn.Dropout(rate=self.dropout_rate)
    if self.pre_norm:
      # Pre-norm stacks leave the residual stream unnormalised; close with a norm as is usual.
      self.final_norm = layer_norm(self.dtype)

  def _output(self, x: Array) -> Array:
    # x [..., D] decoder features -> [..., V*3] offsets
    if self.pre_norm:
      x = self.final_norm(x)
    return self.offset_projection(x)

  def _prepare(self, audio_features, template, style, emotion, intensity, num_frames):
    batch_size = audio_features.shape[0]
    check_template(template, self.num_vertices, batch_size)
    memory = group_audio_frames(audio_features, num_frames, self.audio_frames_per_frame)
    memory = self.audio_projection(memory.astype(self.dtype))  # [B, T, r, D]
    condition = self.condition_embedding(style, emotion, intensity, batch_size=batch_size)
    return memory, condition  # [B, T, r, D], [B, D]

  def _embed_offsets(self, offsets: Array) -> Array:
    # offsets [..., V*3] -> [..., D]
    return self.vertex_embedding(offsets.astype(self.dtype))

  def _encode_inputs(self, inputs: Array, train: bool) -> Array:
    # inputs [B, T, D] (motion embedding + condition) -> plus periodic positional encoding
    positions = jnp.arange(inputs.shape[1])
    encoding = periodic_positional_encoding(positions, self.d_model, self.period)
    inputs = inputs + encoding.astype(inputs.dtype)[None]
    return self.input_dropout(inputs, deterministic=not train)

  def _decode_sequence(self, inputs: Array, memory: Array, train: bool) -> Array:
    """Full causal decoder over `inputs [B, T, D]` with `memory [B, T, r, D]` -> `[B, T, V*3]`."""
    num_frames = inputs.shape[1]
    positions = jnp.arange(num_frames)
    bias = periodic_alibi_bias(
      positions, positions, alibi_slopes(self.num_heads), self.period, causal=True
    )
    causal_mask = self._allowed(positions[:, None], positions[None, :])  # [T, T]
    x = self._encode_inputs(inputs, train)
    for layer in self.layers:
      x, _ = layer(x, causal_mask, train, bias=bias[None], memory=memory)
      x = nn.with_logical_constraint(x, ("batch", "time", "embed"))
    return self._output(x)

  def _allowed(self, query_positions: Array, key_positions: Array) -> Array:
    """Causal self-attention mask, limited to the last `cache_window` frames when set."""
    allowed = key_positions <= query_positions
    if self.cache_window > 0:
      allowed &= key_positions > query_positions - self.cache_window
    return allowed

  def _to_vertices(self, offsets: Array, template: Array, frame_mask: Array | None):
    batch_size, num_frames = offsets.shape[:2]
    offsets = offsets.reshape(batch_size, num_frames, self.num_vertices, 3).astype(jnp.float32)
    if frame_mask is not None:
      offsets = jnp.where(frame_mask[:, :, None, None], offsets, 0.0)
    offsets = nn.with_logical_constraint(offsets, ("batch", "time", "vertices", None))
    return template[:, None].astype(jnp.float32) + offsets, offsets

  def __call__(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    vertices: Array | None = None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    frame_mask: Array | None = None,
    truth_probability: Array | float | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """Training pass over the frames of `vertices`, fed as the `training` field says.

    Teacher forcing: frame `t` sees the true vertices of frames `< t`, all frames in one
    parallel pass. Autoregressive: frame `t` sees the model's own predictions of frames `< t`
    (a rollout, see `_rollout`), as FaceFormer trains. Scheduled sampling: each frame's input
    is the true previous frame with probability `truth_probability`, else the prediction.

    Args:
      audio_features: `[B, T_a, D_audio]`, `T_a >= T * audio_frames_per_frame`.
      template: `[B, V, 3]`.
      style: `[B]` int32 (None only when `num_styles == 0`).
      vertices: `[B, T, V, 3]` ground truth; required (it fixes T, and is the teacher-forced
        input).
      emotion: `[B]` int32, required when `num_emotions > 0`.
      intensity: `[B]` int32, required when `num_intensities > 0`.
      frame_mask: `[B, T]` bool; padded frames predict the template. Causal attention and
        right padding already keep valid frames independent of padding.
      truth_probability: scalar in [0, 1], scheduled sampling's chance of feeding the truth
        (draws from the "dropout" rng); None = 0 (autoregressive). Ignored by the other modes.
      train: enables dropout (needs a `dropout` rng).

    Returns:
      `vertices [B, T, V, 3]` and aux `{"offsets": [B, T, V, 3]}`.
    """
    if vertices is None:
      raise ValueError(
        "FaceFormerDecoder.__call__ needs vertices (the ground truth it trains on, and is fed "
        "under teacher forcing); use generate() to predict from audio alone"
      )
    batch_size, num_frames = vertices.shape[:2]
    if vertices.shape[2:] != (self.num_vertices, 3):
      raise ValueError(
        f"vertices must be [B, T, V, 3] with V=num_vertices={self.num_vertices}, "
        f"got {tuple(vertices.shape)}"
      )
    if frame_mask is not None and frame_mask.shape != (batch_size, num_frames):
      raise ValueError(
        f"frame_mask must be [B, T]=({batch_size}, {num_frames}), got {tuple(frame_mask.shape)}"
      )
    memory, condition = self._prepare(
      audio_features, template, style, emotion, intensity, num_frames
    )
    # Inputs are offsets from the template of the previous frame; the first frame starts from
    # the condition alone.
    truth = (vertices - template[:, None]).reshape(batch_size, num_frames, -1)  # [B, T, V*3]
    if self.training == "teacher_forcing" or self.is_initializing():
      motion = self._embed_offsets(truth[:, :-1]) + condition[:, None]  # [B, T-1, D]
      inputs = jnp.concatenate([condition[:, None], motion], axis=1)  # [B, T, D]
      offsets = self._decode_sequence(inputs, memory, train)
    else:
      # feed_truth[:, t]: frame t + 1's input is the true frame t rather than the prediction.
      feed_truth = jnp.zeros((batch_size, num_frames), bool)
      if self.training == "scheduled_sampling" and truth_probability is not None:
        draw = jax.random.uniform(self.make_rng("dropout"), (batch_size, num_frames))
        feed_truth = draw < truth_probability
      offsets = self._rollout(memory, condition, truth, feed_truth, train)
    predicted, offsets = self._to_vertices(offsets, template, frame_mask)
    return predicted, {"offsets": offsets}

  def _rollout_step(
    self,
    next_input: Array,
    caches: tuple,
    frame_memory: Array,
    condition: Array,
    frame_truth: Array,
    feed_truth: Array,
    position: Array,
    train: bool,
  ) -> tuple[Array, tuple, Array]:
    """One frame of the rollout: `next_input [B, D]` (before its positional encoding), the
    key/value caches (`[B, T, H, Dh]` per layer; read below `position`, written at it), the
    frame's audio `[B, r, D]`, the truth `[B, V*3]` and `feed_truth [B]` for the next input.

    Returns the frame's offsets `[B, V*3]`, its keys and values (`[B, H, Dh]` per layer) and
    the next frame's input.
    """
    num_frames = caches[0][0].shape[1]
    frame_positions = jnp.arange(num_frames)
    slot = frame_positions == position  # [T]
    encoding = periodic_positional_encoding(position, self.d_model, self.period)
    x = (next_input + encoding.astype(next_input.dtype))[:, None]  # [B, 1, D]
    x = self.input_dropout(x, deterministic=not train)
    bias = periodic_alibi_bias(
      position[None], frame_positions, alibi_slopes(self.num_heads), self.period, True
    )  # [H, 1, T]
    mask = self._allowed(position, frame_positions)[None]  # [1, T]
    frame_keys_values = []
    for layer, cache in zip(self.layers, caches, strict=True):
      x, (keys, values) = layer(
        x, mask, train, cache, bias=bias[None], memory=frame_memory[:, None], cache_slot=slot
      )
      frame_keys_values.append(
        tuple(jax.lax.dynamic_index_in_dim(t, position, 1, False) for t in (keys, values))
      )
    offsets = self._output(x[:, 0])  # [B, V*3]
    fed = jnp.where(feed_truth[:, None], frame_truth.astype(offsets.dtype), offsets)
    return offsets, tuple(frame_keys_values), self._embed_offsets(fed) + condition

  def _rollout(
    self, memory: Array, condition: Array, truth: Array, feed_truth: Array, train: bool
  ) -> Array:
    """Autoregressive pass over all frames, differentiable through the whole rollout.

    Frame t runs every layer once for one query against the key/value cache of frames `< t`
    (`_rollout_step`) and feeds its prediction (or, where `feed_truth`, the truth) to frame
    t + 1: the arithmetic of re-running the decoder over the growing prefix of its own
    predictions at every frame, as FaceFormer trains, but each frame computed once.

    The gradient (docs/design.md section 13): a reverse scan carries the cotangents of the
    caches and of the next input, recomputing each frame from the FINAL caches (frame t reads
    only slots `< t`, equal there to what it read, and writes slot t, so its derivatives are
    the forward's), and keeps per frame only cotangents of the frame's outputs; the parameters
    then get their gradient from a pass over the frames given their inputs and the final
    caches, `rollout_chunk` frames at a time (vmapped), so no parameter-sized sum runs per
    frame. Memory is linear in T (plus `rollout_chunk * T` cache reads). Dropout draws per frame
    from the "dropout" rng folded with the frame index, alike in every pass.

    Args:
      memory: `[B, T, r, D]` projected audio; condition `[B, D]`; truth `[B, T, V*3]` true
        offsets; feed_truth `[B, T]` bool; train: dropout.

    Returns:
      offsets `[B, T, V*3]`.
    """
    batch_size, num_frames = truth.shape[:2]
    head_dim = self.d_model // self.num_heads
    cache_shape = (batch_size, num_frames, self.num_heads, head_dim)
    empty = tuple(
      (jnp.zeros(cache_shape, self.dtype), jnp.zeros(cache_shape, self.dtype))
      for _ in range(self.num_layers)
    )
    rng = self.make_rng("dropout") if train else None
    module = self.clone(parent=None)
    # Per-frame inputs, time first; frame t's truth and feed flag make frame t + 1's input.
    positions = jnp.arange(num_frames)
    truth_t, feed_t = jnp.swapaxes(truth, 0, 1), jnp.swapaxes(feed_truth, 0, 1)

    def step(params, next_input, caches, frame_memory, condition, frame_truth, feed, position):
      return module.apply(
        {"params": params},
        next_input,
        caches,
        frame_memory,
        condition,
        frame_truth,
        feed,
        position,
        train,
        rngs={"dropout": jax.random.fold_in(rng, position)} if train else {},
        method=FaceFormerDecoder._rollout_step,
      )

    def write(caches, frame_keys_values, position):
      return jax.tree.map(
        lambda cache, new: jax.lax.dynamic_update_index_in_dim(cache, new, position, 1),
        caches,
        frame_keys_values,
      )

    def forward(params, memory_t, condition):
      def body(carry, xs):
        caches, next_input = carry
        position, frame_memory, frame_truth, feed = xs
        offsets, frame_keys_values, following = step(
          params, next_input, caches, frame_memory, condition, frame_truth, feed, position
        )
        return (write(caches, frame_keys_values, position), following), (offsets, next_input)

      (caches, _), (offsets, inputs) = jax.lax.scan(
        body, (empty, condition), (positions, memory_t, truth_t, feed_t)
      )
      return offsets, caches, inputs

    params = self.variables["params"]
    memory_t = jnp.swapaxes(memory, 0, 1)  # [T, B, r, D]
    if self.rollout_gradient == "autodiff":
      return jnp.swapaxes(forward(params, memory_t, condition)[0], 0, 1)

    @jax.custom_vjp
    def rollout(params, memory_t, condition):
      return forward(params, memory_t, condition)[0]

    def rollout_fwd(params, memory_t, condition):
      offsets, caches, inputs = forward(params, memory_t, condition)
      return offsets, (params, memory_t, condition, caches, inputs)

    def rollout_bwd(residuals, d_offsets):
      params, memory_t, condition, caches, inputs = residuals

      def body(carry, xs):
        d_caches, d_following, d_condition = carry
        position, frame_memory, frame_truth, feed, next_input, d_frame = xs
        _, vjp = jax.vjp(
          lambda x, c, m, cond: step(params, x, c, m, cond, frame_truth, feed, position),
          next_input,
          caches,
          frame_memory,
          condition,
        )
        # This frame's keys and values have had every later frame's cotangent by now.
        d_frame_keys_values = jax.tree.map(
          lambda d: jax.lax.dynamic_index_in_dim(d, position, 1, False), d_caches
        )
        d_outputs = (d_frame, d_frame_keys_values, d_following)
        d_input, d_read, d_memory, dc = vjp(d_outputs)
        d_caches = jax.tree.map(jnp.add, d_caches, d_read)
        return (d_caches, d_input, d_condition + dc), (d_memory, d_outputs)

      carry = (
        jax.tree.map(jnp.zeros_like, caches),
        jnp.zeros_like(condition),
        jnp.zeros_like(condition),
      )
      (_, d_first, d_condition), (d_memory, d_outputs) = jax.lax.scan(
        body, carry, (positions, memory_t, truth_t, feed_t, inputs, d_offsets), reverse=True
      )

      # The parameters' gradient: the frames' steps given their inputs and the final caches,
      # `rollout_chunk` frames at a time (vmapped), each chunk rematerialised in the backward.
      def all_frames(params):
        def frame(xs):
          x, m, tr, fd, t = xs
          return step(params, x, caches, m, condition, tr, fd, t)

        xs = (inputs, memory_t, truth_t, feed_t, positions)
        return jax.lax.map(
          jax.checkpoint(frame), xs, batch_size=min(self.rollout_chunk, num_frames)
        )

      _, vjp = jax.vjp(all_frames, params)
      (d_params,) = vjp(d_outputs)
      # The first frame's input is the condition itself.
      return d_params, d_memory, d_condition + d_first

    rollout.defvjp(rollout_fwd, rollout_bwd)
    offsets = rollout(params, memory_t, condition)  # [T, B, V*3]
    return jnp.swapaxes(offsets, 0, 1)

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
  ) -> tuple[Array, dict[str, Array]]:
    """Autoregressive prediction with a key/value cache inside `nn.while_loop`.

    Each step embeds the previous prediction, runs every layer for one query against the
    cache (`[B, T, H, Dh]` per layer) and writes its key and value. Every per-step buffer is
    `O(T * d_model)`: the caches, the decoder features of all frames (projected to vertex
    offsets once, after the loop) and the audio memory. A while loop rather than a scan
    because scans need a trip count that can be proven positive, which `jax.export` cannot do
    for symbolic lengths; the price is that generation has no reverse-mode gradient (training
    is teacher-forced anyway).

    Args:
      audio_features: `[B, T_a, D_audio]`.
      template: `[B, V, 3]`.
      style, emotion, intensity: `[B]` int32 as in `__call__`.
      num_frames: frames to generate; default `T_a // audio_frames_per_frame` (or frame_mask's).
      frame_mask: `[B, T]` bool, valid frames of a right-padded batch: padded frames predict the
        template (valid frames never read later ones: the decoder is causal).

    Returns:
      `vertices [B, T, V, 3]` and aux `{"offsets": [B, T, V, 3]}`.
    """
    if num_frames is None:
      num_frames = (
        frame_mask.shape[1]
        if frame_mask is not None
        else audio_features.shape[1] // self.audio_frames_per_frame
      )
    batch_size = audio_features.shape[0]
    if frame_mask is not None and frame_mask.shape != (batch_size, num_frames):
      raise ValueError(
        f"frame_mask must be [B, T]=({batch_size}, {num_frames}), got {tuple(frame_mask.shape)}"
      )
    memory, condition = self._prepare(
      audio_features, template, style, emotion, intensity, num_frames
    )  # [B, T, r, D], [B, D]
    head_dim = self.d_model // self.num_heads
    cache_shape = (batch_size, num_frames, self.num_heads, head_dim)
    caches = tuple(
      (jnp.zeros(cache_shape, self.dtype), jnp.zeros(cache_shape, self.dtype))
      for _ in range(self.num_layers)
    )
    features = jnp.zeros((batch_size, num_frames, self.d_model), self.dtype)  # [B, T, D]
    slopes = alibi_slopes(self.num_heads)
    frame_positions = jnp.arange(num_frames)

    def body(module, carry):
      position, caches, next_input, features = carry  # next_input [B, D]
      slot = frame_positions == position  # [T]
      frame_memory = jnp.sum(jnp.where(slot[None, :, None, None], memory, 0), axis=1)
      encoding = periodic_positional_encoding(position, module.d_model, module.period)
      x = (next_input + encoding.astype(next_input.dtype))[:, None]  # [B, 1, D]
      bias = periodic_alibi_bias(position[None], frame_positions, slopes, module.period, True)
      mask = module._allowed(position, frame_positions)[None]  # [1, T]
      new_caches = []
      for layer, cache in zip(module.layers, caches, strict=True):
        # One query against the cache, its key and value written into its slot.
        x, cache = layer(
          x, mask, False, cache, bias=bias[None], memory=frame_memory[:, None], cache_slot=slot
        )
        new_caches.append(cache)
      features = jnp.where(slot[None, :, None], x, features)
      next_input = module._embed_offsets(module._output(x[:, 0])) + condition
      return position + 1, tuple(new_caches), next_input, features

    carry = (jnp.zeros((), jnp.int32), caches, condition, features)
    if self.is_initializing():
      body(self, carry)  # parameters cannot be created inside the loop
    _, _, _, features = nn.while_loop(
      lambda module, carry: carry[0] < num_frames, body, self, carry
    )
    predicted, offsets = self._to_vertices(self._output(features), template, frame_mask)
    return predicted, {"offsets": offsets}

  def generate_without_cache(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    num_frames: int | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Reference generation: re-runs the whole causal decoder at every step, without a cache.

    Step `t` decodes the full input buffer `[B, T, D]` (frames after `t` are not generated
    yet; the causal mask keeps them out of frame `t`) and reads frame `t`, as FaceFormer's
    `predict` does on its growing prefix. Cubic in T; meant for tests on short clips.
    Same arguments and outputs as `generate`.
    """
    if num_frames is None:
      num_frames = audio_features.shape[1] // self.audio_frames_per_frame
    memory, condition = self._prepare(
      audio_features, template, style, emotion, intensity, num_frames
    )
    buffer = jnp.zeros((condition.shape[0], num_frames, self.d_model), condition.dtype)
    buffer = buffer.at[:, 0].set(condition)  # [B, T, D]

    def step(module, buffer, position):
      offsets = module._decode_sequence(buffer, memory, train=False)  # [B, T, V*3]
      frame_offsets = jax.lax.dynamic_index_in_dim(offsets, position, axis=1, keepdims=False)
      next_input = module._embed_offsets(frame_offsets) + condition
      buffer = buffer.at[:, position + 1].set(next_input, mode="drop")
      return buffer, frame_offsets

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})
    _, offsets = scan(self, buffer, jnp.arange(num_frames))
    predicted, offsets = self._to_vertices(jnp.swapaxes(offsets, 0, 1), template, None)
    return predicted, {"offsets": offsets}

  def stream_init(
    self,
    template: Array,
    style: Array | None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
  ) -> dict[str, Array]:
    """The decoder's state before the first frame of a stream (see `stream`).

    Returns:
      "keys", "values" `[B, L, K - 1, H, Dh]` every layer's self-attention keys and values of
      the last K - 1 frames (K = `cache_window`), "valid" `[B, K - 1]` bool which of those
      frames exist, "motion_input" `[B, D]` the next frame's input before its positional
      encoding (the embedded last prediction plus the condition; the condition at the start),
      "condition" `[B, D]` style (+ emotion, intensity), "template" `[B, V, 3]`, "phase" `[B]`
      int32 the next frame's position modulo `period` (all the positional encoding needs).
    """
    if self.cache_window < 1:
      raise ValueError(
        "streaming needs a bounded key/value cache: set cache_window >= 1 (frames attended to)"
      )
    batch_size = template.shape[0]
    check_template(template, self.num_vertices, batch_size)
    condition = self.condition_embedding(style, emotion, intensity, batch_size=batch_size)
    head_dim = self.d_model // self.num_heads
    cache = (batch_size, self.num_layers, self.cache_window - 1, self.num_heads, head_dim)
    return {
      "keys": jnp.zeros(cache, self.dtype),
      "values": jnp.zeros(cache, self.dtype),
      "valid": jnp.zeros((batch_size, self.cache_window - 1), bool),
      "motion_input": condition,
      "condition": condition,
      "template": template.astype(jnp.float32),
      "phase": jnp.zeros((batch_size,), jnp.int32),
    }

  def stream(
    self, audio_features: Array, state: dict[str, Array]
  ) -> tuple[Array, dict[str, Array]]:
    """Decodes the next frames of a stream against the bounded cache of `stream_init`.

    The same arithmetic as `generate` with `cache_window` frames of context: each frame runs
    every layer once against the last K - 1 frames' keys and values (shifted by one frame per
    step), so the state never grows and the frames equal those `generate` makes of the whole
    sequence.

    Args:
      audio_features: `[B, F * r, D_audio]` the next F frames' aligned audio features.
      state: from `stream_init` or the previous call.

    Returns:
      `vertices [B, F, V, 3]` and the updated state.
    """
    if self.cache_window < 1:
      raise ValueError("streaming needs cache_window >= 1")
    batch_size = audio_features.shape[0]
    num_frames = audio_features.shape[1] // self.audio_frames_per_frame
    memory = group_audio_frames(audio_features, num_frames, self.audio_frames_per_frame)
    memory = self.audio_projection(memory.astype(self.dtype))  # [B, F, r, D]
    window = self.cache_window
    slots = jnp.arange(window)
    # Slot j of the K slots holds the frame K - 1 - j steps back; the last is the current one.
    bias = periodic_alibi_bias(
      jnp.array([window - 1]), slots, alibi_slopes(self.num_heads), self.period, True
    )  # [H, 1, K]
    current = slots == window - 1  # [K]
    keys, values, valid = state["keys"], state["values"], state["valid"]
    motion_input, phase = state["motion_input"], state["phase"]
    head_dim = self.d_model // self.num_heads
    empty = jnp.zeros((batch_size, 1, self.num_heads, head_dim), keys.dtype)
    offsets = []
    for frame in range(num_frames):
      encoding = periodic_positional_encoding(phase, self.d_model, self.period)  # [B, D]
      x = (motion_input + encoding.astype(motion_input.dtype))[:, None]  # [B, 1, D]
      slot_valid = jnp.concatenate([valid, jnp.ones((batch_size, 1), bool)], axis=1)  # [B, K]
      mask = padding_mask(slot_valid)  # [B, 1, 1, K]
      new_keys, new_values = [], []
      for index, layer in enumerate(self.layers):
        cache = (
          jnp.concatenate([keys[:, index], empty], axis=1),  # [B, K, H, Dh]
          jnp.concatenate([values[:, index], empty], axis=1),
        )
        x, (cache_key, cache_value) = layer(
          x,
          mask,
          False,
          cache,
          bias=bias[None],
          memory=memory[:, frame : frame + 1],
          cache_slot=current,
        )
        new_keys.append(cache_key[:, 1:])
        new_values.append(cache_value[:, 1:])
      keys, values = jnp.stack(new_keys, axis=1), jnp.stack(new_values, axis=1)
      valid = slot_valid[:, 1:]
      frame_offsets = self._output(x[:, 0])  # [B, V*3]
      offsets.append(frame_offsets)
      motion_input = self._embed_offsets(frame_offsets) + state["condition"]
      phase = (phase + 1) % self.period
    predicted, _ = self._to_vertices(jnp.stack(offsets, axis=1), state["template"], None)
    new_state = {
      **state,
      "keys": keys,
      "values": values,
      "valid": valid,
      "motion_input": motion_input,
      "phase": phase,
    }
    return predicted, new_state


def encode_aligned_audio(
  module: nn.Module,
  audio_features: Array,
  style: Array | None,
  emotion: Array | None,
  intensity: Array | None,
  frame_mask: Array,
  train: bool,
  *,
  emotion_in_input: bool = True,
) -> Array:
  """The whole-sequence decoders' encoder (`NonAutoregressiveDecoder`, CodeTalker's
  `CodePredictor`): each frame's aligned audio features (concatenated), projected, plus the
  condition and the periodic positional encoding, through a `TransformerEncoder`.

  Called from `module`'s compact `__call__`: the submodules it makes (`audio_projection`,
  `condition_embedding`, `encoder`) are `module`'s, configured by its fields. With
  `emotion_in_input=False` the condition is the style alone (the module conditions on emotion
  elsewhere).

  Returns:
    `[B, T, D]` for `frame_mask [B, T]`.
  """
  batch_size, num_frames = frame_mask.shape
  grouped = group_audio_frames(audio_features, num_frames, module.audio_frames_per_frame)
  grouped = grouped.reshape(batch_size, num_frames, -1).astype(module.dtype)  # [B, T, r*D_audio]
  x = dense(module.d_model, ("mlp", "embed"), dtype=module.dtype, name="audio_projection")(grouped)
  condition = ConditionEmbedding(
    features=module.d_model,
    num_styles=module.num_styles,
    num_emotions=module.num_emotions if emotion_in_input else 0,
    num_intensities=module.num_intensities if emotion_in_input else 0,
    dtype=module.dtype,
    name="condition_embedding",
  )(style, emotion, intensity, batch_size=batch_size)
  encoding = periodic_positional_encoding(jnp.arange(num_frames), module.d_model, module.period)
  x = x + condition[:, None] + encoding.astype(x.dtype)[None]
  x = nn.Dropout(rate=module.dropout_rate)(x, deterministic=not train)
  return TransformerEncoder(
    d_model=module.d_model,
    num_heads=module.num_heads,
    num_layers=module.num_layers,
    mlp_dim=module.mlp_dim,
    period=module.period,
    attention_window=module.attention_window,
    dropout_rate=module.dropout_rate,
    pre_norm=module.pre_norm,
    attention_impl=module.attention_impl,
    dtype=module.dtype,
    name="encoder",
  )(x, frame_mask, train)


# Time constants (frames) of the rises that shape a separate emotion branch's output over a
# sequence (`NonAutoregressiveDecoder(emotion_path="separate")`): 0.2 and 0.6 s at 25 fps.
EMOTION_ONSET_FRAMES = (5.0, 15.0)

# Not a published model: a FaceFormer-sized encoder without cross-attention, so two layers.
NONAUTOREGRESSIVE_VARIANTS: dict[str, dict] = {
  "vocaset": dict(
    num_vertices=5023,
    d_model=64,
    num_heads=4,
    num_layers=2,
    mlp_dim=128,
    period=30,
    audio_frames_per_frame=1,
    num_styles=8,
  ),
  "biwi": dict(
    num_vertices=23370,
    d_model=128,
    num_heads=4,
    num_layers=2,
    mlp_dim=256,
    period=25,
    audio_frames_per_frame=2,
    num_styles=6,
  ),
  "tiny": dict(
    num_vertices=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    mlp_dim=32,
    period=4,
    audio_frames_per_frame=1,
    num_styles=3,
    dropout_rate=0.0,
  ),
}


class NonAutoregressiveDecoder(nn.Module):
  """Whole-sequence speech-to-motion decoder: one transformer-encoder pass, no causal mask.

  Each frame's aligned audio features (concatenated when `audio_frames_per_frame > 1`) are
  projected, the condition (style + emotion + intensity) and the periodic positional encoding
  are added, a transformer encoder with FaceFormer's temporal bias (symmetric here, optionally
  limited to a local window) mixes the frames, and a zero-initialised Dense gives offsets.
  Same inputs and outputs as `FaceFormerDecoder`.
  """

  num_vertices: int = 5023  # V, mesh vertices
  d_model: int = 64  # transformer width
  num_heads: int = 4  # attention heads (one ALiBi slope each)
  num_layers: int = 2  # encoder layers
  mlp_dim: int = 128  # encoder MLP hidden width
  period: int = 30  # frames per period of the positional encoding and the temporal bias
  audio_frames_per_frame: int = 1  # audio features per mesh frame: 1 VOCASET, 2 BIWI
  attention_window: int = 0  # frames each side a frame attends to; 0 = the whole sequence
  num_styles: int = 8  # speaking styles (training subjects); 0 disables
  num_emotions: int = 0  # emotion classes; 0 disables
  num_intensities: int = 0  # emotion intensity levels; 0 disables
  dropout_rate: float = 0.1  # dropout on the encoded input and the residual branches
  pre_norm: bool = False  # False = post-norm layers
  # What the last layer predicts per frame (fdjax/models/face_outputs.py): "vertices" (offsets
  # from the template), "flame" (expression + jaw coefficients through the head model) or
  # "rig" (controller values through a linear rig)
  output: str = "vertices"
  num_expression: int = 50  # "flame": expression coefficients (EMOTE: 50)
  head_model: str = ""  # "flame": generic_model.pkl path; "" = the synthetic head model
  num_controls: int = 174  # "rig": controller values per frame (EmoFace: 174)
  rig: str = ""  # "rig": [C, V, 3] rig file (.npy / .npz); "" = the synthetic rig
  # Where emotion and intensity enter: "input" (their embeddings join the style at the input)
  # or "separate" (a branch of their own, with the style, adds outputs that do not depend on
  # the audio; for "flame", expression only, never the jaw): lip sync is then the audio's alone
  emotion_path: str = "input"
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  def output_head(self) -> face_outputs.OutputHead:
    """How the last layer's numbers become vertices (`face_outputs.OutputHead`)."""
    return face_outputs.OutputHead(
      kind=self.output,
      num_vertices=self.num_vertices,
      num_expression=self.num_expression,
      head_model=self.head_model,
      num_controls=self.num_controls,
      rig=self.rig,
    )

  @classmethod
  def from_variant(cls, variant: str, **overrides: Any) -> NonAutoregressiveDecoder:
    """Builds a named size (`NONAUTOREGRESSIVE_VARIANTS`) with fields overridden."""
    return cls(
      **{**_decode_variant(cls.__name__, NONAUTOREGRESSIVE_VARIANTS, variant), **overrides}
    )

  @nn.compact
  def __call__(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    vertices: Array | None = None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    frame_mask: Array | None = None,
    num_frames: int | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """Predicts every frame at once.

    Args:
      audio_features: `[B, T_a, D_audio]`.
      template: `[B, V, 3]`.
      style, emotion, intensity: `[B]` int32 (see `ConditionEmbedding`).
      vertices: `[B, T, V, 3]`, only read for T (the model never sees them); lets a task call
        every decoder alike.
      frame_mask: `[B, T]` bool; padded frames are never attended to and predict the template.
      num_frames: T when `vertices` is None; default `T_a // audio_frames_per_frame`.
      train: enables dropout.

    Returns:
      `vertices [B, T, V, 3]` and aux `{"offsets": [B, T, V, 3]}`, plus the predicted outputs
      by name for `output` "flame" (`expression`, `jaw`) and "rig" (`controls`).
    """
    batch_size = audio_features.shape[0]
    if vertices is not None:
      num_frames = vertices.shape[1]
    elif num_frames is None:
      num_frames = audio_features.shape[1] // self.audio_frames_per_frame
    check_template(template, self.num_vertices, batch_size)
    if frame_mask is None:
      frame_mask = jnp.ones((batch_size, num_frames), bool)
    elif frame_mask.shape != (batch_size, num_frames):
      raise ValueError(
        f"frame_mask must be [B, T]=({batch_size}, {num_frames}), got {tuple(frame_mask.shape)}"
      )
    if self.emotion_path not in ("input", "separate"):
      raise ValueError(f"emotion_path={self.emotion_path!r}: expected 'input' or 'separate'")
    separate = self.emotion_path == "separate"
    x = encode_aligned_audio(
      self,
      audio_features,
      style,
      emotion,
      intensity,
      frame_mask,
      train,
      emotion_in_input=not separate,
    )
    if self.output != "vertices":
      head = self.output_head()
      # Zero-initialised: the untrained model predicts zero coefficients, i.e. the template.
      outputs = dense(
        head.size, ("embed", None), dtype=self.dtype, zero_init=True, name="output_projection"
      )(x).astype(jnp.float32)
      if separate:
        # "flame": the jaw is the audio's alone.
        size = head.num_expression if self.output == "flame" else head.size
        emotional = self._emotion_branch(style, emotion, intensity, batch_size, num_frames, size)
        outputs = outputs + jnp.pad(emotional, ((0, 0), (0, 0), (0, head.size - size)))
      outputs = jnp.where(frame_mask[:, :, None], outputs, 0.0)
      vertices, named = head.to_vertices(outputs, template)
      return vertices, {"offsets": vertices - template[:, None], **named}
    if separate:
      raise ValueError('emotion_path="separate" needs output="flame" or "rig"')
    offsets = dense(
      self.num_vertices * 3,
      ("embed", "vertices"),
      dtype=self.dtype,
      zero_init=True,
      name="offset_projection",
    )(x)
    offsets = offsets.reshape(batch_size, num_frames, self.num_vertices, 3).astype(jnp.float32)
    offsets = jnp.where(frame_mask[:, :, None, None], offsets, 0.0)
    offsets = nn.with_logical_constraint(offsets, ("batch", "time", "vertices", None))
    return template[:, None].astype(jnp.float32) + offsets, {"offsets": offsets}

  def _emotion_branch(
    self,
    style: Array | None,
    emotion: Array | None,
    intensity: Array | None,
    batch_size: int,
    num_frames: int,
    size: int,
  ) -> Array:
    """`emotion_path="separate"`: outputs `[B, T, size]` from the style, emotion and intensity
    alone, shaped over time as a constant plus rises of a few time constants
    (`EMOTION_ONSET_FRAMES`), so an emotion sets in and holds whatever is said."""
    condition = ConditionEmbedding(
      features=self.d_model,
      num_styles=self.num_styles,
      num_emotions=self.num_emotions,
      num_intensities=self.num_intensities,
      dtype=self.dtype,
      name="emotion_embedding",
    )(style, emotion, intensity, batch_size=batch_size)
    hidden = nn.relu(
      dense(self.d_model, ("embed", "mlp"), dtype=self.dtype, name="emotion_mlp")(condition)
    )
    frames = jnp.arange(num_frames, dtype=jnp.float32)[:, None]
    onsets = jnp.asarray(EMOTION_ONSET_FRAMES, jnp.float32)
    profile = jnp.concatenate([jnp.ones_like(frames), 1.0 - jnp.exp(-frames / onsets)], 1)
    amplitudes = dense(
      profile.shape[1] * size,
      ("mlp", None),
      dtype=self.dtype,
      zero_init=True,
      name="emotion_projection",
    )(hidden).astype(jnp.float32)
    amplitudes = amplitudes.reshape(batch_size, profile.shape[1], size)
    return jnp.einsum("tk,bks->bts", profile, amplitudes)

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
  ) -> tuple[Array, dict[str, Array]]:
    """Prediction entry point with `FaceFormerDecoder.generate`'s signature (no dropout)."""
    return self(
      audio_features,
      template,
      style,
      emotion=emotion,
      intensity=intensity,
      frame_mask=frame_mask,
      num_frames=frame_mask.shape[1] if frame_mask is not None else num_frames,
      train=False,
    )


__all__ = (
  "FACEFORMER_VARIANTS",
  "NONAUTOREGRESSIVE_VARIANTS",
  "DECODER_BLOCK_NAMES",
  "ConditionEmbedding",
  "FaceFormerDecoder",
  "NonAutoregressiveDecoder",
  "TransformerEncoder",
  "alibi_slopes",
  "alignment_mask",
  "encode_aligned_audio",
  "motion_block",
  "periodic_alibi_bias",
  "periodic_positional_encoding",
)
