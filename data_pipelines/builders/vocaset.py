"""TFDS builder for VOCASET (Cudeiro et al., CVPR 2019): 12 speakers, FLAME meshes, 60 -> 30 fps.

Reads the raw directory in either form (docs/design.md section 4):

- the release: `data_verts.npy` [N, 5023, 3] with `subj_seq_to_idx.pkl`
  ({subject: {"sentenceXX": {frame: row}}}) and `raw_audio_fixed.pkl`
  ({subject: {"sentenceXX": {"audio", "sample_rate"}}});
- the per-sequence form made from it by FaceFormer's preprocessing:
  `vertices_npy/<subject>_sentenceXX.npy` [T, 15069] and `wav/<subject>_sentenceXX.wav`;

plus `templates.pkl` ({subject: [5023, 3]}) in both. Pickles are read with the restricted
unpickler. Vertices are captured at 60 fps and stored at 30 (every second frame), as every
published model uses them; audio is stored at 16 kHz.

Splits (VOCA's, used by FaceFormer, CodeTalker, SelfTalk): train = the 8 training subjects x
sentences 1-40; validation = FaceTalk_170811_03275_TA, FaceTalk_170908_03277_TA x 21-40;
test = FaceTalk_170809_00138_TA, FaceTalk_170731_00024_TA x 21-40. Sentences 1-20 of the
held-out subjects are in no split. `subject` indexes `TRAIN_SUBJECTS` and is -1 for the four
held-out speakers.

Features of each example:

    audio         float32 [S]          mono, 16 kHz, not normalised
    vertices      float32 [T, 5023, 3] metres, 30 fps; frame t <-> audio [t*16000/30, (t+1)*...)
    template      float32 [5023, 3]    the speaker's neutral face
    subject       int32                index into TRAIN_SUBJECTS, -1 for other speakers
    subject_name  text                 e.g. "FaceTalk_170725_00137_TA"
    sentence      int32                1..40
    key           text                 "<subject>_sentenceXX"

Build with `build(raw_dir, data_dir)`; read with
`tfds.data_source("vocaset", data_dir=data_dir, split="train")`.
"""

from __future__ import annotations

import os
import re

from data_pipelines.builders import _audio_mesh, common
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import mesh as mesh_ops
from data_pipelines.ops import safe_pickle

NUM_VERTICES = 5023
CAPTURE_FPS = 60
FPS = 30
TRAIN_SUBJECTS = (
  "FaceTalk_170728_03272_TA",
  "FaceTalk_170904_00128_TA",
  "FaceTalk_170725_00137_TA",
  "FaceTalk_170915_00223_TA",
  "FaceTalk_170811_03274_TA",
  "FaceTalk_170913_03279_TA",
  "FaceTalk_170904_03276_TA",
  "FaceTalk_170912_03278_TA",
)
VALIDATION_SUBJECTS = ("FaceTalk_170811_03275_TA", "FaceTalk_170908_03277_TA")
TEST_SUBJECTS = ("FaceTalk_170809_00138_TA", "FaceTalk_170731_00024_TA")
SUBJECTS = TRAIN_SUBJECTS + VALIDATION_SUBJECTS + TEST_SUBJECTS

_SEQUENCE_NAME = re.compile(r"^(?P<subject>.+)_sentence(?P<sentence>\d+)$")


def split_of(subject: str, sentence: int) -> str | None:
  """The split a (subject, sentence) belongs to, or None if it is in none."""
  if subject in TRAIN_SUBJECTS and 1 <= sentence <= 40:
    return "train"
  if subject in VALIDATION_SUBJECTS and 21 <= sentence <= 40:
    return "validation"
  if subject in TEST_SUBJECTS and 21 <= sentence <= 40:
    return "test"
  return None


def _parse_stem(stem: str) -> tuple[str, int] | None:
  match = _SEQUENCE_NAME.match(stem)
  return (match["subject"], int(match["sentence"])) if match else None


