"""Synthetic twin of BP4D-Spontaneous (41 subjects x 8 tasks, frame-level AU occurrence).

Writes the 2D frames and the FACS occurrence coding, in kind:

    <out_dir>/BP4D-training/F001/T1/0100.jpg ...   frames named by frame number
    <out_dir>/AUCoding/AU_OCC/F001_T1.csv ...      occurrence per coded frame

An occurrence CSV has a header `0,1,2,...,99`: column `0` is the frame number and column `n`
the occurrence of AU n (1 present, 0 absent, 9 not coded). Only the coded stretch of a task
is listed, so some frames have images but no labels, as in the real set; a few coded frames
carry 9 for one of the twelve benchmark AUs (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24), and
every other AU column is 9.

Subjects are the real IDs (F001-F023, M001-M018); `tiny` keeps two per fold partition and
two tasks, `demo` all 41 and all 8 tasks. Frames are portrait like the real 1040x1392 ones,
but small. Each subject is one rendered identity filmed in one lab session (`face_render.
lab_scene`: the plain backdrop and frontal light of the real recordings, in place of the
in-the-wild scenes of the expression twins); AUs fire independently with realistic
co-occurrence (`face_render.random_au_track`), and occurrence is activation >= 0.3.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_pipelines.synthetic import face_render

AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
# The subject partition the 3-fold protocol uses (JAA-Net, ME-GraphAU).
PARTS = (
  tuple("F001 M007 F018 F008 F002 M004 F010 F009 M012 M001 F016 M014 F023 M008".split()),
  tuple("M011 F003 M010 M002 F005 F022 M018 M017 F013 M016 F020 F011 M013 M005".split()),
  tuple("F007 F015 F006 F019 M006 M009 F012 M003 F004 F021 F017 M015 F014".split()),
)
TASKS = ("T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8")

SIZES = {
  # subjects per part, tasks, frames per task, (height, width)
  "tiny": (2, 2, 24, (64, 48)),
  "demo": (14, 8, 48, (96, 72)),
}


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic BP4D of the given size (`tiny` or `demo`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  per_part, num_tasks, num_frames, (height, width) = SIZES[size]
  rng = np.random.default_rng(seed)
  label_dir = os.path.join(out_dir, "AUCoding", "AU_OCC")
  os.makedirs(label_dir, exist_ok=True)
  header = ",".join(str(n) for n in range(100)) + "\n"
  for subject in [s for part in PARTS for s in part[:per_part]]:
    identity = face_render.random_identity(rng)
    session = face_render.lab_scene(rng, height, width)  # one sitting: every task alike
    for task in TASKS[:num_tasks]:
      frames, track = face_render.render_au_clip(num_frames, height, width, rng, identity, session)
      occurrence = face_render.au_occurrence(track, AUS)  # [T, 12]
      first = int(rng.integers(1, 3000))
      numbers = np.arange(first, first + num_frames)
      frame_dir = os.path.join(out_dir, "BP4D-training", subject, task)
      os.makedirs(frame_dir, exist_ok=True)
      for number, frame in zip(numbers, frames):
        Image.fromarray(frame).save(os.path.join(frame_dir, f"{number:04d}.jpg"), quality=90)
      # The coded stretch leaves a couple of frames uncoded at each end.
      coded = slice(2, num_frames - 2)
      table = np.full((num_frames, 100), 9, np.int64)
      table[:, 0] = numbers
      table[:, list(AUS)] = occurrence
      if rng.random() < 0.5:
        table[rng.integers(2, num_frames - 2), AUS[rng.integers(len(AUS))]] = 9
      with open(os.path.join(label_dir, f"{subject}_{task}.csv"), "w") as f:
        f.write(header)
        f.writelines(",".join(map(str, row)) + "\n" for row in table[coded])
