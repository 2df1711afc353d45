"""TFDS builder for VoxCeleb2: unlabelled talking-face clips with speech, for pretraining.

Reads the release's layout from the raw directory (docs/design.md section 4):

    dev/mp4/id<NNNNN>/<video_id>/<NNNNN>.mp4    face-tracked clips, 224 px, 25 fps, AAC speech
    test/mp4/id<NNNNN>/<video_id>/<NNNNN>.mp4   (optional) the test identities

and, where present beside a clip, its face-part map `<NNNNN>.parts.npz` (`parts` uint8 [T, H, W]
with the ids of `data_pipelines.synthetic.face_render.FACE_PARTS`; the synthetic twin writes
them, the real release has none). The extracted-frames variant (folders of JPEGs per clip) is
not read: the release ships mp4.

Splits are by identity, so no person is in two of them: `test` holds `test/mp4` (absent when
that folder is); `validation` the dev identities whose hash falls in the lowest
`VALIDATION_SHARE` (at least one identity when dev has two or more; the hash makes the choice
stable as identities are added); `train` the other dev identities.

Each clip gives up to `windows_per_clip` examples, windows of `max_frames` consecutive frames
evenly spread over it (a clip shorter than `max_frames` gives one window of all its frames),
so frames stay consecutive and the audio stays aligned. Frames are the centred square
(`crop_fraction` of the short side; VoxCeleb2 frames are already face crops) resized to
`frame_size`; part maps take the same crop with nearest-neighbour resizing.

Features:
  video           [T, S, S, 3] uint8   T <= max_frames consecutive frames, S = frame_size
  face_parts      [T, S, S] uint8      face-part ids per pixel, or [0, S, S] (empty) when the
                                       clip has no parts file: test `has_face_parts` (or the
                                       length) before using it; nothing is made up
  has_face_parts  bool
  audio           [N] float32          16 kHz mono in [-1, 1], exactly the window's frames'
                                       samples (frame t covers [t*sr/fps, (t+1)*sr/fps))
  fps             float32              the video's frame rate (25 for VoxCeleb2)
  num_frames      int32                frames in the whole clip
  start_frame     int32                the window's first frame in the clip
  identity        text                 "id00012"
  clip_id         text                 "id00012/<video_id>/00001"
  key             text                 clip_id + "@" + start_frame

A clip that does not decode, has no audio, whose audio and video lengths disagree (beyond one
frame plus the AAC encoder's last 1024-sample frame), or whose parts file is unreadable, of
the wrong shape or holds unknown ids fails the build naming the file and the reason, or, with
`skip_invalid`, is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from data_pipelines.builders import _video
from data_pipelines.builders.common import InvalidExample, check_shape
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic.face_render import FACE_PARTS

SAMPLE_RATE = 16000
VALIDATION_SHARE = 0.05
DEFAULT_WINDOWS_PER_CLIP = 1
AAC_FRAME = 1024  # samples: the AAC encoder pads the audio to whole frames of this length
_IDENTITY = re.compile(r"^id\d+$")
# Overlay colours of the parts in the inspection sheet (background left as it is).
_PART_COLOURS = np.array(
  [
    [0, 0, 0],
    [150, 80, 0],
    [230, 190, 150],
    [140, 0, 200],
    [0, 200, 255],
    [0, 230, 0],
    [255, 0, 0],
  ],
  np.uint8,
)


@dataclasses.dataclass(frozen=True)
class Clip:
  """One raw clip."""

  path: str  # the .mp4
  split: str
  identity: str
  video_id: str
  name: str  # "00001"

  @property
  def clip_id(self) -> str:
    return f"{self.identity}/{self.video_id}/{self.name}"

  @property
  def parts_path(self) -> str:
    return self.path.removesuffix(".mp4") + ".parts.npz"


@dataclasses.dataclass(eq=False)
class VoxConfig(_video.VideoConfig):
  """Stored clip geometry and how many windows each clip gives."""

  windows_per_clip: int = DEFAULT_WINDOWS_PER_CLIP


def identity_hash(identity: str) -> float:
  """A stable number in [0, 1) per identity (SHA-1), which decides its split."""
  return int(hashlib.sha1(identity.encode()).hexdigest()[:12], 16) / 16**12


def list_clips(raw_dir: str) -> dict[str, list[Clip]]:
  """`{split: clips}` from `dev/mp4` and `test/mp4`, split by identity (see the module doc)."""
  dev = _walk(os.path.join(raw_dir, "dev", "mp4"))
  test = _walk(os.path.join(raw_dir, "test", "mp4"))
  if not dev:
    raise FileNotFoundError(f"{raw_dir}: no VoxCeleb2 clips under dev/mp4/id*/<video>/*.mp4")
  identities = sorted({c[0] for c in dev}, key=identity_hash)
  held_out = [i for i in identities if identity_hash(i) < VALIDATION_SHARE]
  if not held_out and len(identities) > 1:
    held_out = identities[:1]
  splits: dict[str, list[Clip]] = {"train": [], "validation": []}
  for identity, video_id, name, path in dev:
    split = "validation" if identity in held_out else "train"
    splits[split].append(Clip(path, split, identity, video_id, name))
  if test:
    overlap = sorted({c[0] for c in test} & set(identities))
    if overlap:
      raise ValueError(f"{raw_dir}: identities in both dev and test: {overlap[:5]}")
    splits["test"] = [Clip(p, "test", i, v, n) for i, v, n, p in test]
  return splits


def _walk(root: str) -> list[tuple[str, str, str, str]]:
  """(identity, video_id, clip name, path) of every `id*/<video>/<clip>.mp4` under `root`."""
  if not os.path.isdir(root):
    return []
  found = []
  for identity in sorted(os.listdir(root)):
    if not _IDENTITY.match(identity):
      continue
    for video_id in sorted(os.listdir(os.path.join(root, identity))):
      folder = os.path.join(root, identity, video_id)
      if not os.path.isdir(folder):
        continue
      for filename in sorted(os.listdir(folder)):
        if filename.endswith(".mp4"):
          path = os.path.join(folder, filename)
          found.append((identity, video_id, filename.removesuffix(".mp4"), path))
  return found


def window_starts(num_frames: int, max_frames: int, windows_per_clip: int) -> list[int]:
  """First frames of up to `windows_per_clip` non-overlapping windows spread over the clip."""
  length = min(max_frames, num_frames)
  count = max(1, min(windows_per_clip, num_frames // length))
  return sorted({int(s) for s in np.round(np.linspace(0, num_frames - length, count))})


def read_parts(clip: Clip, shape: tuple[int, int, int]) -> np.ndarray | None:
  """The clip's part map `[T, H, W] uint8` checked against the video's `shape`, or None."""
  path = clip.parts_path
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as archive:
      parts = np.asarray(archive["parts"])
  except Exception as e:  # noqa: BLE001  a stranger's file: name it, one line
    raise InvalidExample(path, f"not a readable parts .npz ({type(e).__name__}: {e})") from e
  if parts.dtype != np.uint8:
    raise InvalidExample(path, f"face-part map is {parts.dtype}, expected uint8")
  check_shape(path, "face-part map", parts, shape)
  if parts.size and parts.max() >= len(FACE_PARTS):
    raise InvalidExample(path, f"face-part id {parts.max()} is not one of 0..{len(FACE_PARTS) - 1}")
  return parts


def frame_aligned_audio(path: str, num_frames: int, fps: float) -> np.ndarray:
  """The clip's speech `[N] float32` at `SAMPLE_RATE`, exactly the samples of its `num_frames`
  frames (N = `frame_start_sample(num_frames)`; the AAC encoder's padding cut, a short tail
  zero-filled). Audio shorter or longer than the video by more than one frame (plus the
  encoder's last `AAC_FRAME`) raises `InvalidExample` naming the file."""
  audio = video_ops.decode_audio(path, SAMPLE_RATE)
  expected = audio_ops.frame_start_sample(num_frames, SAMPLE_RATE, fps)
  if not -SAMPLE_RATE / fps <= len(audio) - expected <= SAMPLE_RATE / fps + AAC_FRAME:
    raise InvalidExample(
      path,
      f"audio/video length mismatch: {len(audio)} samples at {SAMPLE_RATE} Hz is "
      f"{len(audio) * fps / SAMPLE_RATE:.2f} frames at {fps:g} fps, but {num_frames} decode",
    )
  return np.pad(audio, (0, max(0, expected - len(audio))))[:expected]


def crop_parts(parts: np.ndarray, frame_size: int, crop_fraction: float) -> np.ndarray:
  """The frames' centred crop of a part map `[T, H, W]`, resized nearest-neighbour."""
  box = video_ops.center_square_box(*parts.shape[1:3], crop_fraction)
  planes = np.repeat(parts[..., None], 3, axis=-1)
  return video_ops.crop_and_resize(planes, box, frame_size, resample=Image.NEAREST)[..., 0]


class Voxceleb2(_video.VideoBuilder):
  """VoxCeleb2 clips with their speech and, where given, face-part maps."""

  name = "voxceleb2"
  BUILDER_CONFIGS = _video.standard_configs()
  HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/voxceleb/vox2.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the VoxCeleb2 dev (and test) mp4 archives, unpack them and pass the directory "
    "that holds dev/mp4/ (and test/mp4/)."
  )

  @property
  def windows_per_clip(self) -> int:
    return getattr(self.builder_config, "windows_per_clip", DEFAULT_WINDOWS_PER_CLIP)

  def features_dict(self) -> tfds.features.FeaturesDict:
    size = self.video_config.frame_size
    return tfds.features.FeaturesDict(
      {
        "video": self.video_feature(),
        "face_parts": tfds.features.Tensor(
          shape=(None, size, size), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
        ),
        "has_face_parts": tfds.features.Scalar(dtype=np.bool_),
        "audio": tfds.features.Tensor(
          shape=(None,), dtype=np.float32, encoding=tfds.features.Encoding.BYTES
        ),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "start_frame": tfds.features.Scalar(dtype=np.int32),
        "identity": tfds.features.Text(),
        "clip_id": tfds.features.Text(),
        "key": tfds.features.Text(),
      }
    )

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata["face_parts"] = list(FACE_PARTS)
    info.metadata["sample_rate"] = SAMPLE_RATE
    return info

  def _split_generators(self, dl_manager):
    splits = list_clips(os.fspath(dl_manager.manual_dir))
    return {name: self._generate_examples(name, clips) for name, clips in splits.items()}

  def _load(self, clip: Clip) -> list[tuple[str, dict]]:
    config = self.video_config
    frames = list(video_ops.iter_video_frames(clip.path))
    num_frames, height, width = len(frames), *frames[0].shape[:2]
    fps = video_ops.video_fps(clip.path) or 25.0
    audio = frame_aligned_audio(clip.path, num_frames, fps)
    parts = read_parts(clip, (num_frames, height, width))
    examples = []
    for start in window_starts(num_frames, config.max_frames, self.windows_per_clip):
      stop = start + min(config.max_frames, num_frames)
      video = video_ops.center_crop(
        np.stack(frames[start:stop]), config.frame_size, config.crop_fraction
      )
      if parts is None:
        window_parts = np.zeros((0, config.frame_size, config.frame_size), np.uint8)
      else:
        window_parts = crop_parts(parts[start:stop], config.frame_size, config.crop_fraction)
      first = audio_ops.frame_start_sample(start, SAMPLE_RATE, fps)
      last = audio_ops.frame_start_sample(stop, SAMPLE_RATE, fps)
      key = f"{clip.clip_id}@{start}"
      examples.append(
        (
          key,
          {
            "video": video,
            "face_parts": window_parts,
            "has_face_parts": parts is not None,
            "audio": audio[first:last],
            "fps": np.float32(fps),
            "num_frames": num_frames,
            "start_frame": start,
            "identity": clip.identity,
            "clip_id": clip.clip_id,
            "key": key,
          },
        )
      )
    return examples

  @classmethod
  def inspect_built(
    cls, data_dir: str, out_png: str | None = None, config: str | None = None
  ) -> dict:
    """Counts, shapes and statistics, identities per split, and (with `out_png`) a sheet of
    sample frames with their face-part overlays below them."""
    report = _video.inspect_dataset(cls.name, data_dir, None, config)
    builder = tfds.builder_from_directory(_video.find_built(cls.name, data_dir, config))
    report["face_parts"] = list(FACE_PARTS)
    sheet_source = None
    for split in builder.info.splits:
      source = builder.as_data_source(split=split)
      examples = [source[i] for i in range(min(len(source), 256))]
      entry = report["splits"][split]
      entry["identities"] = len({e["identity"] for e in examples})
      entry["with_face_parts"] = int(sum(bool(e["has_face_parts"]) for e in examples))
      entry["audio_seconds_mean"] = (
        float(np.mean([len(e["audio"]) for e in examples])) / SAMPLE_RATE if examples else 0.0
      )
      if sheet_source is None and len(source):
        sheet_source = source
    if out_png and sheet_source is not None:
      parts_sheet(sheet_source, out_png)
      report["contact_sheet"] = out_png
    return report


