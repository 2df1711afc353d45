"""Face motion autoencoder: a portrait's appearance apart from a compact motion code (stage 1 of
the talking-head line; task `fdjax.tasks.face_motion_ae`, docs/design.md section 22).

After LIA (Wang et al., "Latent Image Animator", ICLR 2022): an appearance encoder turns a
source image into a feature pyramid and a latent `w_s` [B, L]; a motion encoder turns a frame
into magnitudes `code` [B, D] (D ~ 20) along D learned directions that are kept orthonormal
(the QR decomposition of a free [L, D] matrix). The source's own code `code_s` is part of its
appearance, and the generator navigates from the source by the difference of codes:
`z = w_s + directions @ (code - code_s)` (LIA navigates by the driving code alone; the
difference makes a code of the source itself decode to the source and puts every frame's code
in one space, which the relative reenactment below and stage 2 rely on). The generator
decodes `z` from the coarsest scale up: at every scale it predicts a flow and an occlusion
mask, warps the appearance features of that scale by the flow (bilinear), mixes them into its
own features and refines; at full resolution it warps the source image itself and blends it
with a generated image by a last mask. A PatchGAN discriminator (`discriminate`) rides along
for the adversarial term.

API used by stage 2 and `fdjax generate` (pure functions of the parameters through
`model.apply(variables, ..., method=...)`):

    appearance = encode_appearance(image)   # image [B, H, W, 3] f32 in [0, 1] -> pytree
    code = encode_motion(frames)            # frames [B, H, W, 3] f32 in [0, 1] -> [B, D]
    image = decode(appearance, code)        # -> [B, H, W, 3] f32 in [0, 1]

Cross-identity reenactment uses relative motion (LIA's and FOMM's): a portrait `p` driven by a
clip `d` gets `code_p + code_d(t) - code_d(0)` (`relative_codes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

NEGATIVE_SLOPE = 0.2  # LeakyReLU slope of every convolution.


def _act(x: Array) -> Array:
  return nn.leaky_relu(x, NEGATIVE_SLOPE)


def relative_codes(portrait_code: Array, driving_codes: Array) -> Array:
  """Relative motion: `portrait_code` [..., D] plus each driving code [..., T, D] minus the
  first driving code -> [..., T, D]."""
  return portrait_code[..., None, :] + driving_codes - driving_codes[..., :1, :]


def warp(features: Array, flow: Array) -> Array:
  """Backward warping: output pixel (i, j) samples `features` [B, H, W, C] bilinearly at
  (i, j) + `flow` [B, H, W, 2] ((dx, dy) in units of half the image, the [-1, 1] convention:
  dx = 2 moves a whole width; beyond the border the border value) -> [B, H, W, C]. A zero flow
  gives back `features` exactly."""
  b, h, w, c = features.shape
  rows = jnp.arange(h, dtype=flow.dtype)[None, :, None]
  columns = jnp.arange(w, dtype=flow.dtype)[None, None, :]
  x = jnp.clip(columns + flow[..., 0] * (w / 2), 0, w - 1)  # [B, H, W] in pixels
  y = jnp.clip(rows + flow[..., 1] * (h / 2), 0, h - 1)
  x0 = jnp.clip(jnp.floor(x), 0, max(w - 2, 0)).astype(jnp.int32)
  y0 = jnp.clip(jnp.floor(y), 0, max(h - 2, 0)).astype(jnp.int32)
  x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  flat = features.reshape(b, h * w, c)

  def gather(yi, xi):  # [B, H, W] -> [B, H, W, C]
    index = (yi * w + xi).reshape(b, -1, 1)
    return jnp.take_along_axis(flat, index, axis=1).reshape(*yi.shape, c)

  top = gather(y0, x0) * (1 - fx) + gather(y0, x1) * fx
  bottom = gather(y1, x0) * (1 - fx) + gather(y1, x1) * fx
  return top * (1 - fy) + bottom * fy


def upsample(x: Array) -> Array:
  """Bilinear x2 upsampling: [B, h, w, C] -> [B, 2h, 2w, C]."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")


class DownBlock(nn.Module):
  """Two 3x3 convolutions and a 2x average pool, with a pooled 1x1 skip: [B, h, w, C] ->
  [B, h/2, w/2, features]."""

  features: int  # Output channels.
  dtype: Any = jnp.float32  # Compute dtype.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _act(nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(x))
    h = _act(nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    skip = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="skip")(x)
    return (h + nn.avg_pool(skip, (2, 2), (2, 2))) / math.sqrt(2)


