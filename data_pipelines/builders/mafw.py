"""TFDS builder for MAFW: 10,045 clips; the single-expression set has 11 classes, 5 folds.

Reads from the raw directory:

    data/clips/<00001>.mp4 ...
    Train & Test Set/single/no_caption/set_<k>/{train,test}.txt   lines `<clip>.mp4 <word>`

Splits: `fold1_train`, `fold1_test`, ..., `fold5_test`. Label words map to the 0-based
`label` in MAFW's order (`CLASS_NAMES`): anger 0, disgust 1, fear 2, happiness 3, neutral 4,
sadness 5, surprise 6, contempt 7, anxiety 8, helplessness 9, disappointment 10 (MAFW's own
1-11 numbering minus one).

Clips are whole frames; each is cropped to the centred square of its shorter side before
resizing (MAFW faces sit near the middle of the frame).

Features:
  video          [T, S, S, 3] uint8  T = min(frames in the clip, max_frames), S = frame_size
  label          int (ClassLabel, 11 classes)
  num_frames     int32               frames in the raw clip
  frame_indices  [T] int32           which raw frames were kept
  fps            float32             the clip's frame rate
  subject        text                the clip name (MAFW carries no identities)
  key            text                the clip name without extension, e.g. "00001"
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import _video
from data_pipelines.ops import video as video_ops

CLASS_NAMES = (
  "anger",
  "disgust",
  "fear",
  "happiness",
  "neutral",
  "sadness",
  "surprise",
  "contempt",
  "anxiety",
  "helplessness",
  "disappointment",
)
NUM_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class Clip:
  """One annotated clip."""

  path: str  # the video file
  key: str
  word: str  # the label word as written
  annotation: str  # `file:line`, for error messages


def read_splits(raw_dir: str) -> dict[str, list[Clip]]:
  """The 5-fold single-expression splits."""
  splits = {}
  for k in range(1, NUM_FOLDS + 1):
    set_dir = os.path.join(raw_dir, "Train & Test Set", "single", "no_caption", f"set_{k}")
    for part in ("train", "test"):
      path = os.path.join(set_dir, f"{part}.txt")
      clips = []
      for n, line in enumerate(_video.read_lines(path), start=1):
        fields = line.split()
        if len(fields) != 2:
          raise ValueError(f"{path}:{n}: expected '<clip>.mp4 <label>', got {line!r}")
        name, word = fields
        video = os.path.join(raw_dir, "data", "clips", name)
        clips.append(Clip(video, os.path.splitext(name)[0], word, f"{path}:{n}"))
      splits[f"fold{k}_{part}"] = clips
  return splits


class Mafw(_video.ClipBuilder):
  """MAFW single-expression clips with their class, 5 folds."""

  name = "mafw"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://github.com/MAFW-database/MAFW"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request MAFW from its authors, unpack it and pass the directory that holds data/clips/ "
    "and 'Train & Test Set/'."
  )
  CLASS_NAMES = CLASS_NAMES

  def clip_splits(self, raw_dir: str) -> dict[str, list[Clip]]:
    return read_splits(raw_dir)

  def clip_label(self, clip: Clip) -> int:
    return _video.word_label(clip.word, CLASS_NAMES, clip.key, clip.annotation)

  def extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {"fps": tfds.features.Scalar(dtype=np.float32)}

  def clip_fields(self, clip: Clip, num_frames: int) -> dict:
    return {"fps": video_ops.video_fps(clip.path), "subject": clip.key}


build = Mafw.build_from_raw
inspect = Mafw.inspect_built
