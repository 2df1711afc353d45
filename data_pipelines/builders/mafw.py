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
from data_pipelines.builders.common import InvalidExample
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


class Mafw(_video.VideoBuilder):
  """MAFW single-expression clips with their class, 5 folds."""

  name = "mafw"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://github.com/MAFW-database/MAFW"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request MAFW from its authors, unpack it and pass the directory that holds data/clips/ "
    "and 'Train & Test Set/'."
  )

  def features_dict(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {
        "video": self.video_feature(),
        "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "subject": tfds.features.Text(),
        "key": tfds.features.Text(),
      }
    )

  def _split_generators(self, dl_manager):
    splits = read_splits(os.fspath(dl_manager.manual_dir))
    return {name: self._generate_examples(name, clips) for name, clips in splits.items()}

  def _generate_examples(self, split: str, clips: list[Clip]):
    yield from self.validated_examples(split, clips, self._load)

  def _load(self, clip: Clip) -> list[tuple[str, dict]]:
    if clip.word not in CLASS_NAMES:
      raise InvalidExample(
        clip.annotation, f"label {clip.word!r} of clip {clip.key} is not one of {CLASS_NAMES}"
      )
    video, num_frames, indices = self.load_clip(clip.path)
    return [
      (
        clip.key,
        {
          "video": video,
          "label": CLASS_NAMES.index(clip.word),
          "num_frames": num_frames,
          "frame_indices": indices,
          "fps": video_ops.video_fps(clip.path),
          "subject": clip.key,
          "key": clip.key,
        },
      )
    ]


def build(
  raw_dir: str,
  data_dir: str,
  skip_invalid: bool = False,
  *,
  frame_size: int = _video.DEFAULT_FRAME_SIZE,
  max_frames: int = _video.DEFAULT_MAX_FRAMES,
) -> dict[str, int]:
  """Builds MAFW from `raw_dir` into `data_dir`; returns `{split: num_examples}`."""
  return _video.build_dataset(
    Mafw, raw_dir, data_dir, skip_invalid, frame_size=frame_size, max_frames=max_frames
  )


def inspect(data_dir: str, out_png: str | None = None, config: str | None = None) -> dict:
  """Counts, shapes, label histograms and a contact sheet of a built MAFW."""
  return _video.inspect_dataset("mafw", data_dir, out_png, config, class_names=CLASS_NAMES)
