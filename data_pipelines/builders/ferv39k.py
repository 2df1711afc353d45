"""TFDS builder for FERV39k: 38,935 face-cropped clips from 22 scenes, 7 classes.

Reads from the raw directory:

    2_ClipsforFaceCrop/<Scene>/<Emotion>/<clip>/<frame>.jpg
    4_setups/All_scenes/{train_All,test_All}.csv   lines `<Scene>/<Emotion>/<clip> <Emotion>`

Splits: `train`, `test` (the all-scenes setup). Emotion words map to the 0-based `label` in
`CLASS_NAMES` order: Happy 0, Sad 1, Neutral 2, Angry 3, Surprise 4, Disgust 5, Fear 6 (the
order the common FERV39k list files use).

Features:
  video          [T, S, S, 3] uint8  T = min(frames in the clip, max_frames), S = frame_size
  label          int (ClassLabel, 7 classes)
  num_frames     int32               frames in the raw clip
  frame_indices  [T] int32           which raw frames were kept
  subject        text                the scene (FERV39k carries no identities)
  key            text                `<Scene>/<Emotion>/<clip>`
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import _video
from data_pipelines.builders.common import InvalidExample

CLASS_NAMES = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")


@dataclasses.dataclass(frozen=True)
class Clip:
  """One annotated clip."""

  path: str  # the frame folder
  key: str  # `<Scene>/<Emotion>/<clip>`
  word: str  # the label word as written
  annotation: str  # `file:line`, for error messages


def read_splits(raw_dir: str) -> dict[str, list[Clip]]:
  """The all-scenes train and test splits."""
  splits = {}
  for part in ("train", "test"):
    path = os.path.join(raw_dir, "4_setups", "All_scenes", f"{part}_All.csv")
    clips = []
    for n, line in enumerate(_video.read_lines(path), start=1):
      fields = line.replace(",", " ").split()
      if len(fields) != 2:
        raise ValueError(f"{path}:{n}: expected '<Scene>/<Emotion>/<clip> <Emotion>', got {line!r}")
      relative, word = fields
      folder = os.path.join(raw_dir, "2_ClipsforFaceCrop", *relative.split("/"))
      clips.append(Clip(folder, relative, word, f"{path}:{n}"))
    splits[part] = clips
  return splits


class Ferv39k(_video.VideoBuilder):
  """FERV39k clips with their class, one train/test split."""

  name = "ferv39k"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request FERV39k from its authors, unpack it and pass the directory that holds "
    "2_ClipsforFaceCrop/ and 4_setups/."
  )

  def features_dict(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {
        "video": self.video_feature(),
        "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
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
          "subject": clip.key.split("/")[0],
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
  """Builds FERV39k from `raw_dir` into `data_dir`; returns `{split: num_examples}`."""
  return _video.build_dataset(
    Ferv39k, raw_dir, data_dir, skip_invalid, frame_size=frame_size, max_frames=max_frames
  )


def inspect(data_dir: str, out_png: str | None = None, config: str | None = None) -> dict:
  """Counts, shapes, label histograms and a contact sheet of a built FERV39k."""
  return _video.inspect_dataset("ferv39k", data_dir, out_png, config, class_names=CLASS_NAMES)
