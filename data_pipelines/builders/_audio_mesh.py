"""What the speech-to-mesh builders (VOCASET, BIWI) share: reading, validating, storing, inspecting.

A dataset module (`builders/vocaset.py`, `builders/biwi.py`) lists its raw sequences and
assigns them to splits; `AudioMeshBuilder` turns each into one example:

    audio file/pickle -> mono -> resampled to 16 kHz         -> "audio"    float32 [S]
    vertex file/rows  -> [T, V, 3] at the capture rate -> fps -> "vertices" float32 [T, V, 3]
    templates.pkl[subject]                                   -> "template" float32 [V, 3]

after checking, per docs/design.md section 6, that the audio decodes and is not empty, that every
value is finite, that the vertex count is the dataset's, and that audio and frames agree in length
within one frame. A failing example stops the build with the file and the reason, or, with
`skip_invalid`, is skipped and counted; the count is printed per split and stored in the
dataset's metadata (`skipped`). A split with no raw sequences at all (a partial download) is
left out; one whose every example is invalid stops the build. Files shared by all examples
(templates.pkl, the index pickles) are not examples: if one is unreadable or refused, the build
stops whatever `skip_invalid` says.

`subject` is the speaker's index in the dataset's training subjects (the one-hot style
condition of FaceFormer-like models) and -1 for speakers outside the training set, whose
`subject_name` still says who they are.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.builders import common
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import mesh as mesh_ops

SAMPLE_RATE = 16000  # every stored waveform is at this rate


@dataclasses.dataclass(frozen=True)
class RawSequence:
  """One raw sentence: where its parts live and how to read them."""

  key: str  # unique example key, e.g. "F2_e01"
  subject: str
  sentence: int
  audio_path: str  # the file (or file#entry) errors about the audio name
  vertices_path: str  # the file (or file#entry) errors about the vertices name
  read_audio: Callable[[], tuple[np.ndarray, int]]  # -> ([S] float32, sample rate)
  read_vertices: Callable[[], np.ndarray]  # -> [T, V, 3] at the capture rate
  # The sequence's own neutral face [V, 3], for datasets without a templates.pkl (MEAD: from
  # the clip's head-model identity); None = templates.pkl[subject].
  read_template: Callable[[], np.ndarray] | None = None
  # Further features of the dataset (`AudioMeshBuilder._extra_features`), checked by the reader.
  read_extra: Callable[[], dict] | None = None


def _read(path: str, what: str, reader: Callable):
  """Calls `reader`, turning any failure into `InvalidExample` about `path`."""
  try:
    return reader()
  except common.InvalidExample:
    raise
  except Exception as e:  # noqa: BLE001  decoders raise many kinds; all mean "unreadable".
    raise common.InvalidExample(path, f"{what} cannot be read: {type(e).__name__}: {e}") from e


class Progress:
  """A progress line on stderr for long builds: at most one line every few seconds."""

  def __init__(self, label: str, total: int, every_s: float = 5.0):
    self.label, self.total, self.every_s = label, total, every_s
    self.done = 0
    self._last = time.monotonic()

  def step(self, skipped: int) -> None:
    self.done += 1
    now = time.monotonic()
    if self.done == self.total or now - self._last >= self.every_s:
      self._last = now
      print(
        f"[{self.label}] {self.done}/{self.total} sequences, {skipped} skipped",
        file=sys.stderr,
        flush=True,
      )


class AudioMeshBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for a speech + 3D mesh dataset; subclasses say where sequences are and splits.

  The raw directory is `raw_dir` (constructor) or else the download config's `manual_dir`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Audio at 16 kHz, vertices at the dataset's fps, templates."}
  NUM_VERTICES: int
  CAPTURE_FPS: float  # frame rate of the raw vertex files
  FPS: float  # frame rate of the stored vertices
  TRAIN_SUBJECTS: tuple[str, ...]  # `subject` indexes this tuple
  DESCRIPTION: str
  HOMEPAGE: str

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the `importlib_resources` backport for packages installed from
    # source; the module's file is what it would find anyway.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, raw_dir: str | None = None, skip_invalid: bool = False, **kwargs):
    self._raw_dir = raw_dir
    self._skip_invalid = skip_invalid
    self.skipped: dict[str, list[common.InvalidExample]] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    bytes_encoding = tfds.features.Encoding.BYTES  # raw float bytes: fast to decode
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      homepage=self.HOMEPAGE,
      features=tfds.features.FeaturesDict(
        {
          **self._extra_features(),
          "audio": tfds.features.Tensor(shape=(None,), dtype=np.float32, encoding=bytes_encoding),
          "vertices": tfds.features.Tensor(
            shape=(None, self.NUM_VERTICES, 3), dtype=np.float32, encoding=bytes_encoding
          ),
          "template": tfds.features.Tensor(
            shape=(self.NUM_VERTICES, 3), dtype=np.float32, encoding=bytes_encoding
          ),
          "subject": tfds.features.Scalar(
            dtype=np.int32, doc="index into metadata train_subjects; -1: unseen"
          ),
          "subject_name": tfds.features.Text(),
          "sentence": tfds.features.Scalar(dtype=np.int32, doc="sentence number, from 1"),
          "key": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(
        sample_rate=SAMPLE_RATE,
        fps=self.FPS,
        capture_fps=self.CAPTURE_FPS,
        num_vertices=self.NUM_VERTICES,
        train_subjects=list(self.TRAIN_SUBJECTS),
        skipped={},
      ),
      disable_shuffling=True,  # examples stay in key order; pipelines shuffle themselves
    )

  @abc.abstractmethod
  def _splits(self, raw_dir: str) -> dict[str, list[RawSequence]]:
    """The raw sequences of each split."""

  @abc.abstractmethod
  def _templates_path(self, raw_dir: str) -> str | None:
    """Path of the pickle `{subject: [V, 3]}` of neutral faces; None when every sequence reads
    its own (`RawSequence.read_template`)."""

  def _extra_features(self) -> dict:
    """TFDS features beyond the shared ones, filled by each sequence's `read_extra`."""
    return {}

  def _split_generators(self, dl_manager) -> dict[str, Iterator]:
    raw_dir = self._raw_dir or os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(raw_dir):
      raise FileNotFoundError(f"raw dataset directory {raw_dir!r} does not exist")
    templates_path = self._templates_path(raw_dir)
    templates = {} if templates_path is None else mesh_ops.load_templates(templates_path)
    generators = {}
    for split, sequences in self._splits(raw_dir).items():
      if sequences:
        generators[split] = self._generate_examples(split, sequences, templates, templates_path)
      else:
        print(f"{self.name}: no raw sequences for split {split!r} in {raw_dir}; left out")
    if not generators:
      raise FileNotFoundError(f"{raw_dir}: no sequences of {self.name} found")
    return generators

  def _generate_examples(
    self,
    split: str,
    sequences: Sequence[RawSequence],
    templates: Mapping[str, np.ndarray],
    templates_path: str,
  ) -> Iterator[tuple[str, dict]]:
    validator = common.ExampleValidator(skip_invalid=self._skip_invalid)
    progress = Progress(f"{self.name} {split}", len(sequences))
    for sequence in sequences:
      with validator.validated(sequence.vertices_path):
        example = self._example(sequence, templates, templates_path)
        yield sequence.key, example
      progress.step(len(validator.skipped))
    validator.report(split)
    if len(validator.skipped) == len(sequences):
      raise ValueError(
        f"{self.name} split {split!r}: all {len(sequences)} example(s) are invalid "
        f"{validator.summary()}; nothing to write"
      )
    self.skipped[split] = list(validator.skipped)
    self.info.metadata["skipped"][split] = len(validator.skipped)

  def _example(
    self, sequence: RawSequence, templates: Mapping[str, np.ndarray], templates_path: str
  ) -> dict:
    if not sequence.subject:
      raise common.InvalidExample(
        sequence.vertices_path, "name does not follow the dataset's naming scheme"
      )
    audio, audio_rate = _read(sequence.audio_path, "audio", sequence.read_audio)
    if audio.size == 0:
      raise common.InvalidExample(sequence.audio_path, "audio is empty (0 samples)")
    common.check_finite(sequence.audio_path, "audio", audio)

    vertices = _read(sequence.vertices_path, "vertices", sequence.read_vertices)
    common.check_shape(sequence.vertices_path, "vertices", vertices, (None, self.NUM_VERTICES, 3))
    if vertices.shape[0] == 0:
      raise common.InvalidExample(sequence.vertices_path, "vertices have 0 frames")
    common.check_finite(sequence.vertices_path, "vertices", vertices)
    common.check_lengths_agree(
      sequence.audio_path, audio.shape[0], audio_rate, vertices.shape[0], self.CAPTURE_FPS
    )
    if sequence.read_template is not None:
      template_path, name = sequence.vertices_path, "template"
      template = _read(template_path, name, sequence.read_template)
    elif sequence.subject not in templates:
      raise common.InvalidExample(templates_path, f"has no template for subject {sequence.subject}")
    else:
      template_path, name = templates_path, f"template of {sequence.subject}"
      template = templates[sequence.subject]
    common.check_shape(template_path, name, template, (self.NUM_VERTICES, 3))
    common.check_finite(template_path, name, template)
    extra = {} if sequence.read_extra is None else sequence.read_extra()

    subject = (
      self.TRAIN_SUBJECTS.index(sequence.subject) if sequence.subject in self.TRAIN_SUBJECTS else -1
    )
    return {
      **extra,
      "audio": audio_ops.resample(audio, audio_rate, SAMPLE_RATE),  # [S]
      "vertices": mesh_ops.downsample_fps(vertices, self.CAPTURE_FPS, self.FPS),  # [T, V, 3]
      "template": template,  # [V, 3]
      "subject": np.int32(subject),
      "subject_name": sequence.subject,
      "sentence": np.int32(sequence.sentence),
      "key": sequence.key,
    }


