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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from fdjax.models.codetalker import MotionVQVAE
from fdjax.models.wav2vec2 import Wav2Vec2Encoder

Array = jax.Array


def frames_in(num_samples: Any, sample_rate: int, fps: float) -> Any:
  """Whole mesh frames in `num_samples` audio samples (frame t: [t*sr/fps, (t+1)*sr/fps)).

  Integer arithmetic when `fps` is integral, so it also works on symbolic (export) sizes.
  """
  if float(fps).is_integer():
    return num_samples * int(fps) // sample_rate
  return int(num_samples * fps // sample_rate)


class SpeechToMesh(nn.Module):
  """Audio encoder + motion decoder. Batch keys follow DESIGN section 3."""

  encoder: Wav2Vec2Encoder  # audio [B, S] -> features [B, T_a, D]
  decoder: nn.Module  # FaceFormerDecoder, NonAutoregressiveDecoder or CodePredictor
  sample_rate: int = 16000  # audio samples per second
  fps: float = 30.0  # mesh frames per second

  def __call__(self, batch: dict[str, Array], train: bool = False) -> tuple[Array, dict]:
    """Training pass. Returns `vertices [B, T, V, 3]` and aux with the decoder's intermediates."""
    vertices = batch["vertices"]
    num_frames = vertices.shape[1]
    features, _ = self.encoder(
      batch["audio"],
      batch.get("audio_mask"),
      train,
      num_frames=num_frames,
      frame_mask=batch.get("frame_mask"),
    )  # [B, T * r, D]
    predicted, aux = self.decoder(
      features,
      batch["template"],
      batch.get("subject"),
      vertices,
      emotion=batch.get("emotion"),
      intensity=batch.get("intensity"),
      frame_mask=batch.get("frame_mask"),
      train=train,
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
  ) -> tuple[Array, dict]:
    """Predicts `vertices [B, T, V, 3]` from `audio [B, S]`; T defaults to the audio's span.

    For padded batches pass both masks: `audio_mask [B, S]` and `frame_mask [B, T]`, so each
    example's valid audio is aligned to its own valid frames, not stretched over the padding.
    """
    if frame_mask is not None:
      num_frames = frame_mask.shape[1]
    elif num_frames is None:
      num_frames = frames_in(audio.shape[1], self.sample_rate, self.fps)
    features, _ = self.encoder(
      audio, audio_mask, False, num_frames=num_frames, frame_mask=frame_mask
    )
    return self.decoder.generate(
      features,
      template,
      style,
      emotion=emotion,
      intensity=intensity,
      num_frames=num_frames,
    )


class MotionAutoencoder(nn.Module):
  """Stage 1 of CodeTalker as a task model: the VQ-VAE over motion, no audio."""

  prior: MotionVQVAE  # the VQ-VAE; its parameters live under "prior/"

  def __call__(self, batch: dict[str, Array], train: bool = False) -> tuple[Array, dict]:
    return self.prior(batch["vertices"], batch["template"], batch.get("frame_mask"), train=train)

  def generate(self, vertices: Array, template: Array) -> tuple[Array, dict]:
    return self.prior(vertices, template, None, train=False)