class Vocaset(_audio_mesh.AudioMeshBuilder):
  """VOCASET: speech and FLAME meshes of 12 speakers, 30 fps, with VOCA's speaker splits."""

  NUM_VERTICES = NUM_VERTICES
  CAPTURE_FPS = CAPTURE_FPS
  FPS = FPS
  TRAIN_SUBJECTS = TRAIN_SUBJECTS
  DESCRIPTION = __doc__
  HOMEPAGE = "https://voca.is.tue.mpg.de/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Request VOCASET from https://voca.is.tue.mpg.de/ and put data_verts.npy, "
    "raw_audio_fixed.pkl, templates.pkl and subj_seq_to_idx.pkl (or the per-sequence "
    "vertices_npy/ and wav/ folders with templates.pkl) in the raw directory."
  )

  def _templates_path(self, raw_dir: str) -> str:
    return os.path.join(raw_dir, "templates.pkl")

  def _splits(self, raw_dir: str) -> dict[str, list[_audio_mesh.RawSequence]]:
    if os.path.exists(os.path.join(raw_dir, "data_verts.npy")):
      sequences = _packed_sequences(raw_dir)
    else:
      sequences = _audio_mesh.per_sequence_files(raw_dir, _parse_stem)
    splits: dict[str, list[_audio_mesh.RawSequence]] = {"train": [], "validation": [], "test": []}
    for sequence in sequences:
      # Badly named files go to train, where the validator reports them.
      split = split_of(sequence.subject, sequence.sentence) if sequence.subject else "train"
      if split:
        splits[split].append(sequence)
    return splits


def _packed_sequences(raw_dir: str) -> list[_audio_mesh.RawSequence]:
  """The sequences of the release's packed files, in subject and sentence order."""
  verts_path = os.path.join(raw_dir, "data_verts.npy")
  index_path = os.path.join(raw_dir, "subj_seq_to_idx.pkl")
  audio_path = os.path.join(raw_dir, "raw_audio_fixed.pkl")
  data_verts = mesh_ops.load_packed_vertices(verts_path)  # [N, V, 3], memory-mapped
  index = mesh_ops.load_vocaset_index(index_path)
  raw_audio = safe_pickle.load_pickle(audio_path)
  sequences = []
  for subject in sorted(index):
    for sentence_name in sorted(index[subject]):
      entry = f"{subject}/{sentence_name}"
      match = re.fullmatch(r"sentence(\d+)", sentence_name)
      sequences.append(
        _audio_mesh.RawSequence(
          key=f"{subject}_{sentence_name}",
          subject=subject if match else "",  # reported as badly named
          sentence=int(match[1]) if match else 0,
          audio_path=f"{audio_path}#{entry}",
          vertices_path=f"{verts_path}#{entry}",
          read_audio=_pickled_audio_reader(raw_audio, subject, sentence_name, audio_path),
          read_vertices=_rows_reader(data_verts, index[subject][sentence_name]),
        )
      )
  return sequences


def _pickled_audio_reader(raw_audio, subject: str, sentence: str, path: str):
  def read():
    entry = raw_audio.get(subject, {}).get(sentence) if isinstance(raw_audio, dict) else None
    if not isinstance(entry, dict) or "audio" not in entry or "sample_rate" not in entry:
      raise common.InvalidExample(f"{path}#{subject}/{sentence}", "no audio for this sequence")
    return audio_ops.to_mono(entry["audio"]), int(entry["sample_rate"])

  return read


def _rows_reader(data_verts, frame_to_row):
  return lambda: mesh_ops.packed_sequence(data_verts, frame_to_row)


def build(raw_dir: str, data_dir: str, skip_invalid: bool = False) -> dict[str, int]:
  """Builds VOCASET from `raw_dir` into `data_dir` (array_record); returns split sizes."""
  return _audio_mesh.build(Vocaset, raw_dir, data_dir, skip_invalid)


def inspect(data_dir: str, out_png: str | None = None) -> dict:
  """Counts per split, shapes, statistics and (with `out_png`) a plot of sample mesh motion."""
  return _audio_mesh.inspect_dataset("vocaset", data_dir, out_png)
