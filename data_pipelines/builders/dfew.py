"""TFDS builder for DFEW: 16,372 movie clips, 7 expression classes, 5-fold cross-validation.

Reads the official single-label release from the raw directory:

    Clip/clip_224x224/<00001>/<00001>_<00001>.jpg ...   face-cropped frames (preferred), or
    Clip/original/<00001>.mp4 (or .avi)                    the clip as a video file
    EmoLabel_DataSplit/{train,test}(single-labeled)/set_<k>.csv   `video_name,label`

or, when the official split CSVs are absent, list files `annotation/set_<k>_{train,test}.txt`
with lines `path num_frames label` (path relative to the raw directory or absolute).

Splits: `fold1_train`, `fold1_test`, ..., `fold5_test`. Labels in the files are 1-7
(1 Happy, 2 Sad, 3 Neutral, 4 Angry, 5 Surprise, 6 Disgust, 7 Fear); the stored `label` is
0-based (file label - 1), names in `CLASS_NAMES`. Each clip is stored once per split it
belongs to (in one fold's test split and the other four folds' train splits).

Features:
  video          [T, S, S, 3] uint8  T = min(frames in the clip, max_frames), S = frame_size
  label          int (ClassLabel, 7 classes)
  num_frames     int32               frames in the raw clip
  frame_indices  [T] int32           which raw frames were kept
  subject        text                the clip number (DFEW carries no identities)
  key            text                the clip number, e.g. "00001"
"""

from __future__ import annotations

import csv
import dataclasses
import os

from data_pipelines.builders import _video
from data_pipelines.builders.common import InvalidExample

CLASS_NAMES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
NUM_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class Clip:
  """One annotated clip: where its frames are, and what the annotation says about it."""

  path: str  # frame folder or video file
  key: str
  label: str  # as written in the annotation (1-based)
  num_frames: int | None  # from list files; the official CSVs carry none
  annotation: str  # the annotation file, for error messages


def clip_path(raw_dir: str, number: int) -> str:
  """The frame folder of clip `number`, else its video file, else the (missing) folder."""
  folder = os.path.join(raw_dir, "Clip", "clip_224x224", f"{number:05d}")
  if os.path.isdir(folder):
    return folder
  for ext in (".mp4", ".avi"):
    video = os.path.join(raw_dir, "Clip", "original", f"{number:05d}{ext}")
    if os.path.isfile(video):
      return video
  return folder


def read_official_splits(raw_dir: str) -> dict[str, list[Clip]]:
  """Splits from `EmoLabel_DataSplit/{train,test}(single-labeled)/set_<k>.csv`."""
  splits = {}
  for k in range(1, NUM_FOLDS + 1):
    for part in ("train", "test"):
      path = os.path.join(raw_dir, "EmoLabel_DataSplit", f"{part}(single-labeled)", f"set_{k}.csv")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: DFEW split file not found")
      with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
      if rows and not {"video_name", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns video_name,label, got {list(rows[0])}")
      clips = []
      for row in rows:
        number = int(row["video_name"])
        clips.append(Clip(clip_path(raw_dir, number), f"{number:05d}", row["label"], None, path))
      splits[f"fold{k}_{part}"] = clips
  return splits


def read_list_splits(raw_dir: str) -> dict[str, list[Clip]]:
  """Splits from `annotation/set_<k>_{train,test}.txt` lines `path num_frames label`."""
  splits = {}
  for k in range(1, NUM_FOLDS + 1):
    for part in ("train", "test"):
      path = os.path.join(raw_dir, "annotation", f"set_{k}_{part}.txt")
      clips = []
      for n, line in enumerate(_video.read_lines(path), start=1):
        fields = line.split()
        if len(fields) != 3:
          raise ValueError(f"{path}:{n}: expected 'path num_frames label', got {line!r}")
        clip_dir, num_frames, label = fields
        full = clip_dir if os.path.isabs(clip_dir) else os.path.join(raw_dir, clip_dir)
        key = os.path.basename(os.path.normpath(clip_dir))
        clips.append(Clip(full, key, label, int(num_frames), f"{path}:{n}"))
      splits[f"fold{k}_{part}"] = clips
  return splits


def read_splits(raw_dir: str) -> dict[str, list[Clip]]:
  """The official split CSVs if present, else the list files."""
  if os.path.isdir(os.path.join(raw_dir, "EmoLabel_DataSplit")):
    return read_official_splits(raw_dir)
  if os.path.isdir(os.path.join(raw_dir, "annotation")):
    return read_list_splits(raw_dir)
  raise FileNotFoundError(
    f"{raw_dir}: no DFEW annotation (expected EmoLabel_DataSplit/ or annotation/)"
  )


def parse_label(clip: Clip, num_classes: int) -> int:
  """The 0-based label of `clip`, or `InvalidExample` naming the annotation file."""
  try:
    label = int(clip.label)
  except ValueError:
    raise InvalidExample(
      clip.annotation, f"label {clip.label!r} of clip {clip.key} is not an integer"
    ) from None
  _video.check_label(clip.annotation, label, num_classes, f"clip {clip.key}")
  return label - 1


class Dfew(_video.ClipBuilder):
  """DFEW clips with their expression class, 5 folds."""

  name = "dfew"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://dfew-dataset.github.io/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request DFEW from https://dfew-dataset.github.io/, unpack it and pass the directory "
    "that holds Clip/ and EmoLabel_DataSplit/."
  )
  CLASS_NAMES = CLASS_NAMES

  def clip_splits(self, raw_dir: str) -> dict[str, list[Clip]]:
    return read_splits(raw_dir)

  def clip_label(self, clip: Clip) -> int:
    return parse_label(clip, len(CLASS_NAMES))

  def clip_fields(self, clip: Clip, num_frames: int) -> dict:
    _video.check_frame_count(clip.path, clip.num_frames, num_frames, clip.annotation)
    return {"subject": clip.key}


build = Dfew.build_from_raw
inspect = Dfew.inspect_built
