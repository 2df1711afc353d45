"""Per-example transforms and batching for the speech-to-mesh family (VOCASET, BIWI).

They sit between a TFDS source of the builders in `data_pipelines/builders/` and the model, on
top of the generic plumbing in `data_pipelines/pipeline.py`:

    train:  train_dataset(source, partial(train_window, window_frames=..., fps=...), ...)
            (or whole sentences: partial(train_sequence, max_frames=...), batch_fn=eval_batch)
    eval:   eval_dataset(source, partial(whole_sequence, fps=...), batch_fn=eval_batch, ...)

Outputs follow docs/design.md section 3 (per example, before batching):

    audio       float32 [S]        normalised waveform (zero mean, unit variance per sentence)
    audio_mask  bool    [S]        real samples
    vertices    float32 [T, V, 3]  padded frames hold the template
    template    float32 [V, 3]
    frame_mask  bool    [T]        real frames
    subject     int32   []         training-speaker index, -1 for unseen speakers
    emotion, intensity  int32 []   where the dataset has them (MEAD)
    flame       dict               where the dataset has them: shape [S], expression [T, E],
                                   pose [T, 15], translation [T, 3] (zero on padded frames)

Frame `t` is aligned with samples `[ceil(t * sr / fps), ceil((t + 1) * sr / fps))`; a window of
`W` frames always carries `ceil(W * sr / fps)` samples, so cropped examples stack into batches.
The waveform is normalised over the whole sentence before any cropping, so a training window
sees the same values as the whole-sequence evaluation does. Text fields (key, subject_name) are
dropped: batches hold arrays only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import pipeline
from data_pipelines.ops import audio as audio_ops

# The per-frame arrays of a `flame` feature (docs/design.md section 3).
PER_FRAME_FLAME = ("expression", "pose", "translation")


def _labels(example: Mapping[str, Any], start: int, frames: int) -> dict[str, Any]:
  """What a dataset carries beyond the speech-mesh keys: `emotion`, `intensity` (scalars) and
  the head-model parameters `flame` (MEAD), its per-frame arrays cut to frames `[start, start +
  frames)` and zero-padded to `frames`."""
  out = {k: np.int32(example[k]) for k in ("emotion", "intensity") if k in example}
  if "flame" in example:
    out["flame"] = {"shape": np.asarray(example["flame"]["shape"], np.float32)}
    for key in PER_FRAME_FLAME:
      value = np.asarray(example["flame"][key], np.float32)[start : start + frames]
      out["flame"][key] = np.pad(value, ((0, frames - len(value)), (0, 0)))
  return out


def _audio(example: Mapping[str, Any], normalize_audio: bool) -> np.ndarray:
  audio = np.asarray(example["audio"], np.float32)  # [S]
  return audio_ops.normalize(audio) if normalize_audio else audio


def train_window(
  example: Mapping[str, Any],
  rng: np.random.Generator,
  *,
  window_frames: int,
  fps: float,
  sample_rate: int = 16000,
  normalize_audio: bool = True,
) -> dict[str, np.ndarray]:
  """A random window of `window_frames` frames and the audio under it.

  Sequences shorter than the window start at frame 0 and are padded: frames with the template
  (`frame_mask` False), audio with zeros (`audio_mask` False).

  Args:
    example: a builder example (audio [S], vertices [T, V, 3], template [V, 3], subject).
    rng: draws the window's start frame uniformly from every start that fits.
    window_frames: W, frames per window.
    fps, sample_rate: the dataset's frame rate and the stored audio's rate.
    normalize_audio: zero-mean/unit-variance over the sentence (wav2vec2-style encoders).

  Returns:
    audio [ceil(W * sr / fps)], audio_mask, vertices [W, V, 3], template, frame_mask [W], subject.
  """
  vertices = np.asarray(example["vertices"], np.float32)  # [T, V, 3]
  template = np.asarray(example["template"], np.float32)  # [V, 3]
  num_frames = vertices.shape[0]
  start = int(rng.integers(0, num_frames - window_frames + 1)) if num_frames > window_frames else 0
  piece = vertices[start : start + window_frames]
  window = np.broadcast_to(template, (window_frames, *template.shape)).copy()  # [W, V, 3]
  window[: piece.shape[0]] = piece
  frame_mask = np.arange(window_frames) < piece.shape[0]  # [W]
  audio, audio_mask = audio_ops.crop_or_pad(
    _audio(example, normalize_audio), start, window_frames, sample_rate, fps
  )
  return {
    "audio": audio,
    "audio_mask": audio_mask,
    "vertices": window,
    "template": template,
    "frame_mask": frame_mask,
    "subject": np.int32(example["subject"]),
    **_labels(example, start, window_frames),
  }


def train_sequence(
  example: Mapping[str, Any],
  rng: np.random.Generator,
  *,
  max_frames: int,
  fps: float,
  sample_rate: int = 16000,
  normalize_audio: bool = True,
) -> dict[str, np.ndarray]:
  """A whole training sentence (FaceFormer trains on whole sentences), or a random window of
  `max_frames` frames of a longer one; batch with `eval_batch`, which pads to the longest.

  Returns:
    `whole_sequence`'s keys for T = min(frames, max_frames) frames.
  """
  num_frames = np.asarray(example["vertices"]).shape[0]
  if num_frames <= max_frames:
    return whole_sequence(
      example, fps=fps, sample_rate=sample_rate, normalize_audio=normalize_audio
    )
  return train_window(
    example,
    rng,
    window_frames=max_frames,
    fps=fps,
    sample_rate=sample_rate,
    normalize_audio=normalize_audio,
  )


def whole_sequence(
  example: Mapping[str, Any],
  *,
  fps: float,
  sample_rate: int = 16000,
  normalize_audio: bool = True,
) -> dict[str, np.ndarray]:
  """The whole sentence, with its audio cut or zero-padded to exactly span its T frames.

  Returns:
    audio [ceil(T * sr / fps)], audio_mask, vertices [T, V, 3], template, frame_mask [T] (all
    True), subject.
  """
  vertices = np.asarray(example["vertices"], np.float32)  # [T, V, 3]
  num_frames = vertices.shape[0]
  audio, audio_mask = audio_ops.crop_or_pad(
    _audio(example, normalize_audio), 0, num_frames, sample_rate, fps
  )
  return {
    "audio": audio,
    "audio_mask": audio_mask,
    "vertices": vertices,
    "template": np.asarray(example["template"], np.float32),
    "frame_mask": np.ones((num_frames,), bool),
    "subject": np.int32(example["subject"]),
    **_labels(example, 0, num_frames),
  }


def eval_batch(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Collates `whole_sequence` outputs of different lengths, padding to the longest.

  Audio is padded with zeros and vertices with each example's template; `audio_mask` and
  `frame_mask` are False on padding and keep whatever the examples already masked.

  Returns:
    audio [B, S_max], audio_mask [B, S_max], vertices [B, T_max, V, 3], template [B, V, 3],
    frame_mask [B, T_max], subject [B].
  """
  masks = ("audio_mask", "frame_mask")
  batch = pipeline.pad_to_longest(
    [{k: v for k, v in e.items() if k not in (*masks, "flame")} for e in examples],
    {"audio": "audio_mask", "vertices": "frame_mask"},
  )
  if "flame" in examples[0]:
    frames = batch["vertices"].shape[1]
    batch["flame"] = {"shape": np.stack([e["flame"]["shape"] for e in examples])}
    for key in PER_FRAME_FLAME:
      values = [e["flame"][key] for e in examples]
      batch["flame"][key] = np.stack([np.pad(v, ((0, frames - len(v)), (0, 0))) for v in values])
  for key in masks:
    for i, example in enumerate(examples):
      own = np.asarray(example[key], bool)
      batch[key][i, : own.shape[0]] &= own
  padding = ~batch["frame_mask"]  # [B, T_max]
  batch["vertices"][padding] = np.broadcast_to(batch["template"][:, None], batch["vertices"].shape)[
    padding
  ]
  return batch
