"""Masked video autoencoders (VideoMAE, MARLIN, MAE-DFER) and the classifier on their encoder.

Where it sits: the `mae_video` task (`fdjax/tasks/mae_video.py`) pretrains `VideoMAE` on face
clips without labels; a later fine-tuning run loads the `encoder` subtree of its parameters
into `VideoViTClassifier`, whose `encoder` subtree has the same names and shapes, for
expression or action-unit recognition.

`VideoViTEncoder` is a joint space-time ViT: tubelets of `tubelet_size` frames x `patch_size`^2
pixels embedded by one 3D convolution, fixed 1D sin-cos positions over the flattened
(t, y, x) token order (VideoMAE's, so any clip length works), pre-norm transformer blocks
(`fdjax.models.clip.Transformer`, the shared attention), a final LayerNorm. Given `visible`
token indices it gathers those tokens before the transformer, so pretraining at 90% masking
runs the encoder on a tenth of the tokens. `VideoMAE` adds a light decoder: visible tokens
projected to the decoder width, a learned mask token at every masked position, positions,
a few blocks, and a linear head predicting each masked tubelet's pixels
(`tubelet_size * patch_size^2 * 3` values, in (t, y, x, rgb) order; a second head for
MAE-DFER's frame differences). An optional `discriminator` (MARLIN's adversarial term) scores
tubelet patches as real or reconstructed; the task trains it in the same step (the adversarial
pattern of `fdjax/tasks/__init__.py`).

Variants (`MAE_VARIANTS`): S, B, L as VideoMAE and MARLIN size them (224 px, 16x16 patches,
tubelets of 2 frames; decoders of 4 blocks, 384 wide for S and B, 512 for L), and `tiny`
(32 px, patches of 8) for tests and CPU runs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models.clip import Transformer, layer_norm
from fdjax.models.temporal import normalize_video
from fdjax.models.vivit import IMAGENET_MEAN, IMAGENET_STD, conv_stem, tubelet_embedding

Array = jax.Array
Dtype = Any

# The fields of `VideoViTEncoder` per variant, and the decoder fields of `VideoMAE`.
ENCODER_VARIANTS: dict[str, dict[str, Any]] = {
  "S": dict(image_size=224, patch_size=16, tubelet_size=2, width=384, depth=12, num_heads=6,
            mlp_dim=1536),
  "B": dict(image_size=224, patch_size=16, tubelet_size=2, width=768, depth=12, num_heads=12,
            mlp_dim=3072),
  "L": dict(image_size=224, patch_size=16, tubelet_size=2, width=1024, depth=24, num_heads=16,
            mlp_dim=4096),
  "tiny": dict(image_size=32, patch_size=8, tubelet_size=2, width=64, depth=2, num_heads=4,
               mlp_dim=128),
}  # fmt: skip
DECODER_VARIANTS: dict[str, dict[str, Any]] = {
  "S": dict(decoder_width=384, decoder_depth=4, decoder_num_heads=6, decoder_mlp_dim=1536),
  "B": dict(decoder_width=384, decoder_depth=4, decoder_num_heads=6, decoder_mlp_dim=1536),
  "L": dict(decoder_width=512, decoder_depth=4, decoder_num_heads=8, decoder_mlp_dim=2048),
  "tiny": dict(decoder_width=32, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=64),
}
ENCODER_FIELDS = (
  "image_size", "patch_size", "tubelet_size", "width", "depth", "num_heads", "mlp_dim",
  "hidden_act", "layer_norm_eps", "pixel_mean", "pixel_std", "remat", "subtract_mean_frame",
  "stem_widths", "attention_impl", "dtype",
)  # fmt: skip


def sincos_positions(length: int, width: int) -> np.ndarray:
  """Fixed 1D sin-cos position table [length, width] (Transformer / VideoMAE layout: sines in
  the even channels, cosines in the odd ones, frequencies 10000^(-2i/width))."""
  position = np.arange(length, dtype=np.float64)[:, None]
  frequency = np.power(10000.0, -2.0 * (np.arange(width) // 2) / width)[None]
  angles = position * frequency
  table = np.where(np.arange(width) % 2 == 0, np.sin(angles), np.cos(angles))
  return table.astype(np.float32)


def gather_tokens(x: Array, indices: Array) -> Array:
  """The tokens `indices` int [B, K] of x [B, N, D] -> [B, K, D]."""
  return jnp.take_along_axis(x, indices[..., None], axis=1)


def _dense(features: int, axes: tuple, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
    features=features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
    name=name,
  )


class VideoViTEncoder(nn.Module):
  """Joint space-time ViT over tubelets, optionally on a subset of visible tokens."""

  image_size: int = 224  # frame height and width in pixels
  patch_size: int = 16  # square patch side in pixels
  tubelet_size: int = 2  # frames per tubelet
  width: int = 768  # transformer width
  depth: int = 12  # transformer blocks
  num_heads: int = 12  # attention heads
  mlp_dim: int = 3072  # MLP hidden width
  hidden_act: str = "gelu"  # MLP activation
  layer_norm_eps: float = 1e-6  # LayerNorm epsilon
  pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB mean for normalisation
  pixel_std: tuple[float, float, float] = IMAGENET_STD  # RGB std for normalisation
  remat: bool = False  # recompute block activations in the backward pass
  # Subtract the clip's mean frame from every frame after normalising, before the tubelet
  # embedding (as `fdjax.models.vivit.VideoVisionTransformer`'s option): what stays still
  # (background, identity, light) leaves the input, what moves (the expression) stays. The MAE
  # and the classifier share the encoder, so both see the same input.
  subtract_mean_frame: bool = False
  # Widths of a convolutional stem's stages on every frame before the tubelet embedding
  # (`fdjax.models.vivit.conv_stem`; empty: none). A token still covers `patch_size`^2 pixels:
  # the embedding takes patches of patch_size / 2^stages cells. Given `visible` tokens the stem
  # is masked as ConvMAE's is (the masked tubelets' pixels and features are zeroed before every
  # convolution), so no masked pixel reaches a visible token.
  stem_widths: tuple[int, ...] = ()
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)

  def grid(self, num_frames: int) -> tuple[int, int, int]:
    """The token grid (steps, h, w) of a clip of `num_frames` frames."""
    side = self.image_size // self.patch_size
    return num_frames // self.tubelet_size, side, side

  def check(self, video: Array) -> None:
    size = self.image_size
    if video.ndim != 5 or tuple(video.shape[2:]) != (size, size, 3):
      raise ValueError(f"video must be [B, T, {size}, {size}, 3], got shape {video.shape}")
    if video.shape[1] % self.tubelet_size:
      raise ValueError(
        f"video has {video.shape[1]} frames, not a multiple of tubelet_size={self.tubelet_size}"
      )
    if size % self.patch_size:
      raise ValueError(f"image_size {size} is not a multiple of patch_size {self.patch_size}")
    reduction = 2 ** len(self.stem_widths)
    if self.patch_size % reduction:
      raise ValueError(
        f"patch_size {self.patch_size} is not a multiple of the stem's reduction {reduction} "
        f"({len(self.stem_widths)} stages in stem_widths={self.stem_widths})"
      )

  def visible_pixels(self, visible: Array, num_frames: int) -> Array:
    """float [B, T, H, W]: 1 at the pixels of the `visible` tokens (int [B, K]), else 0."""
    steps, side, _ = self.grid(num_frames)
    tokens = jnp.zeros((visible.shape[0], steps * side * side), jnp.float32)
    tokens = jax.vmap(lambda t, i: t.at[i].set(1.0))(tokens, visible)
    tokens = tokens.reshape(-1, steps, side, side)
    tokens = jnp.repeat(tokens, self.tubelet_size, axis=1)
    return jnp.repeat(jnp.repeat(tokens, self.patch_size, axis=2), self.patch_size, axis=3)

  def embedding_input(self, video: Array) -> Array:
    """What the tubelet embedding sees: `video` [B, T, H, W, 3] normalised by `pixel_mean` and
    `pixel_std`, minus its mean over the T frames when `subtract_mean_frame`."""
    x = normalize_video(video, self.pixel_mean, self.pixel_std, jnp.float32)
    if self.subtract_mean_frame:
      x = x - jnp.mean(x, axis=1, keepdims=True)  # in float32: the differences are small
    return x.astype(self.dtype)

  @nn.compact
  def __call__(self, video: Array, visible: Array | None = None) -> Array:
    """video uint8 (or float in [0, 255]) [B, T, H, W, 3]; visible int [B, K] token indices
    (None: all tokens). Returns the normalised tokens [B, K, width] (K = N without `visible`)."""
    self.check(video)
    batch = video.shape[0]
    x = self.embedding_input(video)
    if self.stem_widths:
      seen = None if visible is None else self.visible_pixels(visible, video.shape[1])
      x = conv_stem(x, self.stem_widths, self.dtype, seen)
    x = tubelet_embedding(
      self.width,
      self.tubelet_size,
      self.patch_size // 2 ** len(self.stem_widths),
      self.dtype,
      nn.initializers.xavier_uniform(),
    )(x)  # [B, T', h, w, D]
    x = x.reshape(batch, -1, self.width)  # [B, N, D], tokens in (t, y, x) order
    x = x + jnp.asarray(sincos_positions(x.shape[1], self.width), self.dtype)
    if visible is not None:
      x = gather_tokens(x, visible)  # [B, K, D]
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    x = Transformer(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      hidden_act=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      remat=self.remat,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      name="transformer",
    )(x)
    return layer_norm(self.layer_norm_eps, self.dtype, "norm")(x)


class PatchDiscriminator(nn.Module):
  """Scores tubelet patches (pixel vectors [..., P]) as real (> 0) or reconstructed: a two-layer
  MLP per patch, MARLIN's adversarial critic in its simplest form."""

  width: int = 256  # hidden width
  dtype: Dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, patches: Array) -> Array:
    h = _dense(self.width, (None, "mlp"), "hidden", self.dtype)(patches.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    return _dense(1, ("mlp", None), "score", self.dtype)(h)[..., 0].astype(jnp.float32)


class VideoMAE(nn.Module):
  """Masked autoencoder: the encoder on visible tokens, a light decoder predicting the pixels
  (and optionally the frame differences) of the masked tubelets."""

  encoder: VideoViTEncoder  # the encoder (its parameters: the `encoder` subtree)
  decoder_width: int = 384  # decoder transformer width
  decoder_depth: int = 4  # decoder blocks
  decoder_num_heads: int = 6  # decoder attention heads
  decoder_mlp_dim: int = 1536  # decoder MLP width
  frame_difference: bool = False  # a second head for frame-difference targets (MAE-DFER)
  discriminator_width: int = 0  # hidden width of the patch discriminator (0: none)

  @property
  def patch_values(self) -> int:
    """Values per tubelet patch: tubelet_size * patch_size^2 * 3."""
    return self.encoder.tubelet_size * self.encoder.patch_size**2 * 3

  def setup(self):
    enc = self.encoder
    self.encoder_to_decoder = _dense(
      self.decoder_width, ("embed", None), "encoder_to_decoder", enc.dtype, use_bias=False
    )
    self.mask_token = self.param(
      "mask_token",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None,)),
      (self.decoder_width,),
      jnp.float32,
    )
    self.decoder = Transformer(
      depth=self.decoder_depth,
      num_heads=self.decoder_num_heads,
      mlp_dim=self.decoder_mlp_dim,
      hidden_act=enc.hidden_act,
      layer_norm_eps=enc.layer_norm_eps,
      remat=enc.remat,
      attention_impl=enc.attention_impl,
      dtype=enc.dtype,
    )
    self.decoder_norm = layer_norm(enc.layer_norm_eps, enc.dtype, "decoder_norm")
    self.pixel_head = _dense(self.patch_values, ("embed", None), "pixel_head", enc.dtype)
    if self.frame_difference:
      self.motion_head = _dense(self.patch_values, ("embed", None), "motion_head", enc.dtype)
    if self.discriminator_width:
      self.discriminator = PatchDiscriminator(width=self.discriminator_width, dtype=enc.dtype)

  def reconstruct(
    self, video: Array, visible: Array, masked: Array
  ) -> tuple[Array, dict[str, Array]]:
    """video [B, T, H, W, 3]; visible int [B, K], masked int [B, M] token indices (a partition
    of the N tokens). Returns (pixels [B, M, P] predicted for the masked tubelets, aux):
    `tokens` [B, K, width] (the encoder's output) and, with `frame_difference`, `motion`
    [B, M, P] (predicted frame differences)."""
    dtype = self.encoder.dtype
    tokens = self.encoder(video, visible)  # [B, K, D]
    num_tokens = visible.shape[1] + masked.shape[1]
    positions = jnp.asarray(sincos_positions(num_tokens, self.decoder_width), dtype)  # [N, Dd]
    x = self.encoder_to_decoder(tokens) + positions[visible]  # [B, K, Dd]
    mask_tokens = self.mask_token.astype(dtype) + positions[masked]  # [B, M, Dd]
    x = jnp.concatenate([x, mask_tokens], axis=1)  # [B, N, Dd]
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    x = self.decoder_norm(self.decoder(x))[:, visible.shape[1] :]  # [B, M, Dd]
    aux = {"tokens": tokens}
    if self.frame_difference:
      aux["motion"] = self.motion_head(x).astype(jnp.float32)
    return self.pixel_head(x).astype(jnp.float32), aux

  def discriminate(self, patches: Array) -> Array:
    """patches [..., P] (tubelet pixels in the reconstruction's target space) -> logits [...]."""
    return self.discriminator(patches)

  def __call__(
    self, video: Array, visible: Array, masked: Array, train: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    """`reconstruct`, and (to create its parameters) the discriminator's logits of the
    reconstruction in `aux["discriminator_logits"]` [B, M]."""
    del train  # no dropout in pretraining
    pixels, aux = self.reconstruct(video, visible, masked)
    if self.discriminator_width:
      aux["discriminator_logits"] = self.discriminate(pixels)
    return pixels, aux


class VideoViTClassifier(nn.Module):
  """The MAE's encoder on all tokens, mean-pooled (minus a still clip's pooled tokens when the
  encoder subtracts the mean frame), `fc_norm`, dropout and a linear head.

  Same call as `fdjax.models.vivit.VideoVisionTransformer`: `video` uint8 [B, T, H, W, 3] ->
  (logits [B, num_classes], or the clip embedding [B, width] when num_classes == 0, aux). Its
  `encoder` parameters have the names and shapes of `VideoMAE`'s, so a pretraining run's
  `encoder` subtree loads into it unchanged.
  """

  encoder: VideoViTEncoder  # the encoder (its parameters: the `encoder` subtree)
  num_classes: int = 0  # classifier outputs; 0 returns the clip embedding [B, width]
  dropout: float = 0.0  # dropout on the clip embedding before the classifier (training only)
  stop_backbone_gradient: bool = False  # no backward pass into the encoder (linear probe)

  @property
  def image_size(self) -> int:
    """Frame side in pixels (the encoder's)."""
    return self.encoder.image_size

  @property
  def pixel_mean(self) -> tuple[float, float, float]:
    return self.encoder.pixel_mean

  @property
  def pixel_std(self) -> tuple[float, float, float]:
    return self.encoder.pixel_std

  @nn.compact
  def __call__(
    self, video: Array, train: bool = False, frame_mask: Array | None = None
  ) -> tuple[Array, dict[str, Array]]:
    """Returns (logits or embedding, aux): `clip_embedding` [B, width] (after fc_norm) and
    `tokens` [B, N, width] (the encoder's output). `frame_mask` is not supported: the encoder
    attends over every token of a fixed-length clip. With the encoder's `subtract_mean_frame`
    the mean-pooled tokens are taken minus those of a still clip (one more encoder pass on
    one clip)."""
    if frame_mask is not None:
      raise ValueError("VideoViTClassifier takes whole clips: pass no frame_mask")
    tokens = self.encoder(video)  # [B, N, D]
    if self.stop_backbone_gradient:
      # A linear probe: the encoder is frozen, so its backward pass would be wasted work.
      tokens = jax.lax.stop_gradient(tokens)
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)  # [B, D]
    if self.encoder.subtract_mean_frame:
      # The input is near zero after the mean frame is subtracted, and a part common to all
      # clips dominates the pooled tokens: on the DFEW twin they vary across clips by 0.2% of
      # their size, which fc_norm (per clip) keeps, so a linear head starting at zero cannot
      # read them (docs/design.md section 21). A still clip's input is all zeros: pooling
      # relative to its tokens takes that common part off.
      still = self.encoder(jnp.zeros((1, *video.shape[1:]), video.dtype))  # [1, N, D]
      if self.stop_backbone_gradient:
        still = jax.lax.stop_gradient(still)
      pooled = pooled - jnp.mean(still.astype(jnp.float32), axis=1)
    pooled = pooled.astype(self.encoder.dtype)
    embedding = layer_norm(self.encoder.layer_norm_eps, self.encoder.dtype, "fc_norm")(pooled)
    aux = {"clip_embedding": embedding, "tokens": tokens}
    if self.num_classes == 0:
      return embedding, aux
    embedding = nn.Dropout(rate=self.dropout, deterministic=not train)(embedding)
    logits = nn.Dense(
      features=self.num_classes,
      dtype=self.encoder.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "classes")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
      name="head",
    )(embedding)
    return logits.astype(jnp.float32), aux