def per_sequence_files(
  raw_dir: str, parse: Callable[[str], tuple[str, int] | None]
) -> list[RawSequence]:
  """Sequences in the per-sequence form: `vertices_npy/<stem>.npy` with `wav/<stem>.wav`.

  `parse(stem)` gives `(subject, sentence)`, or None for a name that is not a sequence (which
  is then an invalid example with an empty `subject`, reported like any other).
  """
  vertices_dir = os.path.join(raw_dir, "vertices_npy")
  if not os.path.isdir(vertices_dir):
    raise FileNotFoundError(f"{vertices_dir}: no such directory (expected per-sequence .npy files)")
  sequences = []
  for filename in sorted(os.listdir(vertices_dir)):
    if not filename.endswith(".npy"):
      continue
    stem = filename[: -len(".npy")]
    vertices_path = os.path.join(vertices_dir, filename)
    audio_path = os.path.join(raw_dir, "wav", stem + ".wav")
    parsed = parse(stem)
    sequences.append(
      RawSequence(
        key=stem,
        subject=parsed[0] if parsed else "",
        sentence=parsed[1] if parsed else 0,
        audio_path=audio_path,
        vertices_path=vertices_path,
        read_audio=_wav_reader(audio_path),
        read_vertices=_npy_reader(vertices_path),
      )
    )
  return sequences