def parts_sheet(source, out_png: str, rows: int = 4, cols: int = 8) -> None:
  """Saves a grid: per clip, a row of frames and below it the same frames with their part
  maps blended in (frames of clips without parts are repeated plain)."""
  picks = np.unique(np.linspace(0, len(source) - 1, min(rows, len(source))).astype(int))
  tiles = []
  for i in picks:
    example = source[int(i)]
    video = np.asarray(example["video"])
    indices = video_ops.uniform_indices(len(video), cols)
    frames = video[indices]
    overlay = frames
    parts = np.asarray(example["face_parts"])
    if len(parts):
      labels = parts[indices]
      colour = _PART_COLOURS[labels]
      marked = (labels != 0) & (labels != 2)  # the parts, not background or plain skin
      blend = np.where(marked[..., None], frames // 2 + colour // 2, frames)
      overlay = blend.astype(np.uint8)
    strip = Image.fromarray(np.concatenate(list(frames), axis=1))
    ImageDraw.Draw(strip).text((2, 2), str(example["identity"].decode()), fill=(255, 255, 0))
    tiles += [np.asarray(strip), np.concatenate(list(overlay), axis=1)]
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  Image.fromarray(np.concatenate(tiles, axis=0)).save(out_png)


def build(
  raw_dir: str,
  data_dir: str,
  skip_invalid: bool = False,
  *,
  frame_size: int = _video.DEFAULT_FRAME_SIZE,
  max_frames: int = _video.DEFAULT_MAX_FRAMES,
  windows_per_clip: int = DEFAULT_WINDOWS_PER_CLIP,
  crop_fraction: float = 1.0,
) -> dict[str, int]:
  """Builds VoxCeleb2 from `raw_dir` into `data_dir`; returns `{split: num_examples}`.

  The config is `<frame_size>px_<max_frames>f`, with `_<n>w` when `windows_per_clip` is not
  the default and `_crop<f>` when `crop_fraction` is not 1 (`config.data.builder_config`).
  """
  if windows_per_clip < 1:
    raise ValueError(f"windows_per_clip must be positive, got {windows_per_clip}")
  if not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"{raw_dir}: raw dataset directory not found")
  name = _video.config_name(frame_size, max_frames)
  if windows_per_clip != DEFAULT_WINDOWS_PER_CLIP:
    name += f"_{windows_per_clip}w"
  if crop_fraction != 1.0:
    name += f"_crop{crop_fraction:g}"
  registered = {c.name for c in Voxceleb2.BUILDER_CONFIGS}
  config: VoxConfig | str = name
  if name not in registered:
    config = VoxConfig(
      name=name,
      frame_size=frame_size,
      max_frames=max_frames,
      crop_fraction=crop_fraction,
      windows_per_clip=windows_per_clip,
      description=f"{windows_per_clip} window(s) of {max_frames} frames of {frame_size} px",
    )
  builder = Voxceleb2(
    config=config, data_dir=data_dir, file_format="array_record", skip_invalid=skip_invalid
  )
  return _video.prepare(builder, raw_dir)


inspect = Voxceleb2.inspect_built
