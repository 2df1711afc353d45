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

import numpy as np
import tensorflow_datasets as tfds

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


class Dfew(_video.VideoBuilder):
  """DFEW clips with their expression class, 5 folds."""

  name = "dfew"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://dfew-dataset.github.io/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request DFEW from https://dfew-dataset.github.io/, unpack it and pass the directory "
    "that holds Clip/ and EmoLabel_DataSplit/."
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
    label = parse_label(clip, len(CLASS_NAMES))
    video, num_frames, indices = self.load_clip(clip.path)
    _video.check_frame_count(clip.path, clip.num_frames, num_frames, clip.annotation)
    return [
      (
        clip.key,
        {
          "video": video,
          "label": label,
          "num_frames": num_frames,
          "frame_indices": indices,
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
  """Builds DFEW from `raw_dir` into `data_dir`; returns `{split: num_examples}`."""
  return _video.build_dataset(
    Dfew, raw_dir, data_dir, skip_invalid, frame_size=frame_size, max_frames=max_frames
  )


def inspect(data_dir: str, out_png: str | None = None, config: str | None = None) -> dict:
  """Counts, shapes, label histograms and a contact sheet of a built DFEW."""
  return _video.inspect_dataset("dfew", data_dir, out_png, config, class_names=CLASS_NAMES)
