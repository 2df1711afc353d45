"""TFDS builder for MEAD (Wang et al., ECCV 2020) with per-frame FLAME parameters, as EMOTE trains.

MEAD: 60 actors speaking with 8 emotions at 3 intensities (neutral at one), filmed; EMOTE (Danecek
et al. 2023) trains on pseudo-ground-truth FLAME parameters reconstructed per frame from the
25 fps front videos. This builder reads the actors' audio and those parameters, provided as
files (docs/design.md sections 4 and 18):

    <actor>/audio/<emotion>/level_<k>/<NNN>.wav   mono audio (MEAD ships .m4a: extract .wav)
    <actor>/flame/<emotion>/level_<k>/<NNN>.npz   per clip, 25 fps:
        expression [T, E]  float   expression coefficients (E <= the model's; EMICA: 50)
        jaw_pose   [T, 3]  float   jaw axis-angle
        shape      [S]     float   identity coefficients (S <= the model's)
        optional: global_pose [T, 3], neck_pose [T, 3], eye_pose [T, 6], translation [T, 3]
    head_model/generic_model.pkl                  the FLAME model the parameters belong to
    regions/lips.txt, regions/upper_face.txt      vertex indices (FLAME topology)

`<emotion>` is one of `EMOTIONS` and `<k>` 1-3. Each clip becomes one example whose vertices
are the parameters decoded through the head model (`fdjax.models.flame.flame_forward`) and whose
template is its identity at zero expression and pose. Splits are EMOTE's, by actor: 32
training, 7 validation and 8 test actors (`TRAIN_SUBJECTS`, `VALIDATION_SUBJECTS`,
`TEST_SUBJECTS`).

Features of each example, besides those of every speech-mesh builder (audio, vertices,
template, subject, subject_name, sentence, key; `_audio_mesh.py`):

    emotion    int32                index into EMOTIONS
    intensity  int32                level - 1 (0, 1, 2)
    flame      shape [S], expression [T, E], pose [T, 15], translation [T, 3] float32

A parameter file that is unreadable (truncated, not an .npz, pickled), lacks a key, has
non-finite values or frame counts that disagree stops the build naming the file and the reason
(or is skipped and counted under `skip_invalid`).
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import _audio_mesh, common

NUM_VERTICES = 5023
FPS = 25  # EMOTE resamples MEAD's 30 fps video to 25 fps before reconstructing
# DESIGN.md's order; `emotion` indexes this tuple.
EMOTIONS = ("neutral", "angry", "contempt", "disgusted", "fear", "happy", "sad", "surprised")
LEVELS = (1, 2, 3)
# EMOTE's split of the MEAD actors.
TRAIN_SUBJECTS = (
  *("M003", "M005", "M007", "M009", "M011", "M012", "M013", "M019", "M022", "M023", "M024"),
  *("M025", "M026", "M027", "M028", "M029", "M030", "M031", "W009", "W011", "W014", "W015"),
  *("W016", "W018", "W019", "W021", "W023", "W024", "W025", "W026", "W028", "W029"),
)
VALIDATION_SUBJECTS = ("M032", "M033", "M034", "M035", "W033", "W035", "W036")
TEST_SUBJECTS = ("M037", "M039", "M040", "M041", "M042", "W037", "W038", "W040")
HEAD_MODEL = os.path.join("head_model", "generic_model.pkl")
POSE_PARTS = (("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6))
_CLIP = re.compile(
  r"^(?P<actor>[^/]+)/flame/(?P<emotion>[a-z]+)/level_(?P<level>\d)/(?P<n>\d+)\.npz$"
)
_DECODE_CHUNK = 32  # frames decoded per call (one compilation whatever the clip lengths)


def split_of(actor: str) -> str | None:
  if actor in TRAIN_SUBJECTS:
    return "train"
  if actor in VALIDATION_SUBJECTS:
    return "validation"
  if actor in TEST_SUBJECTS:
    return "test"
  return None


def read_parameters(path: str, num_frames: int | None = None) -> dict[str, np.ndarray]:
  """One clip's parameter file -> `flame` {shape [S], expression [T, E], pose [T, 15],
  translation [T, 3]} float32, checked; `InvalidExample` naming the file otherwise."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      content = {k: np.asarray(archive[k]) for k in archive.files}
  except Exception as e:  # noqa: BLE001  a stranger's file: name it, one line
    raise common.InvalidExample(path, f"not a readable .npz ({type(e).__name__}: {e})") from e
  for key in ("expression", "jaw_pose", "shape"):
    if key not in content:
      raise common.InvalidExample(path, f"missing {key!r}; has {sorted(content)}")
  expression = content["expression"]
  if expression.ndim != 2 or not len(expression) or expression.dtype.kind not in "fiu":
    raise common.InvalidExample(path, f"expression must be [T, E] numbers, got {expression.shape}")
  frames = expression.shape[0]
  parts = []
  for key, size in POSE_PARTS:
    value = content.get(key, np.zeros((frames, size)))
    common.check_shape(path, key, value, (frames, size))
    parts.append(value)
  translation = content.get("translation", np.zeros((frames, 3)))
  common.check_shape(path, "translation", translation, (frames, 3))
  shape = content["shape"]
  if shape.ndim != 1:
    raise common.InvalidExample(path, f"shape must be [S], got {shape.shape}")
  flame = {
    "shape": shape,
    "expression": expression,
    "pose": np.concatenate(parts, axis=1),
    "translation": translation,
  }
  for key, value in flame.items():
    if value.dtype.kind not in "fiu":
      raise common.InvalidExample(path, f"{key} is {value.dtype}, not numbers")
    common.check_finite(path, key, value)
  return {k: v.astype(np.float32) for k, v in flame.items()}


