"""Per-example audio ops: read, mono, resample, normalise, and cut windows aligned to frames.

Builders use `read_audio`, `to_mono` and `resample` to store every dataset's audio at one rate;
the audio-mesh transforms use `normalize` and `crop_or_pad` on each example. Everything here is
plain numpy on a mono waveform `[S]`.

Frames and samples are aligned as in docs/design.md section 3: frame `t` covers samples
`[t * sample_rate / fps, (t + 1) * sample_rate / fps)`, so its first sample is
`ceil(t * sample_rate / fps)`. The arithmetic is exact (fractions), so 16 kHz at 30 fps, where a
frame is 533 1/3 samples, never drifts over long sequences.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import scipy.signal
import soundfile


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """Reads a wav/flac (anything libsndfile decodes) as float32 mono in [-1, 1].

  Returns:
    `(audio, sample_rate)` with `audio` of shape [S].
  """
  audio, sample_rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
  return to_mono(audio), int(sample_rate)


def to_mono(audio: np.ndarray) -> np.ndarray:
  """[S] or [S, C] -> [S] float32, averaging the channels."""
  audio = np.asarray(audio)
  if np.issubdtype(audio.dtype, np.integer):
    # Integer PCM (e.g. int16 inside VOCASET's pickle) is scaled to [-1, 1) like soundfile does.
    audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max + 1)
  if audio.ndim == 2:
    audio = audio.mean(axis=1)
  elif audio.ndim != 1:
    raise ValueError(f"audio must be [S] or [S, C], got shape {audio.shape}")
  return audio.astype(np.float32, copy=False)


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
  """Polyphase resampling [S] -> [S * target_rate / source_rate] (rounded up), float32.

  Uses `scipy.signal.resample_poly` with the reduced up/down ratio (44.1 kHz -> 16 kHz is
  160/441), whose default Kaiser-windowed FIR filter removes what would alias.
  """
  if source_rate <= 0 or target_rate <= 0:
    raise ValueError(f"sample rates must be positive, got {source_rate} -> {target_rate}")
  audio = np.asarray(audio, dtype=np.float32)
  if source_rate == target_rate:
    return audio
  ratio = Fraction(int(target_rate), int(source_rate))
  out = scipy.signal.resample_poly(audio, ratio.numerator, ratio.denominator)
  return out.astype(np.float32, copy=False)


def normalize(audio: np.ndarray, eps: float = 1e-7) -> np.ndarray:
  """Zero mean, unit variance over the whole waveform, as wav2vec2's feature extractor does.

  `(x - mean) / sqrt(var + eps)`; silence stays (near) zero instead of blowing up.
  """
  audio = np.asarray(audio, dtype=np.float32)
  if audio.size == 0:
    return audio
  mean = audio.mean(dtype=np.float64)
  var = audio.var(dtype=np.float64)
  return ((audio - mean) / np.sqrt(var + eps)).astype(np.float32)


def frame_start_sample(frame: int, sample_rate: int, fps: float) -> int:
  """Index of the first audio sample of frame `frame`: `ceil(frame * sample_rate / fps)`."""
  return math.ceil(Fraction(int(frame) * int(sample_rate)) / Fraction(fps).limit_denominator(1000))


def window_samples(num_frames: int, sample_rate: int, fps: float) -> int:
  """Length in samples of a window of `num_frames` frames: `ceil(num_frames * sample_rate / fps)`.

  Fixed for a given window size, so cropped windows stack into batches; a window that starts
  between sample boundaries may take in one sample of the frame after it.
  """
  return frame_start_sample(num_frames, sample_rate, fps)


def crop_or_pad(
  audio: np.ndarray, start_frame: int, num_frames: int, sample_rate: int, fps: float
) -> tuple[np.ndarray, np.ndarray]:
  """The audio under frames `[start_frame, start_frame + num_frames)`, zero-padded past the end.

  Args:
    audio: [S] waveform.
    start_frame: first frame of the window (may lie past the end of the audio).
    num_frames: frames in the window.
    sample_rate, fps: the audio's rate and the frame rate it is aligned to.

  Returns:
    `(window, mask)`: [W] float32 and [W] bool (True where the window holds real audio), with
    `W = window_samples(num_frames, sample_rate, fps)`.
  """
  if start_frame < 0 or num_frames < 0:
    raise ValueError(f"start_frame and num_frames must be >= 0, got {start_frame}, {num_frames}")
  audio = np.asarray(audio, dtype=np.float32)
  length = window_samples(num_frames, sample_rate, fps)
  start = frame_start_sample(start_frame, sample_rate, fps)
  piece = audio[start : start + length]
  window = np.zeros((length,), np.float32)  # [W]
  mask = np.zeros((length,), bool)  # [W]
  window[: piece.shape[0]] = piece
  mask[: piece.shape[0]] = True
  return window, mask
