"""TFDS builder for BIWI (Fanelli et al., 2010) as used by FaceFormer: 14 speakers, 25 fps.

Reads the per-sequence form (docs/design.md section 4): `vertices_npy/F2_e01.npy` [T, 70110]
(23370 vertices x 3), `wav/F2_e01.wav`, and `templates.pkl` ({"F2": [23370, 3], ...}, read with
the restricted unpickler). Vertices are stored at their 25 fps; audio is resampled to 16 kHz.

Splits (FaceFormer's): train = F2 F3 F4 M3 M4 M5 x e01-e32; validation = the same six x
e33-e36; test (BIWI-Test-A) = the same six x e37-e40; test_b (BIWI-Test-B) = the other eight
speakers (F1 F5 F6 F7 F8 M1 M2 M6) x all sentences. `subject` indexes `TRAIN_SUBJECTS` and is -1
for the eight test_b speakers, who are never seen in training.

Features of each example:

    audio         float32 [S]           mono, 16 kHz, not normalised
    vertices      float32 [T, 23370, 3] 25 fps; frame t <-> audio [t*16000/25, (t+1)*16000/25)
    template      float32 [23370, 3]    the speaker's neutral face
    subject       int32                 index into TRAIN_SUBJECTS, -1 for other speakers
    subject_name  text                  "F2"
    sentence      int32                 1..40
    key           text                  "F2_e01"

Build with `build(raw_dir, data_dir)`; read with
`tfds.data_source("biwi", data_dir=data_dir, split="test_b")`.
"""

from __future__ import annotations

import os
import re

from data_pipelines.builders import _audio_mesh

NUM_VERTICES = 23370
FPS = 25
TRAIN_SUBJECTS = ("F2", "F3", "F4", "M3", "M4", "M5")
SUBJECTS = tuple(f"F{i}" for i in range(1, 9)) + tuple(f"M{i}" for i in range(1, 7))
TEST_B_SUBJECTS = tuple(s for s in SUBJECTS if s not in TRAIN_SUBJECTS)

_SEQUENCE_NAME = re.compile(r"^(?P<subject>[FM]\d+)_e(?P<sentence>\d+)$")


def split_of(subject: str, sentence: int) -> str | None:
  """The split a (subject, sentence) belongs to, or None if it is in none."""
  if not 1 <= sentence <= 40:
    return None
  if subject in TEST_B_SUBJECTS:
    return "test_b"
  if subject not in TRAIN_SUBJECTS:
    return None
  if sentence <= 32:
    return "train"
  return "validation" if sentence <= 36 else "test"


def _parse_stem(stem: str) -> tuple[str, int] | None:
  match = _SEQUENCE_NAME.match(stem)
  return (match["subject"], int(match["sentence"])) if match else None


class Biwi(_audio_mesh.AudioMeshBuilder):
  """BIWI 3D audio-visual corpus: 14 speakers, 23370-vertex meshes at 25 fps, speaker splits."""

  NUM_VERTICES = NUM_VERTICES
  CAPTURE_FPS = FPS
  FPS = FPS
  TRAIN_SUBJECTS = TRAIN_SUBJECTS
  DESCRIPTION = __doc__
  HOMEPAGE = "https://data.vision.ee.ethz.ch/cvl/datasets/b3dac2.en.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request the BIWI 3D audiovisual corpus, convert it to the per-sequence form "
    "(vertices_npy/F2_e01.npy, wav/F2_e01.wav, templates.pkl) as FaceFormer describes, and "
    "point the builder at that directory."
  )

  def _templates_path(self, raw_dir: str) -> str:
    return os.path.join(raw_dir, "templates.pkl")

  def _splits(self, raw_dir: str) -> dict[str, list[_audio_mesh.RawSequence]]:
    splits: dict[str, list[_audio_mesh.RawSequence]] = {
      "train": [],
      "validation": [],
      "test": [],
      "test_b": [],
    }
    for sequence in _audio_mesh.per_sequence_files(raw_dir, _parse_stem):
      # Badly named files go to train, where the validator reports them.
      split = split_of(sequence.subject, sequence.sentence) if sequence.subject else "train"
      if split:
        splits[split].append(sequence)
    return splits


def build(raw_dir: str, data_dir: str, skip_invalid: bool = False) -> dict[str, int]:
  """Builds BIWI from `raw_dir` into `data_dir` (array_record); returns split sizes."""
  return _audio_mesh.build(Biwi, raw_dir, data_dir, skip_invalid)


def inspect(data_dir: str, out_png: str | None = None) -> dict:
  """Counts per split, shapes, statistics and (with `out_png`) a plot of sample mesh motion."""
  return _audio_mesh.inspect_dataset("biwi", data_dir, out_png)
