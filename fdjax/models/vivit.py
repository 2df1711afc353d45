"""A ViViT-style factorised space-time video encoder, trained from scratch (no CLIP).

Where it sits: the `vivit_scratch` variants of the expression and action-unit experiments use it
in place of `fdjax.models.temporal.VideoClassifier`, with the same call signature:
`video [B, T, H, W, 3]` uint8 -> `(logits [B, C], aux)`, or the clip embedding `[B, D]` when
`num_classes == 0` (pretraining, probing).

Architecture (ViViT "factorised encoder", Arnab et al. 2021): tubelets of `tubelet_size` frames x
`patch_size`^2 pixels are embedded by one 3D convolution (`tubelet_size=1` gives per-frame
patches); a spatial transformer runs over the patches of each time step with its own class token;
the per-step class tokens, with learned temporal positions and a temporal class token, go through
a temporal transformer whose class token is the clip embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models.attention import padding_mask
from fdjax.models.clip import Transformer, layer_norm
from fdjax.models.temporal import normalize_video

Array = jax.Array
Dtype = Any

# ImageNet's RGB statistics: the usual normalisation for video transformers trained from scratch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VIVIT_VARIANTS: dict[str, dict[str, Any]] = {
  "B/16x2": dict(
    image_size=224, patch_size=16, tubelet_size=2, width=768, spatial_depth=12,
    temporal_depth=4, num_heads=12, mlp_dim=3072,
  ),
  "S/16x2": dict(
    image_size=224, patch_size=16, tubelet_size=2, width=384, spatial_depth=12,
    temporal_depth=4, num_heads=6, mlp_dim=1536,
  ),
  "S/16x2-112": dict(
    image_size=112, patch_size=16, tubelet_size=2, width=384, spatial_depth=12,
    temporal_depth=4, num_heads=6, mlp_dim=1536,
  ),
  "tiny": dict(
    image_size=32, patch_size=8, tubelet_size=2, width=64, spatial_depth=2, temporal_depth=1,
    num_heads=4, mlp_dim=128, max_frames=16,
  ),
}  # fmt: skip


def vivit_model(variant: str, **overrides: Any) -> VideoVisionTransformer:
  """A `VideoVisionTransformer` of a named variant ("B/16x2", "S/16x2", "tiny", ...)."""
  if variant not in VIVIT_VARIANTS:
    raise ValueError(f"unknown ViViT variant {variant!r}; known: {sorted(VIVIT_VARIANTS)}")
  return VideoVisionTransformer(**{**VIVIT_VARIANTS[variant], **overrides})


def tubelet_embedding(
  width: int,
  tubelet_size: int,
  patch_size: int,
  dtype: Dtype,
  kernel_init=None,
) -> nn.Conv:
  """The 3D convolution that embeds non-overlapping tubelets of `tubelet_size` frames x
  `patch_size`^2 pixels: [B, T, H, W, 3] -> [B, T / tubelet, H / patch, W / patch, width].

  Named "tubelet_embedding"; call it inside a compact method so it becomes that submodule.
  `kernel_init` defaults to LeCun normal (ViViT's); the MAE encoder uses Xavier uniform."""
  kernel = (tubelet_size, patch_size, patch_size)
  kernel_init = kernel_init or nn.initializers.lecun_normal()
  return nn.Conv(
    features=width,
    kernel_size=kernel,
    strides=kernel,
    padding="VALID",
    dtype=dtype,
    kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, None, "conv_in", "embed")),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    name="tubelet_embedding",
  )


