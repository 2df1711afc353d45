"""What the video dataset builders (DFEW, MAFW, FERV39k, BP4D, DISFA) share.

Each builder reads a dataset's raw layout from the directory the user gives (TFDS's
`manual_dir`), decodes every clip once at build time, crops it to a centred square, resizes
it to `frame_size` pixels and keeps at most `max_frames` frames, and writes uint8 frames to
`array_record` files. Training then only samples, crops and jitters stored frames (see
`data_pipelines/video.py`), which keeps the input pipeline cheap.

Frames are stored raw (`Encoding.BYTES`): one contiguous byte buffer per clip. TFDS's default
for uint8 tensors, one int64 varint per byte, made reading a 32-frame 128-pixel clip about ten
times slower. The price is disk space, `T x frame_size^2 x 3` bytes per example and split; a
clip is stored once per split that lists it (DFEW and MAFW: five times).

Two bases carry what the builders of one kind share, so that a dataset module keeps only its
raw layout, label parsing, class names and splits: `ClipBuilder` (DFEW, MAFW, FERV39k: one
labelled clip per example) and `ActionUnitBuilder` (BP4D, DISFA: frame windows with AU labels,
subject-exclusive folds). Every dataset module exposes `build = <Builder>.build_from_raw` and
`inspect = <Builder>.inspect_built`, the entry points that `data_pipelines/cli.py` calls.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from data_pipelines.builders import common
from data_pipelines.builders.common import ExampleValidator, InvalidExample, check_shape
from data_pipelines.ops import video as video_ops

DEFAULT_FRAME_SIZE = 128
DEFAULT_MAX_FRAMES = 32


@dataclasses.dataclass(eq=False)
class VideoConfig(tfds.core.BuilderConfig):
  """Stored clip geometry."""

  frame_size: int = DEFAULT_FRAME_SIZE  # stored frames are frame_size x frame_size pixels
  max_frames: int = DEFAULT_MAX_FRAMES  # longer clips are uniformly subsampled to this
  crop_fraction: float = 1.0  # side of the centred square crop, as a share of the short side


def config_name(frame_size: int, max_frames: int) -> str:
  """The name of the builder config that stores `max_frames` frames of `frame_size` pixels."""
  return f"{frame_size}px_{max_frames}f"


def standard_configs(window: bool = False) -> list[VideoConfig]:
  """112-ready (128 px) and 224-ready (256 px) configs; the first is the default."""
  what = "windows of up to" if window else "clips uniformly subsampled to at most"
  return [
    VideoConfig(
      name=config_name(size, DEFAULT_MAX_FRAMES),
      frame_size=size,
      max_frames=DEFAULT_MAX_FRAMES,
      description=f"{what} {DEFAULT_MAX_FRAMES} frames of {size}x{size} pixels",
    )
    for size in (128, 256)
  ]


class VideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the video builders: configs, the validate-or-skip loop, skipped counts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HOMEPAGE = ""  # the dataset's page, set by each builder
  CITATION = ""
  _clip_cache: str | None = None  # temporary directory of decoded clips, made on first use

  def __init__(self, *, skip_invalid: bool = False, **kwargs):
    """`skip_invalid`: skip (and count) bad examples instead of failing the build."""
    self.skip_invalid = skip_invalid
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS looks for a checksums file beside the builder's code through `importlib_resources`,
    # which this environment does not ship; these builders download nothing, so there is
    # nothing to checksum.
    return None

  @property
  def video_config(self) -> VideoConfig:
    return self.builder_config  # type: ignore[return-value]

  def video_feature(self) -> tfds.features.Tensor:
    """`[T, S, S, 3] uint8` stored as one raw byte buffer."""
    size = self.video_config.frame_size
    return tfds.features.Tensor(
      shape=(None, size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
    )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=self.features_dict(),
      metadata=tfds.core.MetadataDict(skipped={}),
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
    )

  def features_dict(self) -> tfds.features.FeaturesDict:
    """The dataset's features; each builder defines its own."""
    raise NotImplementedError(f"{type(self).__name__} must define features_dict()")

  def _generate_examples(self, split: str, items: Sequence):
    yield from self.validated_examples(split, items, self._load)

  def _load(self, item) -> list[tuple[str, dict]]:
    """The `(key, example)` pairs of one raw item (a clip or a recording); raises on bad input."""
    raise NotImplementedError(f"{type(self).__name__} must define _load()")

  @classmethod
  def build_from_raw(
    cls,
    raw_dir: str,
    data_dir: str,
    skip_invalid: bool = False,
    *,
    frame_size: int = DEFAULT_FRAME_SIZE,
    max_frames: int = DEFAULT_MAX_FRAMES,
  ) -> dict[str, int]:
    """Builds this dataset from `raw_dir` into `data_dir`; returns `{split: num_examples}`."""
    return build_dataset(
      cls, raw_dir, data_dir, skip_invalid, frame_size=frame_size, max_frames=max_frames
    )

  @classmethod
  def inspect_built(
    cls, data_dir: str, out_png: str | None = None, config: str | None = None
  ) -> dict:
    """Counts, shapes, statistics and a contact sheet of this dataset built under `data_dir`."""
    return inspect_dataset(cls.name, data_dir, out_png, config)

  def cached(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`compute()`, done once per build for each `key` (a clip or sequence path).

    A clip belongs to several splits (one fold's test split, the other folds' train splits)
    and TFDS writes split after split, so decoded clips are kept in a temporary directory
    (under $TMPDIR) that lives as long as the builder. Failures are not cached: a bad clip
    fails, or is skipped, in every split that lists it.
    """
    if self._clip_cache is None:
      self._clip_cache = tempfile.mkdtemp(prefix=f"{self.name}_clips_")
      weakref.finalize(self, shutil.rmtree, self._clip_cache, True)
    digest = hashlib.sha1(os.path.abspath(key).encode()).hexdigest()
    path = os.path.join(self._clip_cache, digest + ".npz")
    if os.path.isfile(path):
      with np.load(path) as data:
        return dict(data)
    arrays = compute()
    np.savez(path, **arrays)
    return arrays

  def load_clip(self, path: str) -> tuple[np.ndarray, int, np.ndarray]:
    """`load_frames` with this config's geometry, decoded once per build."""
    config = self.video_config

    def compute() -> dict[str, np.ndarray]:
      video, num_frames, indices = load_frames(
        path, config.max_frames, config.frame_size, config.crop_fraction
      )
      return {"video": video, "num_frames": np.int64(num_frames), "indices": indices}

    clip = self.cached(path, compute)
    return clip["video"], int(clip["num_frames"]), clip["indices"]

  def validated_examples(self, split: str, items: Sequence, load_fn) -> Iterator[tuple[str, dict]]:
    """Yields `(key, example)` for every item via `load_fn(item) -> [(key, example), ...]`.

    `load_fn` raises `InvalidExample` (or any decode error) for a bad item; the builder's
    `skip_invalid` decides whether that fails the build or is counted and skipped. The count
    goes into the dataset's metadata (`info.metadata["skipped"][split]`).
    """
    validator = ExampleValidator(skip_invalid=self.skip_invalid)
    for item in items:
      examples = []
      with validator.validated(item.path):
        try:
          examples = load_fn(item)
        except video_ops.VideoDecodeError as e:
          raise InvalidExample(e.path, e.reason) from e
      yield from examples
    validator.report(split)
    self.info.metadata["skipped"][split] = len(validator.skipped)


# ----------------------------------------------------------------------------------------------
# Clip loading shared by the builders.


def load_frames(
  path: str, max_frames: int, frame_size: int, crop_fraction: float = 1.0
) -> tuple[np.ndarray, int, np.ndarray]:
  """Decodes a frame folder or video file into stored form.

  Returns `(video [T, S, S, 3] uint8, num_frames, frame_indices [T])`: the raw clip's length
  and which of its frames were kept (uniformly spaced when the clip is longer than
  `max_frames`).
  """
  if os.path.isdir(path):
    files = video_ops.list_frame_files(path)
    num_frames = len(files)
    indices = video_ops.uniform_indices(num_frames, min(num_frames, max_frames))
    video = read_square_frames([files[i] for i in indices], frame_size, crop_fraction)
  else:
    # The length is known only once the file is decoded, so every frame is shrunk as it
    # arrives (full-resolution frames of a long clip would not fit in memory) and the kept
    # ones are picked afterwards.
    small = [
      video_ops.center_crop(frame[None], frame_size, crop_fraction)[0]
      for frame in video_ops.iter_video_frames(path)
    ]
    num_frames = len(small)
    indices = video_ops.uniform_indices(num_frames, min(num_frames, max_frames))
    video = np.stack([small[i] for i in indices])
  check_shape(path, "video", video, (None, frame_size, frame_size, 3))
  return video, num_frames, indices.astype(np.int32)


def read_square_frames(
  files: Sequence[str], frame_size: int, crop_fraction: float = 1.0
) -> np.ndarray:
  """`[T, S, S, 3] uint8`: the image files, centre-cropped to squares of `frame_size` pixels.

  JPEGs are decoded at the smallest reduced scale that still covers the crop.
  """
  frames = video_ops.read_frames(files, min_side=int(np.ceil(frame_size / crop_fraction)))
  return video_ops.center_crop(frames, frame_size, crop_fraction)


def check_frame_count(path: str, annotated: int | None, decoded: int, where: str) -> None:
  """Raises `InvalidExample` if the annotation's frame count is off by more than one."""
  if annotated is not None and abs(annotated - decoded) > 1:
    raise InvalidExample(path, f"{where} says {annotated} frames, but {decoded} decode")


def check_label(path: str, label: int, num_classes: int, where: str) -> None:
  """Raises `InvalidExample` unless `label` (1-based, as in the raw files) is in range."""
  if not 1 <= label <= num_classes:
    raise InvalidExample(path, f"label {label} from {where} is outside 1..{num_classes}")


def word_label(word: str, class_names: Sequence[str], key: str, annotation: str) -> int:
  """The 0-based index of label `word` in `class_names`, or `InvalidExample` naming the file."""
  if word not in class_names:
    raise InvalidExample(annotation, f"label {word!r} of clip {key} is not one of {class_names}")
  return class_names.index(word)


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines of a text annotation file; a missing file names itself."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, encoding="utf-8-sig") as f:
    return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Expression clips (DFEW, MAFW, FERV39k).


class ClipBuilder(VideoBuilder, skip_registration=True):
  """Base of the expression builders: one example per annotated clip, labelled with a class.

  A builder lists its splits with `clip_splits` as items that carry `path` (frame folder or
  video file), `key` and `annotation` (where errors point), and reads each item's class with
  `clip_label`. Features: video, label, num_frames, frame_indices, `extra_features()`,
  subject, key.
  """

  CLASS_NAMES: tuple[str, ...] = ()  # class names in label order, set by each builder

  def clip_splits(self, raw_dir: str) -> dict[str, Sequence]:
    """`{split: clips}` from the raw directory's annotation files."""
    raise NotImplementedError(f"{type(self).__name__} must define clip_splits()")

  def clip_label(self, clip) -> int:
    """The 0-based class of `clip`; raises `InvalidExample` naming the annotation."""
    raise NotImplementedError(f"{type(self).__name__} must define clip_label()")

  def clip_fields(self, clip, num_frames: int) -> dict:
    """`subject` and the extra features of `clip`'s example, once it decoded `num_frames`."""
    return {"subject": clip.key}

  def extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    """Features beyond the shared ones (those `clip_fields` adds besides `subject`)."""
    return {}

  def features_dict(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {
        "video": self.video_feature(),
        "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        **self.extra_features(),
        "subject": tfds.features.Text(),
        "key": tfds.features.Text(),
      }
    )

  def _split_generators(self, dl_manager):
    splits = self.clip_splits(os.fspath(dl_manager.manual_dir))
    return {name: self._generate_examples(name, clips) for name, clips in splits.items()}

  def _load(self, clip) -> list[tuple[str, dict]]:
    label = self.clip_label(clip)
    video, num_frames, indices = self.load_clip(clip.path)
    example = {
      "video": video,
      "label": label,
      "num_frames": num_frames,
      "frame_indices": indices,
      **self.clip_fields(clip, num_frames),
      "key": clip.key,
    }
    return [(clip.key, example)]

  @classmethod
  def inspect_built(
    cls, data_dir: str, out_png: str | None = None, config: str | None = None
  ) -> dict:
    """Counts, shapes, label histograms and a contact sheet of this dataset, as built."""
    return inspect_dataset(cls.name, data_dir, out_png, config, class_names=cls.CLASS_NAMES)


# ----------------------------------------------------------------------------------------------
# Frame windows for the action-unit datasets (BP4D, DISFA).


def runs(numbers: np.ndarray) -> list[slice]:
  """Slices of `numbers` (sorted) where they count up by one without gaps."""
  breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
  edges = [0, *breaks.tolist(), len(numbers)]
  return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def windows(numbers: np.ndarray, max_frames: int) -> list[slice]:
  """Runs of consecutive frame numbers cut into windows of at most `max_frames`."""
  out = []
  for run in runs(numbers):
    for start in range(run.start, run.stop, max_frames):
      out.append(slice(start, min(start + max_frames, run.stop)))
  return out


def window_examples(
  key_prefix: str,
  video: np.ndarray,
  numbers: np.ndarray,
  occurrence: np.ndarray,
  max_frames: int,
  extra: dict,
  intensity: np.ndarray | None = None,
) -> list[tuple[str, dict]]:
  """One example per window: frames, AUs of the centre frame, and AUs per frame.

  Used by the action-unit builders (BP4D, DISFA), whose sequences are long: `numbers` `[N]`
  are the frame numbers of `video` `[N, S, S, 3]` and `occurrence` `[N, A]`.
  """
  examples = []
  for window in windows(numbers, max_frames):
    frame_aus = occurrence[window].astype(np.float32)
    example = {
      "video": video[window],
      "aus": frame_aus[len(frame_aus) // 2],
      "frame_aus": frame_aus,
      "num_frames": len(frame_aus),
      "start_frame": int(numbers[window.start]),
      **extra,
      "key": f"{key_prefix}_{int(numbers[window.start]):05d}",
    }
    if intensity is not None:
      example["frame_intensity"] = intensity[window].astype(np.float32)
    examples.append((example["key"], example))
  return examples


class ActionUnitBuilder(VideoBuilder, skip_registration=True):
  """Base of the action-unit builders: windows of long recordings, subject-exclusive folds.

  A builder lists its recordings with `list_recordings` as items that carry `path` and
  `subject`; fold k (`fold<k>_train`, `fold<k>_test`) tests on the subjects of `PARTS[k - 1]`
  and trains on the other partitions'. Features: video, aus, frame_aus,
  `frame_label_features()`, num_frames, start_frame, fps, subject, `recording_features()`, key.
  """

  AUS: tuple[int, ...] = ()  # the labelled action units, set by each builder
  PARTS: tuple[tuple[str, ...], ...] = ()  # the subject partitions the folds test on

  def list_recordings(self, raw_dir: str) -> Sequence:
    """Every recording in the raw directory."""
    raise NotImplementedError(f"{type(self).__name__} must define list_recordings()")

  def frame_label_features(self) -> dict[str, tfds.features.FeatureConnector]:
    """Per-frame labels beyond AU occurrence."""
    return {}

  def recording_features(self) -> dict[str, tfds.features.FeatureConnector]:
    """What identifies a recording beyond its subject."""
    return {}

  def features_dict(self) -> tfds.features.FeaturesDict:
    num_aus = len(self.AUS)
    return tfds.features.FeaturesDict(
      {
        "video": self.video_feature(),
        "aus": tfds.features.Tensor(shape=(num_aus,), dtype=np.float32),
        "frame_aus": tfds.features.Tensor(shape=(None, num_aus), dtype=np.float32),
        **self.frame_label_features(),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "start_frame": tfds.features.Scalar(dtype=np.int32),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "subject": tfds.features.Text(),
        **self.recording_features(),
        "key": tfds.features.Text(),
      }
    )

  def _split_generators(self, dl_manager):
    recordings = self.list_recordings(os.fspath(dl_manager.manual_dir))
    part_of = {subject: k for k, part in enumerate(self.PARTS) for subject in part}
    unknown = sorted({r.subject for r in recordings} - set(part_of))
    if unknown:
      logging.warning(
        "%s: subjects outside the %d-fold partition are left out: %s",
        self.name,
        len(self.PARTS),
        unknown,
      )
    splits = {}
    for k in range(len(self.PARTS)):
      test = [r for r in recordings if part_of.get(r.subject) == k]
      train = [r for r in recordings if part_of.get(r.subject, k) != k]
      splits[f"fold{k + 1}_train"] = self._generate_examples(f"fold{k + 1}_train", train)
      splits[f"fold{k + 1}_test"] = self._generate_examples(f"fold{k + 1}_test", test)
    return splits

  @classmethod
  def inspect_built(
    cls, data_dir: str, out_png: str | None = None, config: str | None = None
  ) -> dict:
    """Counts, shapes, AU base rates and a contact sheet of this dataset, as built."""
    report = inspect_dataset(cls.name, data_dir, out_png, config, aus=cls.AUS)
    report["aus"] = list(cls.AUS)
    return report


# ----------------------------------------------------------------------------------------------
# The `build` and `inspect` entry points.


def build_dataset(
  builder_cls: type[VideoBuilder],
  raw_dir: str,
  data_dir: str,
  skip_invalid: bool = False,
  frame_size: int = DEFAULT_FRAME_SIZE,
  max_frames: int = DEFAULT_MAX_FRAMES,
  crop_fraction: float = 1.0,
) -> dict[str, int]:
  """Builds `builder_cls` from `raw_dir` into `data_dir`; returns the split sizes."""
  if not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"{raw_dir}: raw dataset directory not found")
  name = config_name(frame_size, max_frames)
  registered = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  if name in registered and registered[name].crop_fraction == crop_fraction:
    config: VideoConfig | str = name
  else:
    if name in registered:
      name += f"_crop{crop_fraction:g}"
    config = VideoConfig(
      name=name,
      frame_size=frame_size,
      max_frames=max_frames,
      crop_fraction=crop_fraction,
      description=f"at most {max_frames} frames of {frame_size}x{frame_size} pixels",
    )
  builder = builder_cls(
    config=config, data_dir=data_dir, file_format="array_record", skip_invalid=skip_invalid
  )
  return prepare(builder, raw_dir)


def prepare(builder: VideoBuilder, raw_dir: str) -> dict[str, int]:
  """Writes `builder`'s splits from the raw files in `raw_dir`; returns the split sizes (and
  logs the invalid examples skipped per split, if any)."""
  with common.shuffler_without_tensorflow():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(raw_dir))
    )
  skipped = dict(builder.info.metadata.get("skipped", {}))
  if any(skipped.values()):
    logging.warning("%s: skipped invalid examples per split: %s", builder.name, skipped)
  return {name: split.num_examples for name, split in builder.info.splits.items()}


