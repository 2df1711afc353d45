"""Lip-sync metrics: LSE-D and LSE-C from SyncNet embeddings, as Wav2Lip's evaluation computes
them (its `SyncNetInstance_calc_scores.py`, built on syncnet_python).

Where it sits: the talking-head evaluation (docs/design.md section 5) scores a generated clip's
audio-visual sync with `fdjax.models.syncnet` loaded from a local checkpoint. The steps:

1. MFCC of the 16 kHz audio at the int16 scale the reference reads from its WAV file (13
   coefficients every 10 ms, python_speech_features' defaults: 25 ms rectangular frames,
   pre-emphasis 0.97, 512-point FFT, 26 mel filters, lifter 22, log frame energy first).
2. For every video frame `i` with 5 frames left (25 fps): the video embedding of frames
   `i..i+4` (224x224 face crops, BGR, 0..255) and the audio embedding of MFCC steps
   `4i..4i+19`; frames beyond `min(T, audio samples // 640)` are dropped.
3. `sync_distances`: for each frame `i` and shift `s` in `-vshift..vshift` (15 for LSE) the
   distance `|v_i - a_{i+s} + 1e-6|` (torch's `pairwise_distance`), audio embeddings past the
   ends being zeros.
4. `sync_scores`: the mean over frames of each shift's distance; LSE-D = its minimum; LSE-C =
   its median minus its minimum; offset = vshift - argmin (positive: the audio leads the video
   by that many frames), as syncnet_python reports it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from fdjax.metrics.video import resize_bilinear
from fdjax.models.syncnet import FRAME_SIZE, MFCC_STEPS, VIDEO_FRAMES

Array = jax.Array

SAMPLE_RATE = 16000
FPS = 25
LSE_VSHIFT = 15
_MFCC_STEPS_PER_FRAME = 4  # 100 Hz MFCC over 25 fps video
_INT16_SCALE = 32768.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(num_filters: int, fft_size: int, sample_rate: int) -> np.ndarray:
  """[num_filters, fft_size // 2 + 1] triangular filters on FFT bins floored from mel points."""
  mel = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_filters + 2)
  bins = np.floor((fft_size + 1) * _mel_to_hz(mel) / sample_rate)
  bank = np.zeros((num_filters, fft_size // 2 + 1))
  k = np.arange(fft_size // 2 + 1)
  for j in range(num_filters):
    low, centre, high = bins[j], bins[j + 1], bins[j + 2]
    rising = (k >= low) & (k < centre)
    falling = (k >= centre) & (k < high)
    bank[j, rising] = (k[rising] - low) / (centre - low)
    bank[j, falling] = (high - k[falling]) / (high - centre)
  return bank


def mfcc(
  signal: Any,
  sample_rate: int = SAMPLE_RATE,
  num_cepstra: int = 13,
  num_filters: int = 26,
  fft_size: int = 512,
  window_seconds: float = 0.025,
  step_seconds: float = 0.01,
  preemphasis: float = 0.97,
  lifter: int = 22,
) -> np.ndarray:
  """[N] samples -> [steps, num_cepstra] MFCC, python_speech_features' `mfcc` (see module)."""
  signal = np.asarray(signal, np.float64)
  if signal.ndim != 1 or len(signal) == 0:
    raise ValueError(f"MFCC needs a non-empty mono signal [N], got shape {signal.shape}")
  signal = np.append(signal[0], signal[1:] - preemphasis * signal[:-1])
  # lengths rounded half up, as the reference does
  frame_length = int(np.floor(window_seconds * sample_rate + 0.5))
  step = int(np.floor(step_seconds * sample_rate + 0.5))
  if len(signal) <= frame_length:
    num_frames = 1
  else:
    num_frames = 1 + int(np.ceil((len(signal) - frame_length) / step))
  padded = np.zeros((num_frames - 1) * step + frame_length)
  padded[: len(signal)] = signal
  frames = padded[np.arange(num_frames)[:, None] * step + np.arange(frame_length)]
  power = np.square(np.abs(np.fft.rfft(frames, fft_size))) / fft_size  # [steps, F]
  tiny = np.finfo(float).eps
  energy = np.sum(power, axis=1)
  energy = np.where(energy == 0, tiny, energy)
  banks = power @ mel_filterbank(num_filters, fft_size, sample_rate).T
  banks = np.where(banks == 0, tiny, banks)
  cepstra = scipy.fft.dct(np.log(banks), type=2, axis=1, norm="ortho")[:, :num_cepstra]
  if lifter > 0:
    cepstra = cepstra * (1 + (lifter / 2.0) * np.sin(np.pi * np.arange(num_cepstra) / lifter))
  cepstra[:, 0] = np.log(energy)
  return cepstra


def _to_int16_scale(audio: np.ndarray) -> np.ndarray:
  """int16 samples as they are; float samples in [-1, 1] scaled to int16's range."""
  if np.issubdtype(audio.dtype, np.integer):
    return audio.astype(np.float64)
  return audio.astype(np.float64) * _INT16_SCALE


def syncnet_windows(frames: Any, audio: Any) -> tuple[np.ndarray, np.ndarray]:
  """The SyncNet inputs of a clip: (video windows [W, 5, 224, 224, 3] BGR float 0..255,
  MFCC windows [W, 13, 20]) for W = min(T, N // 640) - 5 start frames.

  `frames` [T, H, W, 3] RGB (uint8, or float in [0, 1]) at 25 fps, resized to 224x224 when they
  are not; `audio` [N] at 16 kHz (float in [-1, 1], or int16).
  """
  frames, audio = np.asarray(frames), np.asarray(audio)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
  if audio.ndim != 1:
    raise ValueError(f"audio must be mono [N] at {SAMPLE_RATE} Hz, got shape {audio.shape}")
  samples_per_frame = SAMPLE_RATE // FPS
  num_windows = min(len(frames), len(audio) // samples_per_frame) - VIDEO_FRAMES
  if num_windows < 1:
    raise ValueError(
      f"a clip of {len(frames)} frames and {len(audio)} samples is too short for SyncNet "
      f"(at least {VIDEO_FRAMES + 1} frames of {samples_per_frame} samples)"
    )
  pixels = frames.astype(np.float32) if frames.dtype == np.uint8 else frames * 255.0
  if pixels.shape[1:3] != (FRAME_SIZE, FRAME_SIZE):
    pixels = np.asarray(resize_bilinear(jnp.asarray(pixels, jnp.float32), FRAME_SIZE))
  pixels = pixels[..., ::-1].astype(np.float32)  # RGB -> BGR, as the reference reads with cv2
  cepstra = mfcc(_to_int16_scale(audio)).T.astype(np.float32)  # [13, steps]
  starts = np.arange(num_windows)
  video = pixels[starts[:, None] + np.arange(VIDEO_FRAMES)]
  steps = starts[:, None] * _MFCC_STEPS_PER_FRAME + np.arange(MFCC_STEPS)
  return video, np.moveaxis(cepstra[:, steps], 1, 0)


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(model: nn.Module, variables: Any, video: Array, cepstra: Array) -> tuple[Array, Array]:
  audio_embeddings, video_embeddings = model.apply(variables, cepstra, video)
  return video_embeddings, audio_embeddings


def syncnet_embeddings(
  model: nn.Module, variables: Any, frames: Any, audio: Any, batch_size: int = 20
) -> tuple[np.ndarray, np.ndarray]:
  """(video embeddings, audio embeddings), each [W, D], of a clip (see `syncnet_windows`)."""
  video, cepstra = syncnet_windows(frames, audio)
  with jax.default_matmul_precision("highest"):  # as the video metrics' networks
    pairs = [
      _embed(model, variables, video[i : i + batch_size], cepstra[i : i + batch_size])
      for i in range(0, len(video), batch_size)
    ]
  video_embeddings = np.concatenate([np.asarray(v) for v, _ in pairs])
  audio_embeddings = np.concatenate([np.asarray(a) for _, a in pairs])
  return video_embeddings, audio_embeddings


def sync_distances(
  video_embeddings: Any, audio_embeddings: Any, vshift: int = LSE_VSHIFT
) -> np.ndarray:
  """[W, 2 vshift + 1]: the distance of each video embedding to the audio embeddings shifted by
  -vshift..vshift frames (zeros past the ends), with torch `pairwise_distance`'s 1e-6."""
  video_embeddings = np.asarray(video_embeddings, np.float32)
  audio_embeddings = np.asarray(audio_embeddings, np.float32)
  if video_embeddings.shape != audio_embeddings.shape or video_embeddings.ndim != 2:
    raise ValueError(
      f"embeddings must be two [W, D] arrays of one shape, got {video_embeddings.shape} and "
      f"{audio_embeddings.shape}"
    )
  padded = np.pad(audio_embeddings, ((vshift, vshift), (0, 0)))
  window = np.arange(len(video_embeddings))[:, None] + np.arange(2 * vshift + 1)
  difference = video_embeddings[:, None, :] - padded[window] + np.float32(1e-6)
  return np.sqrt(np.sum(np.square(difference), axis=-1))


class SyncScores(NamedTuple):
  offset: int  # frames; positive: the audio leads the video
  min_distance: float  # LSE-D
  confidence: float  # LSE-C
  mean_distances: np.ndarray  # [2 vshift + 1], shift -vshift..vshift


def sync_scores(
  video_embeddings: Any, audio_embeddings: Any, vshift: int = LSE_VSHIFT
) -> SyncScores:
  """LSE-D, LSE-C and the offset from a clip's embeddings (see the module docstring)."""
  mean_distances = np.mean(sync_distances(video_embeddings, audio_embeddings, vshift), axis=0)
  best = int(np.argmin(mean_distances))
  minimum = float(mean_distances[best])
  return SyncScores(
    offset=vshift - best,
    min_distance=minimum,
    confidence=float(np.median(mean_distances)) - minimum,
    mean_distances=mean_distances,
  )


def lse(
  model: nn.Module, variables: Any, frames: Any, audio: Any, vshift: int = LSE_VSHIFT
) -> SyncScores:
  """LSE-D / LSE-C of one clip: [T, H, W, 3] RGB face crops at 25 fps, [N] audio at 16 kHz."""
  return sync_scores(*syncnet_embeddings(model, variables, frames, audio), vshift=vshift)