def _wav_reader(path: str) -> Callable[[], tuple[np.ndarray, int]]:
  def read() -> tuple[np.ndarray, int]:
    if not os.path.exists(path):
      raise common.InvalidExample(path, "audio file is missing")
    return audio_ops.read_audio(path)

  return read


def _npy_reader(path: str) -> Callable[[], np.ndarray]:
  return lambda: mesh_ops.load_vertices_npy(path)


def build(
  builder_cls: type[AudioMeshBuilder], raw_dir: str, data_dir: str, skip_invalid: bool
) -> dict[str, int]:
  """Builds (or rebuilds) the dataset from `raw_dir` into `data_dir`; returns split sizes."""
  builder = builder_cls(
    data_dir=data_dir, raw_dir=raw_dir, skip_invalid=skip_invalid, file_format="array_record"
  )
  tfds.display_progress_bar(False)  # `Progress` prints a plainer line with the skip count
  try:
    with common.shuffler_without_tensorflow():
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
          manual_dir=raw_dir, download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
        )
      )
  finally:
    tfds.display_progress_bar(True)
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  skipped = sum(len(s) for s in builder.skipped.values())
  print(f"{builder.name}: built {sizes} into {data_dir}; skipped {skipped} invalid example(s)")
  return sizes


def inspect_dataset(name: str, data_dir: str, out_png: str | None, max_examples: int = 16) -> dict:
  """Counts per split, shapes and a few statistics of a built dataset; optionally a motion plot.

  Statistics come from up to `max_examples` examples per split, spread evenly over it.
  """
  info = tfds.builder(name, data_dir=data_dir).info
  metadata = dict(info.metadata or {})
  fps, sample_rate = float(metadata["fps"]), int(metadata["sample_rate"])
  report: dict = {
    "dataset": name,
    "version": str(info.version),
    "fps": fps,
    "sample_rate": sample_rate,
    "num_vertices": int(metadata["num_vertices"]),
    "skipped": dict(metadata.get("skipped", {})),
    "features": _describe(info.features),
    "splits": {},
  }
  plotted = None
  for split in info.splits:
    source = tfds.data_source(name, data_dir=data_dir, split=split)
    count = len(source)
    stats: dict = {"num_examples": count}
    if count:
      indices = sorted(set(np.linspace(0, count - 1, min(count, max_examples)).astype(int)))
      examples = [source[int(i)] for i in indices]
      frames = np.array([e["vertices"].shape[0] for e in examples])
      mismatch = [
        abs(e["audio"].shape[0] * fps / sample_rate - e["vertices"].shape[0]) for e in examples
      ]
      motion_mm = np.concatenate(
        [
          1000 * np.linalg.norm(e["vertices"] - e["template"], axis=-1).reshape(-1)
          for e in examples
        ]
      )
      stats.update(
        sampled=len(examples),
        subjects=sorted({_text(e["subject_name"]) for e in examples}),
        frames_min=int(frames.min()),
        frames_mean=float(frames.mean()),
        frames_max=int(frames.max()),
        seconds_mean=float(frames.mean() / fps),
        audio_frame_mismatch_max=float(max(mismatch)),
        motion_mm_mean=float(motion_mm.mean()),
        motion_mm_p99=float(np.percentile(motion_mm, 99)),
        audio_rms=float(np.sqrt(np.mean(np.concatenate([e["audio"] for e in examples]) ** 2))),
      )
      plotted = plotted or examples[0]
    report["splits"][split] = stats
  if out_png and plotted is not None:
    _plot_motion(plotted, fps, sample_rate, out_png, title=f"{name}: {_text(plotted['key'])}")
    report["plot"] = out_png
  return report