def find_built(name: str, data_dir: str, config: str | None = None) -> str:
  """The directory of a built dataset `name` under `data_dir` (newest version)."""
  pattern = os.path.join(data_dir, name, config or "*", "*", "dataset_info.json")
  found = sorted(glob.glob(pattern))
  if not found:
    raise FileNotFoundError(f"{data_dir}: no built {name!r} dataset (looked for {pattern})")
  if config is None and len({os.path.dirname(os.path.dirname(p)) for p in found}) > 1:
    configs = sorted({os.path.basename(os.path.dirname(os.path.dirname(p))) for p in found})
    raise ValueError(f"{data_dir}: several {name!r} configs are built {configs}; name one")
  return os.path.dirname(found[-1])


def open_split(name: str, data_dir: str, split: str, config: str | None = None):
  """A random-access source over one split of a built dataset (no builder code needed)."""
  builder = tfds.builder_from_directory(find_built(name, data_dir, config))
  return builder.as_data_source(split=split)


def inspect_dataset(
  name: str,
  data_dir: str,
  out_png: str | None = None,
  config: str | None = None,
  max_examples: int = 256,
  class_names: Sequence[str] | None = None,
  aus: Sequence[int] | None = None,
) -> dict:
  """Counts per split, shapes and dtypes, statistics, and sheets of sample frames.

  Statistics (label histogram or AU base rates, frame counts, pixel mean/std) are computed on
  up to `max_examples` evenly spaced examples per split. The contact sheet (`out_png`) shows up
  to six clips of the first split, eight uniformly spaced frames each; beside it,
  `<out_png stem>_apex.png` shows what the labels look like (`apex_sheet`): a row per class
  (or per AU, numbered by `aus`) of that class's or AU's frames from the sampled examples.
  """
  builder = tfds.builder_from_directory(find_built(name, data_dir, config))
  report: dict = {
    "name": name,
    "config": builder.builder_config.name if builder.builder_config else None,
    "splits": {},
    "skipped": dict(builder.info.metadata.get("skipped", {})) if builder.info.metadata else {},
  }
  sheet_source, sheet_examples = None, []
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    if sheet_source is None:
      sheet_source = source
    count = len(source)
    entry: dict = {"num_examples": count}
    picks = np.unique(np.linspace(0, count - 1, min(count, max_examples)).astype(int))
    examples = [source[int(i)] for i in picks] if count else []
    if source is sheet_source:
      sheet_examples = examples
    if examples:
      entry["features"] = {
        key: (list(np.shape(value)), str(np.asarray(value).dtype))
        for key, value in examples[0].items()
      }
      videos = [np.asarray(e["video"]) for e in examples]
      entry["stored_frames_mean"] = float(np.mean([len(v) for v in videos]))
      entry["num_frames_mean"] = float(np.mean([int(e["num_frames"]) for e in examples]))
      pixels = np.concatenate([v[:: max(1, len(v) // 4)].reshape(-1, 3) for v in videos])
      entry["pixel_mean"] = [round(float(x), 2) for x in pixels.mean(0)]
      entry["pixel_std"] = [round(float(x), 2) for x in pixels.std(0)]
      if "label" in examples[0]:
        labels = np.array([int(e["label"]) for e in examples])
        names = class_names or [str(i) for i in range(labels.max() + 1)]
        entry["label_counts"] = {n: int((labels == i).sum()) for i, n in enumerate(names)}
      if "aus" in examples[0]:
        occurrence = np.stack([np.asarray(e["aus"]) for e in examples])
        entry["au_base_rate"] = [round(float(x), 3) for x in occurrence.mean(0)]
    report["splits"][split] = entry
  if out_png and sheet_source is not None and len(sheet_source):
    contact_sheet(sheet_source, out_png, class_names)
    report["contact_sheet"] = out_png
    apex_png = os.path.splitext(out_png)[0] + "_apex.png"
    names = apex_sheet(sheet_examples, apex_png, class_names, aus)
    if names:
      report["apex_sheet"], report["apex_rows"] = apex_png, names
  return report


def apex_frame(video: np.ndarray) -> np.ndarray:
  """The frame of a clip that differs most from its first frame (its expression's apex)."""
  video = np.asarray(video)
  change = np.abs(video.astype(np.int16) - video[:1].astype(np.int16)).mean(axis=(1, 2, 3))
  return video[int(change.argmax())]


def apex_sheet(
  examples: Sequence[dict],
  out_png: str,
  class_names: Sequence[str] | None = None,
  aus: Sequence[int] | None = None,
  per_row: int = 8,
) -> list[str]:
  """Saves a grid with one row per class (or AU) of `per_row` examples showing it.

  Clip datasets (`label`): each tile is a clip's apex frame (`apex_frame`), next to which the
  row's first tile shows that clip's first frame, so a row reads neutral -> expression.
  Action-unit datasets (`aus`, the middle frame's occurrence): each tile is the middle frame of
  a window where the AU is present. Rows with no example are left out. Returns the rows' names
  (nothing is written when there is none).
  """
  rows: list[tuple[str, list[np.ndarray]]] = []
  if examples and "label" in examples[0]:
    labels = np.array([int(e["label"]) for e in examples])
    for label in range(int(labels.max()) + 1):
      members = [e for e, lab in zip(examples, labels) if lab == label][: per_row - 1]
      if members:
        name = class_names[label] if class_names else str(label)
        first = np.asarray(members[0]["video"])[0]
        rows.append((name, [first] + [apex_frame(e["video"]) for e in members]))
  elif examples and "aus" in examples[0]:
    present = np.stack([np.asarray(e["aus"]) for e in examples]) > 0.5
    for k in range(present.shape[1]):
      members = [e for e, on in zip(examples, present[:, k]) if on][:per_row]
      if members:
        name = f"AU{aus[k]}" if aus is not None else f"AU #{k}"
        rows.append((name, [np.asarray(e["video"])[len(e["video"]) // 2] for e in members]))
  if not rows:
    return []
  side = rows[0][1][0].shape[0]
  label_width = 8 * max(len(name) for name, _ in rows) + 8
  sheet = Image.new("RGB", (label_width + per_row * side, len(rows) * side))
  draw = ImageDraw.Draw(sheet)
  for r, (name, frames) in enumerate(rows):
    draw.text((4, r * side + side // 2 - 6), name, fill=(255, 255, 0))
    for c, frame in enumerate(frames):
      sheet.paste(Image.fromarray(np.asarray(frame, np.uint8)), (label_width + c * side, r * side))
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  sheet.save(out_png)
  return [name for name, _ in rows]


def contact_sheet(
  source, out_png: str, class_names: Sequence[str] | None = None, rows: int = 6, cols: int = 8
) -> None:
  """Saves a grid of frames: one clip per row, uniformly spaced frames, label on the left."""
  count = len(source)
  picks = np.unique(np.linspace(0, count - 1, min(rows, count)).astype(int))
  tiles = []
  for i in picks:
    example = source[int(i)]
    video = np.asarray(example["video"])
    row = video[video_ops.uniform_indices(len(video), cols)]
    strip = Image.fromarray(np.concatenate(list(row), axis=1))
    draw = ImageDraw.Draw(strip)
    if "label" in example:
      label = int(example["label"])
      text = class_names[label] if class_names else str(label)
    else:
      text = "AU " + "".join(str(int(x)) for x in np.asarray(example["aus"]))
    draw.text((2, 2), text, fill=(255, 255, 0))
    tiles.append(np.asarray(strip))
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  Image.fromarray(np.concatenate(tiles, axis=0)).save(out_png)