@functools.cache
def _decoder(model_path: str):
  """`decode(flame) -> (vertices [T, V, 3], template [V, 3])` through the head model at
  `model_path`, `_DECODE_CHUNK` frames per compiled call (one compilation for every length)."""
  import jax

  from fdjax.models import flame as flame_model

  model = flame_model.load_flame(model_path)
  sizes = {"shape": model.shape_basis.shape[-1], "expression": model.expression_basis.shape[-1]}
  # The model is an argument, not a constant of the compiled function (XLA would fold it).
  forward = jax.jit(
    lambda model, shape, expression, pose, translation: (
      flame_model.flame_forward(model, shape[None], expression, pose, translation).vertices
    )
  )

  def decode(flame: dict) -> tuple[np.ndarray, np.ndarray]:
    for key, size in sizes.items():
      if flame[key].shape[-1] > size:
        raise ValueError(f"{flame[key].shape[-1]} {key} coefficients; the head model has {size}")
    # Zero-padded to the model's components and to whole chunks of frames.
    shape = np.pad(flame["shape"], (0, sizes["shape"] - flame["shape"].shape[0]))
    frames = flame["expression"].shape[0]
    padded = -(-frames // _DECODE_CHUNK) * _DECODE_CHUNK
    per_frame = [
      np.pad(
        flame["expression"],
        ((0, padded - frames), (0, sizes["expression"] - flame["expression"].shape[1])),
      ),
      np.pad(flame["pose"], ((0, padded - frames), (0, 0))),
      np.pad(flame["translation"], ((0, padded - frames), (0, 0))),
    ]
    chunks = [
      np.asarray(forward(model, shape, *(a[i : i + _DECODE_CHUNK] for a in per_frame)))
      for i in range(0, padded, _DECODE_CHUNK)
    ]
    template = flame_model.blend_shapes(model, shape, np.zeros(0, np.float32))
    return np.concatenate(chunks)[:frames], np.asarray(template)

  return decode


class Mead(_audio_mesh.AudioMeshBuilder):
  """MEAD: emotional speech of 47 actors with per-frame FLAME parameters, 25 fps."""

  NUM_VERTICES = NUM_VERTICES
  CAPTURE_FPS = FPS
  FPS = FPS
  TRAIN_SUBJECTS = TRAIN_SUBJECTS
  DESCRIPTION = __doc__
  HOMEPAGE = "https://wywu.github.io/projects/MEAD/MEAD.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download MEAD, extract each clip's audio as <actor>/audio/<emotion>/level_<k>/<NNN>.wav, "
    "reconstruct per-frame FLAME parameters (e.g. EMOTE's EMICA pseudo-ground truth) as "
    "<actor>/flame/<emotion>/level_<k>/<NNN>.npz (expression, jaw_pose, shape), and put the "
    f"FLAME model they belong to at {HEAD_MODEL} and the region masks in regions/."
  )

  def _templates_path(self, raw_dir: str) -> None:
    return None  # every clip's template comes from its own identity

  def _extra_features(self) -> dict:
    vector = functools.partial(
      tfds.features.Tensor, dtype=np.float32, encoding=tfds.features.Encoding.BYTES
    )
    return {
      "emotion": tfds.features.Scalar(dtype=np.int32, doc="index into metadata emotions"),
      "intensity": tfds.features.Scalar(dtype=np.int32, doc="level - 1"),
      "flame": tfds.features.FeaturesDict(
        {
          "shape": vector(shape=(None,)),
          "expression": vector(shape=(None, None)),
          "pose": vector(shape=(None, 15)),
          "translation": vector(shape=(None, 3)),
        }
      ),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata["emotions"] = list(EMOTIONS)
    return info

  def _splits(self, raw_dir: str) -> dict[str, list[_audio_mesh.RawSequence]]:
    model_path = os.path.join(raw_dir, HEAD_MODEL)
    if not os.path.exists(model_path):
      raise FileNotFoundError(
        f"{model_path}: the FLAME model the parameters belong to is needed to decode them"
      )
    splits: dict[str, list[_audio_mesh.RawSequence]] = {"train": [], "validation": [], "test": []}
    for actor in sorted(os.listdir(raw_dir)):
      flame_dir = os.path.join(raw_dir, actor, "flame")
      if not os.path.isdir(flame_dir):
        continue
      for root, _, files in sorted(os.walk(flame_dir)):
        for filename in sorted(files):
          path = os.path.join(root, filename)
          relative = os.path.relpath(path, raw_dir).replace(os.sep, "/")
          match = _CLIP.match(relative)
          valid = bool(match) and match["emotion"] in EMOTIONS and int(match["level"]) in LEVELS
          split = split_of(actor) if valid else "train"  # misnamed files: reported in train
          if split is None:
            continue
          splits[split].append(_sequence(raw_dir, relative, match if valid else None, model_path))
    return splits


def _sequence(raw_dir: str, relative: str, match, model_path: str) -> _audio_mesh.RawSequence:
  path = os.path.join(raw_dir, relative)
  audio_path = os.path.join(
    raw_dir, relative.replace("/flame/", "/audio/", 1).removesuffix(".npz") + ".wav"
  )

  @functools.cache
  def decoded():
    flame = read_parameters(path)
    try:
      vertices, template = _decoder(model_path)(flame)
    except ValueError as e:
      raise common.InvalidExample(path, str(e)) from e
    return flame, vertices, template

  def extra() -> dict:
    flame = decoded()[0]
    return {
      "emotion": np.int32(EMOTIONS.index(match["emotion"])),
      "intensity": np.int32(int(match["level"]) - 1),
      "flame": flame,
    }

  read_wav = _audio_mesh._wav_reader(audio_path)
  return _audio_mesh.RawSequence(
    key=relative.removesuffix(".npz").replace("/flame/", "_").replace("/", "_"),
    subject=match["actor"] if match else "",
    sentence=int(match["n"]) if match else 0,
    audio_path=audio_path,
    vertices_path=path,
    read_audio=read_wav,
    read_vertices=lambda: decoded()[1],
    read_template=lambda: decoded()[2],
    read_extra=extra,
  )


def build(raw_dir: str, data_dir: str, skip_invalid: bool = False) -> dict[str, int]:
  """Builds MEAD from `raw_dir` into `data_dir` (array_record); returns split sizes."""
  return _audio_mesh.build(Mead, raw_dir, data_dir, skip_invalid)


def inspect(data_dir: str, out_png: str | None = None) -> dict:
  """Counts per split, shapes, statistics and (with `out_png`) a plot of sample mesh motion."""
  return _audio_mesh.inspect_dataset("mead", data_dir, out_png)
