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

from data_pipelines.builders import _video

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


class Ferv39k(_video.ClipBuilder):
  """FERV39k clips with their class, one train/test split."""

  name = "ferv39k"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request FERV39k from its authors, unpack it and pass the directory that holds "
    "2_ClipsforFaceCrop/ and 4_setups/."
  )
  CLASS_NAMES = CLASS_NAMES

  def clip_splits(self, raw_dir: str) -> dict[str, list[Clip]]:
    return read_splits(raw_dir)

  def clip_label(self, clip: Clip) -> int:
    return _video.word_label(clip.word, CLASS_NAMES, clip.key, clip.annotation)

  def clip_fields(self, clip: Clip, num_frames: int) -> dict:
    return {"subject": clip.key.split("/")[0]}


build = Ferv39k.build_from_raw
inspect = Ferv39k.inspect_built
