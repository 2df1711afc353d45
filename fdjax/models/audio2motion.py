"""Audio to talking-head motion: stage 2 of the two-stage talking-head line (DAWN, JoyVASA,
AniTalker).

Where it sits: the model of the `audio2motion` task (`fdjax/tasks/audio2motion.py`). A frozen
stage-1 motion autoencoder (`face_motion_ae`, parameters under `motion_ae/`) turns each video
frame into a motion code `[D]`; a wav2vec2/HuBERT encoder turns the waveform into one feature per
video frame; a transformer denoiser (`fdjax.models.motion_diffusion`) learns the code sequences
given the speech, window by window after the previous window's last frames, with classifier-free
guidance on the audio. Rendering is stage 1's: `decode(appearance of a portrait, code)`.

    video [B, T, H, W, 3] --motion_ae.encode_motion (no gradient)--> codes [B, T, D]
    audio [B, S] --encoder--> features [B, T, D_a] --MotionCodeDiffusion--> codes [B, T, D]

Design in docs/design.md section 23.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax import diffusion
from fdjax.models.audio2mesh import frames_in
from fdjax.models.motion_diffusion import DiffusionDecoder
from fdjax.models.wav2vec2 import Wav2Vec2Encoder

Array = jax.Array


# Denoiser sizes (`TransformerDenoiser` fields; `motion_width` comes from stage 1): `base` is
# JoyVASA's 6-layer transformer at 512 wide; `small` trains on a CPU; `tiny` is for tests.
CODE_DENOISER_VARIANTS: dict[str, dict] = {
  "base": dict(d_model=512, num_heads=8, num_layers=6, mlp_dim=1024, period=25),
  "small": dict(d_model=64, num_heads=4, num_layers=2, mlp_dim=128, period=25, dropout_rate=0.0),
  "tiny": dict(d_model=16, num_heads=2, num_layers=1, mlp_dim=32, period=4, dropout_rate=0.0),
}
CODE_DENOISER_VARIANTS = {
  name: {"num_vertices": 0, "num_styles": 0, "audio_frames_per_frame": 1, **fields}
  for name, fields in CODE_DENOISER_VARIANTS.items()
}


class MotionCodeDiffusion(DiffusionDecoder):
  """`DiffusionDecoder` over motion codes `[B, T, D]` instead of vertices: the "template" is a
  reference code `[B, D]` (the clip's first frame, or a portrait's, under relative motion; zeros
  otherwise), x_0 = (code - reference) * `sample_scale`, and the denoiser's `motion_width` is D.
  Speech is the only guided condition (no speaking styles: `num_styles=0`), so guidance scales
  are one per example: `guidance_scales` `(s,)`, `[1]` or `[B, 1]`."""

  VARIANTS: ClassVar[dict[str, dict]] = CODE_DENOISER_VARIANTS

  def _check_template(self, template: Array, batch_size: int) -> None:
    width = self.frame_width
    if template.shape != (batch_size, width):
      raise ValueError(
        f"the reference code must have shape [B, D]=({batch_size}, {width}), "
        f"got {tuple(template.shape)}"
      )

  def _to_vertices(self, sample: Array, template: Array, frame_mask: Array) -> tuple[Array, Array]:
    offsets = jnp.where(frame_mask[..., None], sample.astype(jnp.float32) / self.sample_scale, 0.0)
    return template[:, None].astype(jnp.float32) + offsets, offsets

  def guidance(self, scales: tuple[float, ...] | None = None) -> diffusion.Guidance:
    """Speech alone: the style condition of the mesh decoders is unused here (its drop flag
    stays False in training and sampling, so its untrained null never enters)."""
    scale = self.audio_guidance_scale if scales is None else scales[0]
    return diffusion.Guidance(
      conditions=("audio",), drop_probabilities=(self.audio_drop_probability,), scales=(scale,)
    )


class TalkingHeadMotion(nn.Module):
  """Speech encoder + code denoiser, over a frozen stage-1 motion autoencoder."""

  encoder: Wav2Vec2Encoder  # audio [B, S] -> features [B, T, D_a], one per video frame
  decoder: MotionCodeDiffusion  # the code denoiser, trained and sampled
  # Stage 1 (face_motion_ae): encode_appearance, encode_motion, decode; frozen, under motion_ae/
  motion_ae: nn.Module
  sample_rate: int = 16000  # audio samples per second
  fps: float = 25.0  # video frames per second
  # Codes are modelled relative to a reference frame's (the clip's first; a portrait's when
  # generating): code_t = reference + delta_t, as LIA/FOMM drive a source image. False: absolute.
  relative_motion: bool = True

  def motion_codes(self, video: Array) -> Array:
    """Stage-1 codes of every frame, without gradient: `video [B, T, H, W, 3]` (uint8, or
    float in [0, 1]) -> `[B, T, D]`."""
    batch_size, num_frames = video.shape[:2]
    frames = _to_unit(video).reshape(batch_size * num_frames, *video.shape[2:])
    codes = self.motion_ae.encode_motion(frames)  # [B * T, D]
    return jax.lax.stop_gradient(codes.reshape(batch_size, num_frames, -1).astype(jnp.float32))

  def reference(self, codes: Array) -> Array:
    """The reference code `[B, D]` of the sequences whose first code is `codes [B, D]`."""
    return codes if self.relative_motion else jnp.zeros_like(codes)

  def __call__(self, batch: dict[str, Array], train: bool = False) -> tuple[Array, dict]:
    """Training pass: one denoising step on the codes of `batch["video"]` given
    `batch["audio"]`. Returns the codes `[B, T, D]` of the implied x_0 and the decoder's aux
    (with "codes", the truth)."""
    codes = self.motion_codes(batch["video"])
    if self.is_initializing():
      # Stage 1's appearance encoder and generator get their parameters too (merged from the
      # stage-1 run by the task, then frozen), so rendering needs nothing else.
      appearance, _ = self.encode_portrait(batch["video"][:, 0])
      self.render(appearance, codes[:, 0])
    num_frames = codes.shape[1]
    features = self._encode(batch["audio"], batch.get("audio_mask"), train, num_frames)
    predicted, aux = self.decoder(
      features,
      self.reference(codes[:, 0]),
      None,
      codes,
      frame_mask=batch.get("frame_mask"),
      train=train,
    )
    return predicted, {**aux, "codes": codes}

  def generate(
    self,
    audio: Array,
    reference: Array,
    *,
    num_frames: int | None = None,
    audio_mask: Array | None = None,
    frame_mask: Array | None = None,
    seed: Array | None = None,
    guidance_scale: float | Array | None = None,
  ) -> Array:
    """Samples codes `[B, T, D]` for `audio [B, S]` starting from the `reference [B, D]` code
    (a portrait's or a clip's first frame's; ignored without relative motion). T defaults to
    the audio's whole frames. `seed [B]` int: example b's noise from `jax.random.key(seed[b])`
    alone (else the `sample` rng, else `decoder.sample_seed`). `guidance_scale`: the audio's
    classifier-free guidance, a float or `[B]` (default the decoder's)."""
    if frame_mask is not None:
      num_frames = frame_mask.shape[1]
    elif num_frames is None:
      num_frames = frames_in(audio.shape[1], self.sample_rate, self.fps)
    features = self._encode(audio, audio_mask, False, num_frames)
    if guidance_scale is None:
      guidance_scale = self.decoder.audio_guidance_scale
    if isinstance(guidance_scale, int | float):
      scales = (float(guidance_scale),)
    else:
      scales = jnp.asarray(guidance_scale, jnp.float32).reshape(-1, 1)  # [B, 1]
    codes, _ = self.decoder.generate(
      features,
      self.reference(reference),
      None,
      num_frames=num_frames,
      frame_mask=frame_mask,
      guidance_scales=scales,
      seed=seed,
    )
    return codes

  def encode_portrait(self, image: Array) -> tuple[Any, Array]:
    """A portrait `[B, H, W, 3]` (uint8, or float in [0, 1]) -> (its stage-1 appearance, its
    code `[B, D]`)."""
    image = _to_unit(image)
    appearance = self.motion_ae.encode_appearance(image)
    return appearance, self.motion_ae.encode_motion(image).astype(jnp.float32)

  def render(self, appearance: Any, codes: Array) -> Array:
    """Stage 1's generator: `codes [B, D]` on `appearance` -> images `[B, H, W, 3]` in [0, 1]."""
    return self.motion_ae.decode(appearance, codes)

  def _encode(self, audio, audio_mask, train, num_frames) -> Array:
    features, _ = self.encoder(audio, audio_mask, train, num_frames=num_frames)
    return features  # [B, T * r, D_a]


def _to_unit(images: Array) -> Array:
  """uint8 `[..., 3]` -> float32 in [0, 1]; floats pass (as float32)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


__all__ = ("CODE_DENOISER_VARIANTS", "MotionCodeDiffusion", "TalkingHeadMotion")
