"""TFDS builder for BP4D-Spontaneous: 12 action units, 3 subject-exclusive folds.

Reads from the raw directory:

    BP4D-training/<subject>/<task>/<frame number>.jpg
    AUCoding/AU_OCC/<subject>_<task>.csv   header `0,1,...`; column 0 the frame number,
                                           column n AU n: 1 present, 0 absent, 9 not coded

Only coded frames are used, and a frame with 9 for any of the twelve AUs is dropped (the
usual protocol). Each task's remaining frames are cut at gaps into runs of consecutive frame
numbers, and each run into windows of at most `max_frames` frames; one window is one example.

Splits: `fold1_train`, `fold1_test`, `fold2_...`, `fold3_...`. Fold k tests on subject
partition k of `PARTS` (the partition of JAA-Net and ME-GraphAU, whose code numbers the
folds the other way round: their fold 1 tests on partition 3) and trains on the other two.

Features:
  video        [T, S, S, 3] uint8  T <= max_frames consecutive frames, S = frame_size
  aus          [12] float32        occurrence (0/1) of `AUS` at the window's centre frame
  frame_aus    [T, 12] float32     occurrence per frame
  num_frames   int32               T
  start_frame  int32               frame number of the first frame
  fps          float32             25 (BP4D's capture rate)
  subject      text                e.g. "F001"
  task         text                e.g. "T1"
  key          text                `<subject>_<task>_<start frame>`
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import _video
from data_pipelines.builders.common import InvalidExample, check_shape
from data_pipelines.ops import video as video_ops

AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
PARTS = (
  tuple("F001 M007 F018 F008 F002 M004 F010 F009 M012 M001 F016 M014 F023 M008".split()),
  tuple("M011 F003 M010 M002 F005 F022 M018 M017 F013 M016 F020 F011 M013 M005".split()),
  tuple("F007 F015 F006 F019 M006 M009 F012 M003 F004 F021 F017 M015 F014".split()),
)
FPS = 25.0
NOT_CODED = 9


@dataclasses.dataclass(frozen=True)
class Recording:
  """One subject doing one task: its frame folder and its occurrence coding."""

  path: str  # the occurrence CSV (what errors name first)
  frame_dir: str
  subject: str
  task: str


def read_sequences(raw_dir: str) -> list[Recording]:
  """Every coded sequence under `AUCoding/AU_OCC/`, in name order."""
  label_dir = os.path.join(raw_dir, "AUCoding", "AU_OCC")
  if not os.path.isdir(label_dir):
    raise FileNotFoundError(f"{label_dir}: BP4D occurrence coding not found")
  sequences = []
  for name in sorted(os.listdir(label_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() != ".csv" or "_" not in stem:
      continue
    subject, task = stem.split("_", 1)
    frame_dir = os.path.join(raw_dir, "BP4D-training", subject, task)
    sequences.append(Recording(os.path.join(label_dir, name), frame_dir, subject, task))
  return sequences


def read_occurrence(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`(frame numbers [N], codes [N, 12])` for `AUS` from one occurrence CSV (9 = not coded)."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f))
  if not rows:
    raise InvalidExample(path, "occurrence file is empty")
  header = [h.strip() for h in rows[0]]
  missing = [au for au in AUS if str(au) not in header]
  if "0" not in header or missing:
    raise InvalidExample(path, f"header lacks the frame column '0' or AU columns {missing}")
  columns = [header.index("0")] + [header.index(str(au)) for au in AUS]
  try:
    table = np.array([[int(float(row[c])) for c in columns] for row in rows[1:] if row], np.int64)
  except (ValueError, IndexError) as e:
    raise InvalidExample(path, f"unreadable occurrence row: {e}") from None
  if table.size == 0:
    raise InvalidExample(path, "occurrence file lists no frames")
  codes = table[:, 1:]
  bad = ~np.isin(codes, (0, 1, NOT_CODED))
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise InvalidExample(
      path, f"frame {table[row, 0]} has a code outside 0/1/9: {codes[row].tolist()}"
    )
  return table[:, 0], codes


class Bp4d(_video.ActionUnitBuilder):
  """BP4D frame windows with 12 AU occurrence labels, 3 subject-exclusive folds."""

  name = "bp4d"
  BUILDER_CONFIGS = _video.standard_configs(window=True)
  HOMEPAGE = "https://www.cs.binghamton.edu/~lijun/Research/3DFE/3DFE_Analysis.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request BP4D-Spontaneous from Binghamton University, unpack it and pass the directory "
    "that holds BP4D-training/ and AUCoding/."
  )
  AUS = AUS
  PARTS = PARTS

  def recording_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {"task": tfds.features.Text()}

  def list_recordings(self, raw_dir: str) -> list[Recording]:
    return read_sequences(raw_dir)

  def _load_sequence(self, sequence: Recording) -> dict[str, np.ndarray]:
    numbers, codes = read_occurrence(sequence.path)
    keep = ~(codes == NOT_CODED).any(axis=1)
    numbers, codes = numbers[keep], codes[keep]
    if not len(numbers):
      raise InvalidExample(sequence.path, "no frame has all twelve AUs coded")
    images = {}
    for path in video_ops.list_frame_files(sequence.frame_dir):
      stem = os.path.splitext(os.path.basename(path))[0]
      if stem.isdigit():
        images[int(stem)] = path
    missing = [int(n) for n in numbers if int(n) not in images]
    if missing:
      raise InvalidExample(
        sequence.path,
        f"{len(missing)} coded frame(s) have no image in {sequence.frame_dir} "
        f"(first: {missing[0]})",
      )
    config = self.video_config
    video = _video.read_square_frames(
      [images[int(n)] for n in numbers], config.frame_size, config.crop_fraction
    )
    check_shape(
      sequence.frame_dir, "video", video, (len(numbers), config.frame_size, config.frame_size, 3)
    )
    return {"video": video, "numbers": numbers, "occurrence": codes}

  def _load(self, sequence: Recording) -> list[tuple[str, dict]]:
    data = self.cached(sequence.path, lambda: self._load_sequence(sequence))
    return _video.window_examples(
      f"{sequence.subject}_{sequence.task}",
      data["video"],
      data["numbers"],
      data["occurrence"],
      self.video_config.max_frames,
      {"fps": FPS, "subject": sequence.subject, "task": sequence.task},
    )


build = Bp4d.build_from_raw
inspect = Bp4d.inspect_built