def conv_stem(x: Array, widths: Sequence[int], dtype: Dtype, visible: Array | None = None) -> Array:
  """The convolutional stem on every frame: [B, T, H, W, C] -> [B, T, H / 2^k, W / 2^k, widths[-1]]
  for k = len(widths) stages of two 3x3 convolutions (ReLU) and a 2x2 max-pool, named
  "stem_{stage}_{conv}"; call it inside a compact method so they become its submodules.

  `visible` float [B, T, H, W] (1 where a pixel is seen) masks the stem as ConvMAE does: the
  input and every convolution's output are zeroed where nothing is seen, so a feature-map cell
  of a visible region depends on visible pixels only and masked pixels never reach the visible
  tokens. Masked regions must be blocks of 2^k x 2^k pixels (whole patches)."""
  batch, frames = x.shape[:2]
  x = x.reshape(batch * frames, *x.shape[2:])
  mask = None if visible is None else visible.reshape(batch * frames, *visible.shape[2:], 1)
  for i, width in enumerate(widths):
    for j in range(2):
      if mask is not None:
        x = x * mask.astype(x.dtype)
      x = nn.Conv(
        width,
        (3, 3),
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, None, None)
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name=f"stem_{i}_{j}",
      )(x)
      x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    if mask is not None:
      mask = mask[:, ::2, ::2]
      x = x * mask.astype(x.dtype)
  return x.reshape(batch, frames, *x.shape[1:])


def stem_flops(widths: Sequence[int], image_size: int, frames: int) -> float:
  """Forward FLOPs of `conv_stem` on `frames` frames of `image_size`^2 RGB pixels."""
  flops, side, previous = 0.0, image_size, 3
  for width in widths:
    flops += frames * 2 * side * side * 9 * (previous * width + width * width)
    side, previous = side // 2, width
  return flops


def _learned(module: nn.Module, name: str, shape: tuple[int, ...], axes) -> Array:
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
  return module.param(name, init, shape, jnp.float32)


