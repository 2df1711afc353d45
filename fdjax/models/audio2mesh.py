"""Speech-to-mesh models: an audio encoder feeding a motion decoder.

Where it sits: the model of the `audio2mesh` task (`fdjax/tasks/audio2mesh.py`). A normalised
waveform `audio [B, S]` goes through a wav2vec2/HuBERT encoder (`fdjax.models.wav2vec2`) whose
features are aligned to the mesh frame rate (interpolated for VOCASET, 2 audio frames per frame
for BIWI), then through one of the decoders of `fdjax.models.motion_decoders` /
`fdjax.models.codetalker`, which output `vertices [B, T, V, 3]` = template + offsets.

    SpeechToMesh(encoder=Wav2Vec2Encoder(...), decoder=FaceFormerDecoder(...), ...)

`__call__` is the training pass (teacher-forced for the autoregressive decoder); `generate` is
prediction from audio alone, for any audio length. Parameters live under `encoder/` and
`decoder/` (the CodeTalker prior under `decoder/prior/`), so configs freeze parts by regex, e.g.
`optim.freeze=("encoder/feature_extractor",)`.

With a causal encoder (`Wav2Vec2Encoder(causal=True, attention_window=W)`) no frame depends on
later audio. When the decoder reads one audio feature per mesh frame (VOCASET), the encoder's
`fps` (and `sample_rate`) equal the model's: the conv features are resampled causally to the
mesh frame rate before the transformer (`wav2vec2.resample_causal`), which then runs at the mesh
frame rate, as FaceFormer's interpolation does offline. With `fps=0` (BIWI: two audio frames
per mesh frame) the transformer runs at the audio frame rate and its frames are aligned to mesh
frames afterwards by the causal rule of `align_causal`. With a
`FaceFormerDecoder(cache_window=K)` the model can then stream:
`stream_init` makes the state of new streams and `stream_step` turns the next fixed chunk of
audio into the next frames (`fdjax/streaming.py` has the chunk rules and the state layout).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models.codetalker import MotionVQVAE
from fdjax.models.wav2vec2 import Wav2Vec2Encoder, align_causal, causal_frame_indices

Array = jax.Array


def frames_in(num_samples: Any, sample_rate: int, fps: float) -> Any:
  """Whole mesh frames in `num_samples` audio samples (frame t: [t*sr/fps, (t+1)*sr/fps)).

  Integer arithmetic when `fps` is integral, so it also works on symbolic (export) sizes.
  """
  if float(fps).is_integer():
    return num_samples * int(fps) // sample_rate
  return int(num_samples * fps // sample_rate)


class SpeechToMesh(nn.Module):
  """Audio encoder + motion decoder. Batch keys follow docs/design.md section 3."""

  encoder: Wav2Vec2Encoder  # audio [B, S] -> features [B, T_a, D]
  decoder: nn.Module  # FaceFormerDecoder, NonAutoregressiveDecoder or CodePredictor
  sample_rate: int = 16000  # audio samples per second
  fps: float = 30.0  # mesh frames per second

  def __call__(
    self,
    batch: dict[str, Array],
    train: bool = False,
    truth_probability: Array | float | None = None,
  ) -> tuple[Array, dict]:
    """Training pass. Returns `vertices [B, T, V, 3]` and aux with the decoder's intermediates.

    `truth_probability`: scheduled sampling's chance of feeding the true previous frame (a
    `FaceFormerDecoder(training="scheduled_sampling")` only).
    """
    vertices = batch["vertices"]
    num_frames = vertices.shape[1]
    features = self._encode(
      batch["audio"], batch.get("audio_mask"), train, num_frames, batch.get("frame_mask")
    )  # [B, T * r, D]
    extra = {} if truth_probability is None else {"truth_probability": truth_probability}
    predicted, aux = self.decoder(
      features,
      batch["template"],
      batch.get("subject"),
      vertices,
      emotion=batch.get("emotion"),
      intensity=batch.get("intensity"),
      frame_mask=batch.get("frame_mask"),
      train=train,
      **extra,
    )
    return predicted, {**aux, "audio_features": features}

  def generate(
    self,
    audio: Array,
    template: Array,
    style: Array | None,
    *,
    audio_mask: Array | None = None,
    frame_mask: Array | None = None,
    emotion: Array | None = None,
    intensity: Array | None = None,
    num_frames: int | None = None,
    **sampling: Any,
  ) -> tuple[Array, dict]:
    """Predicts `vertices [B, T, V, 3]` from `audio [B, S]`; T defaults to the audio's span.

    For padded batches pass both masks: `audio_mask [B, S]` and `frame_mask [B, T]`, so each
    example's valid audio is aligned to its own valid frames, not stretched over the padding,
    and the decoder's valid frames never attend to padded ones (padded frames predict the
    template). `sampling` goes to a diffusion decoder's `generate` (`seed`,
    `guidance_scales`); the audio is encoded once, before its sampling loop.
    """
    if frame_mask is not None:
      num_frames = frame_mask.shape[1]
    elif num_frames is None:
      num_frames = frames_in(audio.shape[1], self.sample_rate, self.fps)
    features = self._encode(audio, audio_mask, False, num_frames, frame_mask)
    return self.decoder.generate(
      features,
      template,
      style,
      emotion=emotion,
      intensity=intensity,
      num_frames=num_frames,
      frame_mask=frame_mask,
      **sampling,
    )

  def _encode(self, audio, audio_mask, train, num_frames, frame_mask) -> Array:
    """Audio features aligned to the mesh frames: [B, T * r, D]."""
    if not self.encoder.causal or self._resamples():
      features, _ = self.encoder(
        audio, audio_mask, train, num_frames=num_frames, frame_mask=frame_mask
      )
      return features
    # At the audio frame rate, then each mesh frame reads the audio frames that end last before
    # it does; padded audio frames only reach padded mesh frames, which the frame mask drops.
    features, _ = self.encoder(audio, audio_mask, train)  # [B, T_a, D]
    return align_causal(
      features,
      num_frames,
      sample_rate=self.sample_rate,
      fps=self.fps,
      hop=self.encoder.hop,
      frames_per_frame=self._audio_frames_per_frame(),
    )

  def _audio_frames_per_frame(self) -> int:
    return getattr(self.decoder, "audio_frames_per_frame", 1)

  def _resamples(self) -> bool:
    """Whether the causal encoder resamples to the mesh frame rate (its `fps` set), checked
    against this model's rates and the decoder's one audio feature per frame."""
    encoder = self.encoder
    if not encoder.fps:
      return False
    ratio = self._audio_frames_per_frame()
    if encoder.fps != self.fps or encoder.sample_rate != self.sample_rate or ratio != 1:
      raise ValueError(
        f"the encoder resamples to fps={encoder.fps:g} at sample_rate={encoder.sample_rate}, "
        f"but the model has fps={self.fps:g}, sample_rate={self.sample_rate} and a decoder "
        f"reading {ratio} audio frames per mesh frame; set the encoder's fps and sample_rate to "
        "the model's (one audio frame per mesh frame), or fps=0"
      )
    return True

  def stream_chunk_frames(self, chunk_samples: int) -> int:
    """Mesh frames F in a stream chunk of `chunk_samples` samples.

    Raises a clear error unless the model streams (causal encoder, frame-by-frame decoder) and
    the chunk is exact: whole mesh frames and whole audio frames, with mesh frames no shorter
    than the `audio_frames_per_frame` audio frames each reads.
    """
    self._check_streamable()
    self._resamples()
    fps, hop, rate = int(self.fps), self.encoder.hop, self.sample_rate
    frames, remainder = divmod(chunk_samples * fps, rate)
    if remainder or chunk_samples % hop or frames < 1:
      step = math.lcm(hop, rate // math.gcd(rate, fps))
      raise ValueError(
        f"a stream chunk of {chunk_samples} samples is not a whole number of mesh frames "
        f"({rate}/{fps} samples each) and of audio frames ({hop} samples each); use a "
        f"multiple of {step} samples"
      )
    return frames

  def _check_streamable(self) -> None:
    if not self.encoder.causal or not hasattr(self.decoder, "stream"):
      raise ValueError(
        "streaming needs a causal encoder (causal=True) and a decoder that predicts frame by "
        f"frame (FaceFormerDecoder); this model has causal={self.encoder.causal} and a "
        f"{type(self.decoder).__name__}"
      )
    if not float(self.fps).is_integer():
      raise ValueError(f"streaming needs an integral fps, got {self.fps}")
    ratio = self._audio_frames_per_frame()
    if self.sample_rate // (int(self.fps) * self.encoder.hop) < ratio:
      raise ValueError(
        f"mesh frames at {self.fps:g} fps end before the {ratio} audio frames of "
        f"{self.encoder.hop} samples they read do: the causal alignment would look ahead"
      )

  def stream_init(
    self,
    template: Array,
    style: Array | None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
  ) -> dict[str, Array]:
    """The state of new streams from `template [B, V, 3]` and `style [B]` int32 (and emotion,
    intensity when the decoder uses them); `fdjax/streaming.py` documents the layout."""
    self._check_streamable()
    encoder = self.encoder.initial_stream_state(template.shape[0])
    decoder = self.decoder.stream_init(template, style, emotion=emotion, intensity=intensity)
    state = {f"encoder_{k}": v for k, v in encoder.items() if k in ("keys", "values", "valid")}
    state.update(
      audio_context=encoder["audio_context"], position_context=encoder["position_context"]
    )
    state.update(
      {f"decoder_{k}": v for k, v in decoder.items() if k in ("keys", "values", "valid")}
    )
    state.update({k: v for k, v in decoder.items() if k not in ("keys", "values", "valid")})
    return state

  def stream_step(self, state: dict[str, Array], audio: Array) -> tuple[dict[str, Array], Array]:
    """The next chunk of every stream.

    Args:
      state: from `stream_init` or the previous step.
      audio: `[B, S]` the next S samples (S fixed; see `stream_chunk_frames`).

    Returns:
      The updated state and `vertices [B, F, V, 3]`: after c chunks, frames `c * F` to
      `c * F + F - 1` of `generate` over the whole audio.
    """
    num_frames = self.stream_chunk_frames(audio.shape[1])
    encoder_state = {k: state[f"encoder_{k}"] for k in ("keys", "values", "valid")}
    encoder_state.update(
      audio_context=state["audio_context"], position_context=state["position_context"]
    )
    # [B, F, D] when the encoder resamples to the mesh frame rate, else [B, A, D]
    features, aux = self.encoder(audio, stream_state=encoder_state)
    if not self._resamples():
      # The chunk starts on a mesh frame and on an audio frame boundary, so within it the causal
      # rule is the whole stream's rule shifted by the chunk's first audio frame.
      indices = causal_frame_indices(
        num_frames, self.sample_rate, self.fps, self.encoder.hop, self._audio_frames_per_frame()
      )
      features = jnp.take(features, indices.reshape(-1), axis=1)  # [B, F * r, D]
    decoder_state = {k: state[f"decoder_{k}"] for k in ("keys", "values", "valid")}
    decoder_state.update({k: state[k] for k in ("motion_input", "condition", "template", "phase")})
    vertices, decoder_state = self.decoder.stream(features, decoder_state)
    encoder_state = aux["stream_state"]
    new_state = {}
    for key in state:
      if key.startswith("encoder_"):
        new_state[key] = encoder_state[key.removeprefix("encoder_")]
      elif key.startswith("decoder_"):
        new_state[key] = decoder_state[key.removeprefix("decoder_")]
      elif key in encoder_state:
        new_state[key] = encoder_state[key]
      else:
        new_state[key] = decoder_state[key]
    return new_state, vertices


class MotionAutoencoder(nn.Module):
  """Stage 1 of CodeTalker as a task model: the VQ-VAE over motion, no audio."""

  prior: MotionVQVAE  # the VQ-VAE; its parameters live under "prior/"

  def __call__(self, batch: dict[str, Array], train: bool = False) -> tuple[Array, dict]:
    return self.prior(batch["vertices"], batch["template"], batch.get("frame_mask"), train=train)

  def generate(self, vertices: Array, template: Array) -> tuple[Array, dict]:
    return self.prior(vertices, template, None, train=False)
