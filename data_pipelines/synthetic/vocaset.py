"""Synthetic twin of VOCASET: writes the raw files of the real download, filled by `talking_mesh`.

Layout written to `out_dir` (docs/design.md section 4; the same names, types and shapes as the
release that `data_pipelines/builders/vocaset.py` reads):

    data_verts.npy          float32 [N, 5023, 3], every captured frame of every sequence, 60 fps
    subj_seq_to_idx.pkl     {subject: {"sentenceXX": {frame: row of data_verts}}}
    raw_audio_fixed.pkl     {subject: {"sentenceXX": {"audio": float32 [S], "sample_rate": int}}}
    templates.pkl           {subject: float32 [5023, 3]} neutral faces
    FLAME_sample.ply        template mesh with triangles (for rendering)
    regions/lips.txt        vertex indices of the lip region (one per line)
    regions/upper_face.txt  vertex indices of eyes, brows and forehead

The audio sample rate differs between subjects (22 kHz or 44.1 kHz, as real recordings vary), so
the builder's resampling to 16 kHz is exercised. The subjects are the real 12 with the split
used by VOCA and FaceFormer; which sentences are written depends on `size`:

- tiny: every subject, sentence01 and sentence21, 1.0-1.4 s each (24 sequences; splits of
  16 / 2 / 2 after the split rule drops the held-out subjects' sentence01);
- demo: training subjects 14 sentences, the others 10 of sentences 21-40, 1-2 s each
  (152 sequences, about 0.85 GB).
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from data_pipelines.builders import vocaset as vocaset_builder
from data_pipelines.synthetic import talking_mesh

# Facts about the dataset live with its builder; the twin writes what the builder expects.
NUM_VERTICES = vocaset_builder.NUM_VERTICES
CAPTURE_FPS = vocaset_builder.CAPTURE_FPS
TRAIN_SUBJECTS = vocaset_builder.TRAIN_SUBJECTS
SUBJECTS = vocaset_builder.SUBJECTS

_SIZES = {
  # size: (sentences of training subjects, of held-out subjects, duration range in seconds)
  "tiny": ((1, 21), (1, 21), (1.0, 1.4)),
  "demo": (tuple(range(1, 41, 3)), tuple(range(21, 41, 2)), (1.0, 2.0)),
}


def sentence_name(sentence: int) -> str:
  return f"sentence{sentence:02d}"


def _seed(*keys: int) -> int:
  return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic VOCASET in the raw layout of the real download to `out_dir`."""
  if size not in _SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZES)}")
  train_sentences, held_out_sentences, (shortest, longest) = _SIZES[size]
  os.makedirs(os.path.join(out_dir, "regions"), exist_ok=True)
  rig = talking_mesh.make_rig(NUM_VERTICES, _seed(seed, 0))
  rng = np.random.default_rng(_seed(seed, 1))

  plan = []  # (subject index, subject, sentence, number of 60 fps frames, sample rate)
  for s, name in enumerate(SUBJECTS):
    sample_rate = 22000 if s % 2 else 44100
    sentences = train_sentences if name in TRAIN_SUBJECTS else held_out_sentences
    for sentence in sentences:
      num_frames = int(round(rng.uniform(shortest, longest) * CAPTURE_FPS))
      plan.append((s, name, sentence, num_frames, sample_rate))

  total_rows = sum(p[3] for p in plan)
  data_verts = np.lib.format.open_memmap(
    os.path.join(out_dir, "data_verts.npy"),
    mode="w+",
    dtype=np.float32,
    shape=(total_rows, NUM_VERTICES, 3),
  )  # [N, V, 3]
  subjects = {
    name: talking_mesh.make_subject(rig, name, _seed(seed, 2, s), female=s % 3 == 0)
    for s, name in enumerate(SUBJECTS)
  }
  seq_to_idx: dict[str, dict[str, dict[int, int]]] = {name: {} for name in SUBJECTS}
  raw_audio: dict[str, dict[str, dict]] = {name: {} for name in SUBJECTS}
  row = 0
  for s, name, sentence, num_frames, sample_rate in plan:
    audio, vertices = talking_mesh.talking_sequence(
      rig,
      subjects[name],
      num_frames / CAPTURE_FPS,
      sample_rate,
      CAPTURE_FPS,
      seed=_seed(seed, 3, s, sentence),
    )
    data_verts[row : row + num_frames] = vertices
    seq_to_idx[name][sentence_name(sentence)] = {f: row + f for f in range(num_frames)}
    raw_audio[name][sentence_name(sentence)] = {"audio": audio, "sample_rate": sample_rate}
    row += num_frames
  data_verts.flush()
  del data_verts

  templates = {name: subject.neutral for name, subject in subjects.items()}
  for filename, content in (
    ("subj_seq_to_idx.pkl", seq_to_idx),
    ("raw_audio_fixed.pkl", raw_audio),
    ("templates.pkl", templates),
  ):
    with open(os.path.join(out_dir, filename), "wb") as f:
      pickle.dump(content, f, protocol=2)
  first = next(iter(templates.values()))
  talking_mesh.write_template_mesh(os.path.join(out_dir, "FLAME_sample.ply"), rig, first)
  for region, mask in (("lips", rig.lips), ("upper_face", rig.upper_face)):
    with open(os.path.join(out_dir, "regions", f"{region}.txt"), "w") as f:
      f.write(talking_mesh.region_lines(mask))
