"""Synthetic twin of BIWI (3D audio-visual corpus) in the per-sequence form FaceFormer uses.

Layout written to `out_dir` (docs/design.md section 4), read by `data_pipelines/builders/biwi.py`:

    vertices_npy/F2_e01.npy  float32 [T, 70110] (23370 vertices x 3), 25 fps
    wav/F2_e01.wav           16 kHz mono 16-bit PCM, as long as the vertex sequence
    templates.pkl            {"F1": float32 [23370, 3], ...} neutral faces of all 14 subjects
    BIWI.ply                 template mesh with triangles (for rendering)
    regions/lips.txt         vertex indices of the lip region (one per line)
    regions/upper_face.txt   vertex indices of eyes, brows and forehead

Subjects F1-F8 and M1-M6; sentences e01-e40. Which are written depends on `size`:

- tiny: the six split subjects (F2 F3 F4 M3 M4 M5) e01, e33, e37 and the other eight e01,
  1.0-1.4 s each (26 sequences: splits of 6 / 6 / 6 / 8);
- demo: the six split subjects 8 training, 2 validation and 2 test sentences, the other eight
  e01 and e37, 1.0-1.8 s each (88 sequences, about 0.85 GB).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import soundfile

from data_pipelines.builders import biwi as biwi_builder
from data_pipelines.synthetic import talking_mesh

# Facts about the dataset live with its builder; the twin writes what the builder expects.
NUM_VERTICES = biwi_builder.NUM_VERTICES
FPS = biwi_builder.FPS
SUBJECTS = biwi_builder.SUBJECTS
SPLIT_SUBJECTS = biwi_builder.TRAIN_SUBJECTS
SAMPLE_RATE = 16000

_SIZES = {
  # size: (sentences of the six split subjects, of the other eight, duration range in seconds)
  "tiny": ((1, 33, 37), (1,), (1.0, 1.4)),
  "demo": ((*range(1, 33, 4), 33, 35, 37, 39), (1, 37), (1.0, 1.8)),
}


def sequence_name(subject: str, sentence: int) -> str:
  return f"{subject}_e{sentence:02d}"


def _seed(*keys: int) -> int:
  return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic BIWI in the per-sequence raw layout to `out_dir`."""
  if size not in _SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZES)}")
  split_sentences, other_sentences, (shortest, longest) = _SIZES[size]
  for sub in ("vertices_npy", "wav", "regions"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  rig = talking_mesh.make_rig(NUM_VERTICES, _seed(seed, 10))
  rng = np.random.default_rng(_seed(seed, 11))
  templates = {}
  for s, name in enumerate(SUBJECTS):
    subject = talking_mesh.make_subject(rig, name, _seed(seed, 12, s), female=name[0] == "F")
    templates[name] = subject.neutral
    for sentence in split_sentences if name in SPLIT_SUBJECTS else other_sentences:
      audio, vertices = talking_mesh.talking_sequence(
        rig,
        subject,
        rng.uniform(shortest, longest),
        SAMPLE_RATE,
        FPS,
        seed=_seed(seed, 13, s, sentence),
      )
      stem = sequence_name(name, sentence)
      np.save(
        os.path.join(out_dir, "vertices_npy", f"{stem}.npy"),
        vertices.reshape(vertices.shape[0], -1),  # [T, V*3]
      )
      soundfile.write(
        os.path.join(out_dir, "wav", f"{stem}.wav"), audio, SAMPLE_RATE, subtype="PCM_16"
      )
  with open(os.path.join(out_dir, "templates.pkl"), "wb") as f:
    pickle.dump(templates, f)
  first = next(iter(templates.values()))
  talking_mesh.write_template_mesh(os.path.join(out_dir, "BIWI.ply"), rig, first)
  for region, mask in (("lips", rig.lips), ("upper_face", rig.upper_face)):
    with open(os.path.join(out_dir, "regions", f"{region}.txt"), "w") as f:
      f.write(talking_mesh.region_lines(mask))
