"""TFDS builder for HDTF: long frontal talking-head clips with speech, for talking-head training.

Reads processed HDTF as the talking-head papers use it (docs/design.md section 4), one directory
of face-crop clips at 25 fps with their speech as AAC:

    <raw>/<Source>_<Name>_<NNN>.mp4     Source in RD, WDA, WRA; identity = <Source>_<Name>
    <raw>/<Source>_<Name>_<NNN>.json    (optional) per-frame ground truth: `mouth_open` [T],
                                        `head_pose` [T, 6], `blink` [T], `fps`; the synthetic
                                        twin writes it (`data_pipelines.synthetic.hdtf`), the
                                        real release has none

Splits are by identity, so no person is in two of them (`identity_split`: a SHA-1 hash of the
identity, stable as identities are added): `test` the lowest `TEST_SHARE`, `validation` the
next `VALIDATION_SHARE`, `train` the rest. HDTF has no official split; a split no identity
falls in is left out (with a warning). The twin picks its names so that each split holds at
least two identities.

Each clip gives every non-overlapping window of `max_frames` consecutive frames (from frame 0;
a clip shorter than `max_frames` gives one window of all its frames; the tail after the last
whole window is dropped), so frames stay consecutive and the audio aligned. Frames are the
centred square (`crop_fraction` of the short side; the clips are already face crops) resized to
`frame_size` as they decode, so a long clip never sits in memory at full resolution.

Features:
  video             [T, S, S, 3] uint8   T <= max_frames consecutive frames, S = frame_size
  audio             [N] float32          16 kHz mono in [-1, 1], N = T * 640: exactly the
                                         window's frames' samples (frame t covers
                                         [t*sr/fps, (t+1)*sr/fps))
  fps               float32              25
  num_frames        int32                frames in the whole clip
  start_frame       int32                the window's first frame in the clip
  identity          text                 "WDA_BarackObama"
  clip_id           text                 "WDA_BarackObama_000"
  key               text                 clip_id + "@" + start_frame
  mouth_open        [T] float32          ground truth of the window's frames (see the twin),
  head_pose         [T, 6] float32       or zeros when the clip has no .json:
  blink             [T] float32          test `has_ground_truth` before using them
  has_ground_truth  bool

A clip that does not decode, has no audio stream, is not 25 fps, whose audio and video lengths
disagree (beyond one frame plus the AAC encoder's last 1024-sample frame), or whose .json is
unreadable, lacks a field or has the wrong number of frames fails the build naming the file and
the reason, or, with `skip_invalid`, is skipped and counted. An .mp4 whose name is not
`<Source>_<Name>_<NNN>.mp4` fails the listing naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from data_pipelines.builders import _video
from data_pipelines.builders.common import InvalidExample, check_shape
from data_pipelines.builders.voxceleb2 import SAMPLE_RATE, frame_aligned_audio
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import video as video_ops

FPS = 25.0
TEST_SHARE = 0.1
VALIDATION_SHARE = 0.1
DEFAULT_FRAME_SIZE = 64
DEFAULT_MAX_FRAMES = 100  # 4 s at 25 fps
SPLITS = ("train", "validation", "test")
_CLIP_NAME = re.compile(r"^((?:RD|WDA|WRA)_[A-Za-z0-9-]+)_(\d+)$")
_TRUTH_SHAPES = {"mouth_open": (), "head_pose": (6,), "blink": ()}  # per frame


@dataclasses.dataclass(frozen=True)
class Clip:
  """One raw clip."""

  path: str  # the .mp4
  split: str
  identity: str  # "WDA_BarackObama"
  clip_id: str  # "WDA_BarackObama_000"

  @property
  def truth_path(self) -> str:
    return self.path.removesuffix(".mp4") + ".json"


def identity_split(identity: str) -> str:
  """The split of an identity: SHA-1 of the name as a number in [0, 1), `test` below
  `TEST_SHARE`, `validation` below `TEST_SHARE + VALIDATION_SHARE`, else `train`."""
  h = int(hashlib.sha1(identity.encode()).hexdigest()[:12], 16) / 16**12
  if h < TEST_SHARE:
    return "test"
  return "validation" if h < TEST_SHARE + VALIDATION_SHARE else "train"


def list_clips(raw_dir: str) -> dict[str, list[Clip]]:
  """`{split: clips}` of every `<Source>_<Name>_<NNN>.mp4` in `raw_dir`, split by identity."""
  splits: dict[str, list[Clip]] = {s: [] for s in SPLITS}
  for filename in sorted(os.listdir(raw_dir)):
    if not filename.endswith(".mp4"):
      continue
    path = os.path.join(raw_dir, filename)
    match = _CLIP_NAME.match(filename.removesuffix(".mp4"))
    if not match:
      raise ValueError(f"{path}: not an HDTF clip name <RD|WDA|WRA>_<Name>_<NNN>.mp4")
    identity = match.group(1)
    split = identity_split(identity)
    splits[split].append(Clip(path, split, identity, filename.removesuffix(".mp4")))
  if not any(splits.values()):
    raise FileNotFoundError(f"{raw_dir}: no HDTF clips <RD|WDA|WRA>_<Name>_<NNN>.mp4")
  empty = [s for s in SPLITS if not splits[s]]
  if empty:
    logging.warning("hdtf: no identity of %s falls in split(s) %s; left out", raw_dir, empty)
  return {s: clips for s, clips in splits.items() if clips}


def window_starts(num_frames: int, max_frames: int) -> list[int]:
  """First frames of the non-overlapping windows of `max_frames` frames from frame 0 (one
  window of the whole clip when it is shorter)."""
  if num_frames <= max_frames:
    return [0]
  return list(range(0, num_frames - max_frames + 1, max_frames))


def read_truth(clip: Clip, num_frames: int, fps: float) -> dict[str, np.ndarray] | None:
  """The clip's ground truth `{mouth_open [T], head_pose [T, 6], blink [T]}` checked against
  its `num_frames` and `fps`, or None when it has no .json."""
  path = clip.truth_path
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      truth = json.load(f)
  except (OSError, ValueError) as e:
    raise InvalidExample(
      path, f"not a readable ground-truth .json ({type(e).__name__}: {e})"
    ) from e
  if not isinstance(truth, dict):
    raise InvalidExample(path, f"ground truth must be a JSON object, got {type(truth).__name__}")
  if "fps" in truth and abs(float(truth["fps"]) - fps) > 1e-3:
    raise InvalidExample(path, f"ground truth is at {truth['fps']} fps, the video at {fps:g}")
  arrays = {}
  for name, frame_shape in _TRUTH_SHAPES.items():
    if name not in truth:
      raise InvalidExample(path, f"ground truth has no {name!r}")
    try:
      value = np.asarray(truth[name], np.float32)
    except (TypeError, ValueError) as e:
      raise InvalidExample(path, f"{name!r} is not numeric ({e})") from e
    check_shape(path, f"{name!r} (frames first)", value, (num_frames, *frame_shape))
    if not np.isfinite(value).all():
      raise InvalidExample(path, f"{name!r} holds non-finite values")
    arrays[name] = value
  return arrays


class Hdtf(_video.VideoBuilder):
  """HDTF clips in windows, with their speech and, where given, per-frame ground truth."""

  name = "hdtf"
  BUILDER_CONFIGS = [
    _video.VideoConfig(
      name=_video.config_name(size, DEFAULT_MAX_FRAMES),
      frame_size=size,
      max_frames=DEFAULT_MAX_FRAMES,
      description=f"windows of {DEFAULT_MAX_FRAMES} frames of {size}x{size} pixels",
    )
    for size in (DEFAULT_FRAME_SIZE, 128, 256)
  ]
  HOMEPAGE = "https://github.com/MRzzm/HDTF"
  CITATION = (
    "Zhang, Li, Ding, Fan. Flow-guided One-shot Talking Face Generation with a High-resolution "
    "Audio-visual Dataset. CVPR 2021."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the HDTF videos (the repository lists their YouTube ids and time stamps), cut and "
    "crop them to 25 fps face clips with their audio as <Source>_<Name>_<NNN>.mp4, and pass "
    "the directory that holds them."
  )

  def features_dict(self) -> tfds.features.FeaturesDict:
    def floats(shape):
      return tfds.features.Tensor(
        shape=shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES
      )

    return tfds.features.FeaturesDict(
      {
        "video": self.video_feature(),
        "audio": floats((None,)),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "start_frame": tfds.features.Scalar(dtype=np.int32),
        "identity": tfds.features.Text(),
        "clip_id": tfds.features.Text(),
        "key": tfds.features.Text(),
        "mouth_open": floats((None,)),
        "head_pose": floats((None, 6)),
        "blink": floats((None,)),
        "has_ground_truth": tfds.features.Scalar(dtype=np.bool_),
      }
    )

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata["sample_rate"] = SAMPLE_RATE
    return info

  def _split_generators(self, dl_manager):
    splits = list_clips(os.fspath(dl_manager.manual_dir))
    return {name: self._generate_examples(name, clips) for name, clips in splits.items()}

  def _load(self, clip: Clip) -> list[tuple[str, dict]]:
    config = self.video_config
    fps = video_ops.video_fps(clip.path)
    if abs(fps - FPS) > 1e-3:
      raise InvalidExample(
        clip.path, f"frame rate is {fps:g} fps, HDTF clips are {FPS:g} (re-encode at 25 fps)"
      )
    frames = np.stack(
      [
        video_ops.center_crop(frame[None], config.frame_size, config.crop_fraction)[0]
        for frame in video_ops.iter_video_frames(clip.path)
      ]
    )
    num_frames = len(frames)
    audio = frame_aligned_audio(clip.path, num_frames, fps)
    truth = read_truth(clip, num_frames, fps)
    examples = []
    for start in window_starts(num_frames, config.max_frames):
      stop = start + min(config.max_frames, num_frames)
      first = audio_ops.frame_start_sample(start, SAMPLE_RATE, fps)
      last = audio_ops.frame_start_sample(stop, SAMPLE_RATE, fps)
      length = stop - start
      if truth is None:
        window_truth = {
          name: np.zeros((length, *shape), np.float32) for name, shape in _TRUTH_SHAPES.items()
        }
      else:
        window_truth = {name: value[start:stop] for name, value in truth.items()}
      key = f"{clip.clip_id}@{start}"
      examples.append(
        (
          key,
          {
            "video": frames[start:stop],
            "audio": audio[first:last],
            "fps": np.float32(fps),
            "num_frames": num_frames,
            "start_frame": start,
            "identity": clip.identity,
            "clip_id": clip.clip_id,
            "key": key,
            **window_truth,
            "has_ground_truth": truth is not None,
          },
        )
      )
    return examples

  @classmethod
  def inspect_built(
    cls, data_dir: str, out_png: str | None = None, config: str | None = None
  ) -> dict:
    """Counts, shapes and statistics, identities per split, the ground truth's range, and (with
    `out_png`) a sheet of sample frames with their mouth opening drawn under each."""
    report = _video.inspect_dataset(cls.name, data_dir, None, config)
    builder = tfds.builder_from_directory(_video.find_built(cls.name, data_dir, config))
    sheet_source = None
    for split in builder.info.splits:
      source = builder.as_data_source(split=split)
      picks = np.unique(np.linspace(0, len(source) - 1, min(len(source), 256)).astype(int))
      examples = [source[int(i)] for i in picks] if len(source) else []
      entry = report["splits"][split]
      entry["identities"] = len({e["identity"] for e in examples})
      entry["with_ground_truth"] = int(sum(bool(e["has_ground_truth"]) for e in examples))
      entry["audio_seconds_mean"] = (
        float(np.mean([len(e["audio"]) for e in examples])) / SAMPLE_RATE if examples else 0.0
      )
      truth = [e for e in examples if e["has_ground_truth"]]
      if truth:
        mouth = np.concatenate([e["mouth_open"] for e in truth])
        entry["mouth_open_range"] = [round(float(mouth.min()), 4), round(float(mouth.max()), 4)]
        entry["blink_share"] = round(
          float(np.mean(np.concatenate([e["blink"] for e in truth]) > 0.5)), 4
        )
      if sheet_source is None and len(source):
        sheet_source = source
    if out_png and sheet_source is not None:
      mouth_sheet(sheet_source, out_png)
      report["contact_sheet"] = out_png
    return report


def mouth_sheet(source, out_png: str, rows: int = 4, cols: int = 8) -> None:
  """Saves a grid: per window, a row of uniformly spaced frames, the identity written on the
  first, and under each frame a bar as long as its true mouth opening (none without ground
  truth; full width = 0.15 head half-heights, a wide-open mouth)."""
  picks = np.unique(np.linspace(0, len(source) - 1, min(rows, len(source))).astype(int))
  tiles = []
  for i in picks:
    example = source[int(i)]
    video = np.asarray(example["video"])
    size = video.shape[1]
    indices = video_ops.uniform_indices(len(video), cols)
    strip = Image.fromarray(np.concatenate(list(video[indices]), axis=1))
    ImageDraw.Draw(strip).text((2, 2), example["identity"].decode(), fill=(255, 255, 0))
    bars = Image.new("RGB", (size * cols, max(4, size // 8)))
    if example["has_ground_truth"]:
      draw = ImageDraw.Draw(bars)
      for k, t in enumerate(indices):
        width = int(np.clip(example["mouth_open"][t] / 0.15, 0, 1) * (size - 2))
        draw.rectangle((k * size + 1, 1, k * size + 1 + width, bars.height - 2), fill=(0, 220, 0))
    tiles += [np.asarray(strip), np.asarray(bars)]
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  Image.fromarray(np.concatenate(tiles, axis=0)).save(out_png)


def build(
  raw_dir: str,
  data_dir: str,
  skip_invalid: bool = False,
  *,
  frame_size: int = DEFAULT_FRAME_SIZE,
  max_frames: int = DEFAULT_MAX_FRAMES,
  crop_fraction: float = 1.0,
) -> dict[str, int]:
  """Builds HDTF from `raw_dir` into `data_dir`; returns `{split: num_examples}`.

  The config is `<frame_size>px_<max_frames>f` (`64px_100f` by default), with `_crop<f>` when
  `crop_fraction` is not 1 (`config.data.builder_config` selects one).
  """
  if not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"{raw_dir}: raw dataset directory not found")
  name = _video.config_name(frame_size, max_frames)
  if crop_fraction != 1.0:
    name += f"_crop{crop_fraction:g}"
  config: _video.VideoConfig | str = name
  if name not in {c.name for c in Hdtf.BUILDER_CONFIGS}:
    config = _video.VideoConfig(
      name=name,
      frame_size=frame_size,
      max_frames=max_frames,
      crop_fraction=crop_fraction,
      description=f"windows of {max_frames} frames of {frame_size}x{frame_size} pixels",
    )
  builder = Hdtf(
    config=config, data_dir=data_dir, file_format="array_record", skip_invalid=skip_invalid
  )
  return _video.prepare(builder, raw_dir)


inspect = Hdtf.inspect_built