class AppearanceEncoder(nn.Module):
  """Source image -> feature pyramid (finest first, [B, S/2^(i+1), S/2^(i+1), widths[i]]) and
  the latent `w_s` [B, latent_dim]."""

  widths: Sequence[int]  # Channels at S/2, S/4, ... (one down-sampling block each).
  latent_dim: int  # L: width of the latent the motion directions live in.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: Array) -> dict[str, Any]:
    x = _act(nn.Conv(self.widths[0], (3, 3), dtype=self.dtype, name="stem")(image))
    features = []
    for i, width in enumerate(self.widths):
      x = DownBlock(width, dtype=self.dtype, name=f"down_{i}")(x)
      features.append(x)
    pooled = jnp.mean(x, axis=(1, 2))  # [B, C]
    latent = nn.Dense(self.latent_dim, dtype=self.dtype, name="latent")(pooled)
    return {"features": tuple(features), "latent": latent, "image": image}


class MotionEncoder(nn.Module):
  """Frame -> motion magnitudes `code` [B, motion_dim] (LIA's alpha)."""

  widths: Sequence[int]  # Channels of its down-sampling blocks.
  hidden: int  # Width of the MLP head.
  motion_dim: int  # D: the code's size.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames: Array) -> Array:
    x = _act(nn.Conv(self.widths[0], (3, 3), dtype=self.dtype, name="stem")(frames))
    for i, width in enumerate(self.widths):
      x = DownBlock(width, dtype=self.dtype, name=f"down_{i}")(x)
    b, h, w, c = x.shape
    x = _act(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x.reshape(b, h * w * c)))
    return nn.Dense(self.motion_dim, dtype=self.dtype, name="code")(x)


class MotionDirections(nn.Module):
  """LIA's linear motion dictionary: D orthonormal directions in the L-dim latent, the Q of a
  free matrix's QR decomposition; `code` [B, D] -> displacement [B, L] = sum_i code_i d_i."""

  latent_dim: int
  motion_dim: int

  @nn.compact
  def __call__(self, code: Array) -> Array:
    weight = self.param(
      "weight", nn.initializers.normal(1.0), (self.latent_dim, self.motion_dim), jnp.float32
    )
    directions, _ = jnp.linalg.qr(weight)  # [L, D], orthonormal columns
    return code @ directions.T.astype(code.dtype)


class Generator(nn.Module):
  """Latent `z` [B, L] and appearance -> image [B, S, S, 3]: from the coarsest appearance scale
  up, each scale modulates its features by `z`, predicts a flow and an occlusion mask, warps
  the appearance features of that scale and refines; at full resolution the source image is
  warped and blended with a generated image."""

  widths: Sequence[int]  # The appearance encoder's widths (finest first).
  image_mask_bias: float = 2.0  # Initial logit of the last mask (> 0: the warped source).
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, appearance: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
    features = appearance["features"]
    coarse = features[-1]
    b, h, w, _ = coarse.shape
    x = nn.Dense(h * w * self.widths[-1], dtype=self.dtype, name="initial")(z)
    x = x.reshape(b, h, w, self.widths[-1])
    flows = []
    for i in reversed(range(len(self.widths))):
      feature = features[i]
      x = self._modulate(x, z, f"modulate_{i}")
      x = _act(nn.Conv(self.widths[i], (3, 3), dtype=self.dtype, name=f"conv_{i}")(x))
      flow, mask = self._flow_and_mask(x, f"flow_{i}", mask_bias=0.0)
      warped = warp(feature.astype(flow.dtype), flow)
      x = jnp.concatenate([x, mask * warped], axis=-1)
      x = _act(nn.Conv(self.widths[i], (3, 3), dtype=self.dtype, name=f"refine_{i}")(x))
      flows.append(flow)
      out_width = self.widths[i - 1] if i > 0 else self.widths[0]
      x = upsample(x)
      x = _act(nn.Conv(out_width, (3, 3), dtype=self.dtype, name=f"up_{i}")(x))
    # Full resolution: warp the source image, blend with a generated image.
    flow, mask = self._flow_and_mask(x, "flow_image", mask_bias=self.image_mask_bias)
    image = appearance["image"]
    warped = warp(image.astype(flow.dtype), flow)
    generated = nn.sigmoid(nn.Conv(3, (3, 3), dtype=self.dtype, name="to_rgb")(x))
    out = mask * warped + (1 - mask) * generated
    flows.append(flow)
    return out, {"flow": flow, "mask": mask, "flows": tuple(flows)}

  def _modulate(self, x: Array, z: Array, name: str) -> Array:
    """FiLM by the latent: x * (1 + scale(z)) + shift(z), per channel."""
    c = x.shape[-1]
    film = nn.Dense(2 * c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name=name)(z)
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    return x * (1 + scale) + shift

  def _flow_and_mask(self, x: Array, name: str, mask_bias: float) -> tuple[Array, Array]:
    """A flow (`warp`'s offsets, starting at zero) and a sigmoid mask."""
    out = nn.Conv(3, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype, name=name)(x)
    flow = out[..., :2].astype(jnp.float32)
    # The mask's logit starts at `mask_bias` (the flow at zero: the identity warp).
    return flow, nn.sigmoid(out[..., 2:].astype(jnp.float32) + mask_bias)