def _split_fields(variant: str, overrides: dict[str, Any]) -> tuple[dict, dict]:
  if variant not in ENCODER_VARIANTS:
    raise ValueError(f"unknown video MAE variant {variant!r}; known: {sorted(ENCODER_VARIANTS)}")
  encoder = {**ENCODER_VARIANTS[variant]}
  rest = {}
  for key, value in overrides.items():
    (encoder if key in ENCODER_FIELDS else rest)[key] = value
  return encoder, rest


def video_mae_model(variant: str, **overrides: Any) -> VideoMAE:
  """A `VideoMAE` of a named variant ("S", "B", "L", "tiny"); `overrides` may set encoder fields
  (image_size, depth, dtype, remat, ...) and decoder fields alike."""
  encoder, rest = _split_fields(variant, overrides)
  return VideoMAE(encoder=VideoViTEncoder(**encoder), **{**DECODER_VARIANTS[variant], **rest})


def video_vit_classifier(variant: str, **overrides: Any) -> VideoViTClassifier:
  """A `VideoViTClassifier` of a named variant; encoder fields and `num_classes`, `dropout`,
  `stop_backbone_gradient`."""
  encoder, rest = _split_fields(variant, overrides)
  return VideoViTClassifier(encoder=VideoViTEncoder(**encoder), **rest)
