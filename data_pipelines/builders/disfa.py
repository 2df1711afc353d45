"""TFDS builder for DISFA: 8 action units, 3 subject-exclusive folds.

Reads from the raw directory:

    Videos_LeftCamera/LeftVideo<subject>_comp.avi            one video per subject, 20 fps
    ActionUnit_Labels/<subject>/<subject>_au<n>.txt          lines `frame,intensity` (0-5)

The eight benchmark AUs are 1, 2, 4, 6, 9, 12, 25, 26; occurrence is intensity >= 2, the
standard threshold. The video and its label files must agree in length within one frame;
the shorter length is used. Each video is cut into windows of at most `max_frames`
consecutive frames; one window is one example.

Splits: `fold1_train`, `fold1_test`, `fold2_...`, `fold3_...`. Fold k tests on subject
partition k of `PARTS` (the partition of JAA-Net and ME-GraphAU, whose code numbers the
folds the other way round: their fold 1 tests on partition 3) and trains on the other two.

Features:
  video            [T, S, S, 3] uint8  T <= max_frames consecutive frames, S = frame_size
  aus              [8] float32         occurrence (0/1) of `AUS` at the window's centre frame
  frame_aus        [T, 8] float32      occurrence per frame
  frame_intensity  [T, 8] float32      intensity 0-5 per frame
  num_frames       int32               T
  start_frame      int32               1-based frame number of the first frame
  fps              float32             the video's frame rate (20 for DISFA)
  subject          text                e.g. "SN001"
  key              text                `<subject>_<start frame>`
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import _video
from data_pipelines.builders.common import InvalidExample
from data_pipelines.ops import video as video_ops

AUS = (1, 2, 4, 6, 9, 12, 25, 26)
OCCURRENCE_THRESHOLD = 2
PARTS = (
  tuple("SN002 SN010 SN001 SN026 SN027 SN032 SN030 SN009 SN016".split()),
  tuple("SN013 SN018 SN011 SN028 SN012 SN006 SN031 SN021 SN024".split()),
  tuple("SN003 SN029 SN023 SN025 SN008 SN005 SN007 SN017 SN004".split()),
)


@dataclasses.dataclass(frozen=True)
class Recording:
  """One subject's video and the folder of its AU label files."""

  path: str  # the video file
  label_dir: str
  subject: str


def read_recordings(raw_dir: str) -> list[Recording]:
  """Every left-camera video, in subject order."""
  video_dir = os.path.join(raw_dir, "Videos_LeftCamera")
  if not os.path.isdir(video_dir):
    raise FileNotFoundError(f"{video_dir}: DISFA left-camera videos not found")
  recordings = []
  for name in sorted(os.listdir(video_dir)):
    match = re.fullmatch(r"LeftVideo(SN\d+)_comp\.avi", name, flags=re.IGNORECASE)
    if match:
      subject = match.group(1).upper()
      label_dir = os.path.join(raw_dir, "ActionUnit_Labels", subject)
      recordings.append(Recording(os.path.join(video_dir, name), label_dir, subject))
  return recordings


def read_intensity(label_dir: str, subject: str) -> np.ndarray:
  """Intensities `[N, 8]` for `AUS`, from `<subject>_au<n>.txt` (1-based, consecutive frames)."""
  columns = []
  for au in AUS:
    path = os.path.join(label_dir, f"{subject}_au{au}.txt")
    lines = _video.read_lines(path) if os.path.isfile(path) else None
    if lines is None:
      raise InvalidExample(path, f"label file for AU{au} not found")
    try:
      table = np.array([[int(x) for x in line.split(",")[:2]] for line in lines], np.int64)
    except ValueError as e:
      raise InvalidExample(path, f"unreadable label line: {e}") from None
    if table.ndim != 2 or table.shape[1] != 2:
      raise InvalidExample(path, "expected lines 'frame,intensity'")
    if not np.array_equal(table[:, 0], np.arange(1, len(table) + 1)):
      raise InvalidExample(path, "frame numbers are not 1, 2, 3, ...")
    if table[:, 1].min() < 0 or table[:, 1].max() > 5:
      raise InvalidExample(
        path, f"intensity outside 0..5 (range {table[:, 1].min()}..{table[:, 1].max()})"
      )
    columns.append(table[:, 1])
  lengths = {len(c) for c in columns}
  if len(lengths) > 1:
    raise InvalidExample(label_dir, f"AU label files differ in length: {sorted(lengths)}")
  return np.stack(columns, axis=1)


class Disfa(_video.ActionUnitBuilder):
  """DISFA frame windows with 8 AU occurrence labels (and intensities), 3 folds."""

  name = "disfa"
  BUILDER_CONFIGS = _video.standard_configs(window=True)
  HOMEPAGE = "http://mohammadmahoor.com/disfa/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request DISFA from http://mohammadmahoor.com/disfa/, unpack it and pass the directory "
    "that holds Videos_LeftCamera/ and ActionUnit_Labels/."
  )
  AUS = AUS
  PARTS = PARTS

  def frame_label_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {"frame_intensity": tfds.features.Tensor(shape=(None, len(AUS)), dtype=np.float32)}

  def list_recordings(self, raw_dir: str) -> list[Recording]:
    return read_recordings(raw_dir)

  def _load_recording(self, recording: Recording) -> dict[str, np.ndarray]:
    intensity = read_intensity(recording.label_dir, recording.subject)
    config = self.video_config
    box = None
    frames = []
    for frame in video_ops.iter_video_frames(recording.path):
      if box is None:
        box = video_ops.center_square_box(*frame.shape[:2], config.crop_fraction)
      frames.append(video_ops.crop_and_resize(frame[None], box, config.frame_size)[0])
    if abs(len(frames) - len(intensity)) > 1:
      raise InvalidExample(
        recording.path,
        f"video has {len(frames)} frames but the labels in {recording.label_dir} cover "
        f"{len(intensity)}",
      )
    length = min(len(frames), len(intensity))
    return {
      "video": np.stack(frames[:length]),
      "intensity": intensity[:length],
      "fps": np.float32(video_ops.video_fps(recording.path)),
    }

  def _load(self, recording: Recording) -> list[tuple[str, dict]]:
    data = self.cached(recording.path, lambda: self._load_recording(recording))
    intensity = data["intensity"]
    return _video.window_examples(
      recording.subject,
      data["video"],
      np.arange(1, len(intensity) + 1),
      intensity >= OCCURRENCE_THRESHOLD,
      self.video_config.max_frames,
      {"fps": float(data["fps"]), "subject": recording.subject},
      intensity=intensity,
    )


build = Disfa.build_from_raw
inspect = Disfa.inspect_built