class PatchDiscriminator(nn.Module):
  """PatchGAN: image [B, S, S, 3] -> logits [B, S/2^n, S/2^n] (real > 0), one per patch."""

  widths: Sequence[int]  # Channels of its strided 4x4 convolutions.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: Array) -> Array:
    x = image * 2 - 1
    for i, width in enumerate(self.widths):
      x = _act(nn.Conv(width, (4, 4), (2, 2), dtype=self.dtype, name=f"conv_{i}")(x))
    return nn.Conv(1, (3, 3), dtype=self.dtype, name="logits")(x)[..., 0].astype(jnp.float32)


class FaceMotionAE(nn.Module):
  """Appearance encoder, motion encoder, motion directions, generator and discriminator."""

  image_size: int = 64  # S: frames are S x S.
  widths: Sequence[int] = (32, 64, 128)  # Appearance encoder / generator channels per scale.
  motion_widths: Sequence[int] = (16, 32, 64, 128)  # Motion encoder's down-sampling channels.
  motion_hidden: int = 256  # Motion encoder's MLP width.
  latent_dim: int = 128  # L: latent in which the motion directions live (LIA: 512).
  motion_dim: int = 20  # D: the motion code's size (LIA, AniTalker, EDTalk: 20).
  discriminator_widths: Sequence[int] = (32, 64, 128)  # PatchGAN channels (() : none).
  # Initial logit of the generator's last mask between the warped source and the generated
  # image (sigmoid(2) = 0.88 towards the source).
  image_mask_bias: float = 2.0
  dtype: Any = jnp.float32  # Compute dtype.

  def setup(self):
    if self.image_size % (2 ** len(self.widths)) or self.image_size % (
      2 ** len(self.motion_widths)
    ):
      raise ValueError(
        f"model.image_size={self.image_size} must be divisible by 2^len(widths) and "
        f"2^len(motion_widths) ({len(self.widths)}, {len(self.motion_widths)} blocks)"
      )
    self.appearance_encoder = AppearanceEncoder(
      widths=tuple(self.widths), latent_dim=self.latent_dim, dtype=self.dtype
    )
    self.motion_encoder = MotionEncoder(
      widths=tuple(self.motion_widths),
      hidden=self.motion_hidden,
      motion_dim=self.motion_dim,
      dtype=self.dtype,
    )
    self.directions = MotionDirections(latent_dim=self.latent_dim, motion_dim=self.motion_dim)
    self.generator = Generator(
      widths=tuple(self.widths),
      image_mask_bias=self.image_mask_bias,
      dtype=self.dtype,
    )
    if self.discriminator_widths:
      self.discriminator = PatchDiscriminator(
        widths=tuple(self.discriminator_widths), dtype=self.dtype
      )

  def _check(self, image: Array, name: str) -> None:
    if image.ndim != 4 or image.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"{name} must be [B, {self.image_size}, {self.image_size}, 3] (model.image_size), "
        f"got {tuple(image.shape)}"
      )

  def encode_appearance(self, image: Array) -> dict[str, Any]:
    """image [B, S, S, 3] in [0, 1] -> {"features": pyramid, "latent": [B, L], "image",
    "code": the image's own motion code [B, D]}."""
    self._check(image, "image")
    appearance = self.appearance_encoder(image.astype(self.dtype))
    return {**appearance, "code": self.encode_motion(image)}

  def encode_motion(self, frames: Array) -> Array:
    """frames [B, S, S, 3] in [0, 1] -> motion code [B, D] (float32)."""
    self._check(frames, "frames")
    return self.motion_encoder(frames.astype(self.dtype)).astype(jnp.float32)

  def decode_with_aux(self, appearance: dict[str, Any], code: Array):
    """`decode` plus the generator's flows and masks."""
    motion = code.astype(jnp.float32) - appearance["code"].astype(jnp.float32)
    z = appearance["latent"].astype(jnp.float32) + self.directions(motion)
    image, aux = self.generator(z.astype(self.dtype), appearance)
    return image.astype(jnp.float32), aux

  def decode(self, appearance: dict[str, Any], code: Array) -> Array:
    """appearance (of `encode_appearance`) and code [B, D] -> image [B, S, S, 3] in [0, 1]."""
    return self.decode_with_aux(appearance, code)[0]

  def discriminate(self, image: Array) -> Array:
    """image [B, S, S, 3] in [0, 1] -> patch logits [B, h, w] (real > 0)."""
    return self.discriminator(image.astype(self.dtype))

  def __call__(self, source: Array, driving: Array) -> tuple[Array, dict[str, Any]]:
    """Reconstruction of `driving` [B, S, S, 3] from `source`'s appearance and `driving`'s
    motion: (image [B, S, S, 3], aux with the code, flows and masks)."""
    appearance = self.encode_appearance(source)
    code = self.encode_motion(driving)
    image, aux = self.decode_with_aux(appearance, code)
    if self.discriminator_widths and self.is_initializing():
      self.discriminate(image)
    return image, {**aux, "code": code}