class VideoVisionTransformer(nn.Module):
  """Factorised space-time transformer over uint8 video; a classifier head when num_classes > 0."""

  image_size: int = 224  # frame height and width in pixels
  patch_size: int = 16  # square patch side in pixels
  tubelet_size: int = 2  # frames per tubelet (1 = per-frame patch embedding)
  max_frames: int = 32  # longest clip in frames (sets the learned temporal positions)
  width: int = 768  # transformer width
  spatial_depth: int = 12  # blocks of the spatial transformer (per time step)
  temporal_depth: int = 4  # blocks of the temporal transformer (over time steps)
  num_heads: int = 12  # attention heads
  mlp_dim: int = 3072  # MLP hidden width
  num_classes: int = 0  # classifier outputs; 0 returns the clip embedding [B, width]
  dropout: float = 0.0  # dropout on the clip embedding before the classifier (training only)
  hidden_act: str = "gelu"  # MLP activation
  layer_norm_eps: float = 1e-6  # LayerNorm epsilon
  pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB mean for normalisation
  pixel_std: tuple[float, float, float] = IMAGENET_STD  # RGB std for normalisation
  remat: bool = False  # recompute block activations in the backward pass
  # Subtract each clip's mean frame (over its real frames) from every frame after normalising:
  # what stays still (background, identity, light) leaves the input and what moves (the
  # expression) stays.
  subtract_mean_frame: bool = False
  # Widths of the convolutional stem's stages (empty: none, ViViT's plain tubelet embedding).
  # Each stage is two 3x3 convolutions with ReLU and a 2x2 max-pool on every frame, so a token
  # still covers `patch_size`^2 pixels: the tubelet embedding then takes patches of
  # patch_size / 2^stages feature-map cells. Early convolutions (Xiao et al., 2021) give the
  # transformer a CNN's locality (docs/design.md section 21 measures them on the BP4D twin).
  stem_widths: tuple[int, ...] = ()
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)

  def _transformer(self, depth: int, name: str) -> Transformer:
    return Transformer(
      depth=depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      hidden_act=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      remat=self.remat,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      name=name,
    )

  @nn.compact
  def __call__(
    self, video: Array, train: bool = False, frame_mask: Array | None = None
  ) -> tuple[Array, dict[str, Array]]:
    """video uint8 (or float in [0, 255]) [B, T, H, W, 3]; frame_mask bool [B, T].

    Returns (logits [B, num_classes] or the clip embedding [B, width], aux): `clip_embedding`
    [B, width] and `step_embeddings` [B, T / tubelet_size, width] (the spatial class tokens).
    """
    size = self.image_size
    if video.ndim != 5 or video.shape[2:] != (size, size, 3):
      raise ValueError(f"video must be [B, T, {size}, {size}, 3], got shape {video.shape}")
    batch, frames = video.shape[:2]
    if frames % self.tubelet_size:
      raise ValueError(
        f"video has {frames} frames, not a multiple of tubelet_size={self.tubelet_size}"
      )
    if frames > self.max_frames:
      raise ValueError(f"video has {frames} frames; the model has max_frames={self.max_frames}")
    if size % self.patch_size:
      raise ValueError(f"image_size {size} is not a multiple of patch_size {self.patch_size}")
    reduction = 2 ** len(self.stem_widths)
    if self.patch_size % reduction:
      raise ValueError(
        f"patch_size {self.patch_size} is not a multiple of the stem's reduction {reduction} "
        f"({len(self.stem_widths)} stages in stem_widths={self.stem_widths})"
      )
    steps = frames // self.tubelet_size

    x = normalize_video(video, self.pixel_mean, self.pixel_std, self.dtype)
    if self.subtract_mean_frame:
      weights = jnp.ones((batch, frames), x.dtype) if frame_mask is None else frame_mask
      weights = weights.astype(x.dtype)[:, :, None, None, None]
      mean = (x * weights).sum(1, keepdims=True) / jnp.maximum(weights.sum(1, keepdims=True), 1)
      x = x - mean
    if self.stem_widths:
      x = conv_stem(x, self.stem_widths, self.dtype)
    x = tubelet_embedding(self.width, self.tubelet_size, self.patch_size // reduction, self.dtype)(
      x
    )  # [B, T', h, w, D]
    x = x.reshape(batch * steps, -1, self.width)  # [B T', N, D]: each time step on its own

    spatial_cls = _learned(self, "spatial_cls_token", (self.width,), ("embed",))
    spatial_positions = _learned(
      self, "spatial_position_embedding", (x.shape[1] + 1, self.width), (None, "embed")
    )
    x = jnp.concatenate(
      [jnp.broadcast_to(spatial_cls.astype(self.dtype), (x.shape[0], 1, self.width)), x], axis=1
    )
    x = x + spatial_positions.astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    x = self._transformer(self.spatial_depth, "spatial_encoder")(x)
    x = layer_norm(self.layer_norm_eps, self.dtype, "spatial_norm")(x[:, 0])
    step_embeddings = x.reshape(batch, steps, self.width)  # [B, T', D]

    if frame_mask is None:
      valid = jnp.ones((batch, steps), bool)
    else:
      # A tubelet is real when any of its frames is.
      valid = frame_mask.astype(bool).reshape(batch, steps, self.tubelet_size).any(axis=-1)
    temporal_cls = _learned(self, "temporal_cls_token", (self.width,), ("embed",))
    temporal_positions = _learned(
      self,
      "temporal_position_embedding",
      (self.max_frames // self.tubelet_size, self.width),
      (None, "embed"),
    )
    x = step_embeddings + temporal_positions[:steps].astype(self.dtype)
    x = jnp.concatenate(
      [jnp.broadcast_to(temporal_cls.astype(self.dtype), (batch, 1, self.width)), x], axis=1
    )
    x = nn.with_logical_constraint(x, ("batch", "frames", "embed"))
    valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)
    x = self._transformer(self.temporal_depth, "temporal_encoder")(x, padding_mask(valid))
    embedding = layer_norm(self.layer_norm_eps, self.dtype, "temporal_norm")(x[:, 0])
    aux = {"clip_embedding": embedding, "step_embeddings": step_embeddings}
    if self.num_classes == 0:
      return embedding, aux
    embedding = nn.Dropout(rate=self.dropout, deterministic=not train)(embedding)
    logits = nn.Dense(
      features=self.num_classes,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "classes")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
      name="head",
    )(embedding)
    return logits.astype(jnp.float32), aux