def _describe(features) -> dict:
  """`{name: "shape dtype"}` of a FeaturesDict, nested dicts (MEAD's `flame`) as dicts."""
  return {
    k: _describe(v)
    if isinstance(v, tfds.features.FeaturesDict)
    else f"{v.shape} {np.dtype(v.np_dtype).name}"
    for k, v in features.items()
  }


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _plot_motion(example: dict, fps: float, sample_rate: int, out_png: str, title: str) -> None:
  """Audio, the motion of the most mobile vertices over time, and where the face moves."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  motion = np.linalg.norm(example["vertices"] - example["template"], axis=-1) * 1000  # [T, V] mm
  mobile = np.argsort(motion.std(axis=0))[-50:]
  figure = Figure(figsize=(12, 6))
  FigureCanvasAgg(figure)
  grid = figure.add_gridspec(2, 3)
  top, middle = figure.add_subplot(grid[0, :2]), figure.add_subplot(grid[1, :2])
  right = figure.add_subplot(grid[:, 2])
  audio = example["audio"]
  top.plot(np.arange(audio.shape[0]) / sample_rate, audio, linewidth=0.5)
  top.set(title=title, ylabel="audio")
  seconds = np.arange(motion.shape[0]) / fps
  middle.plot(seconds, motion[:, mobile].mean(axis=1), label="50 most mobile vertices")
  middle.plot(seconds, motion.mean(axis=1), label="all vertices")
  middle.set(xlabel="seconds", ylabel="displacement (mm)", xlim=top.get_xlim())
  middle.legend(loc="upper right")
  shown = slice(None, None, max(1, motion.shape[1] // 6000))  # enough points to see the face
  template, spread = example["template"][shown], motion.std(axis=0)[shown]
  points = right.scatter(template[:, 0], template[:, 1], c=spread, s=2, cmap="viridis")
  right.set(aspect="equal", title="motion std (mm) on the template", xlabel="x (m)", ylabel="y (m)")
  figure.colorbar(points, ax=right, orientation="horizontal")
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  figure.savefig(out_png, dpi=80)
