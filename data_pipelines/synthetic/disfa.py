"""Synthetic twin of DISFA (27 subjects, one video each, frame-level AU intensities 0-5).

Writes the left-camera videos and the intensity coding, in kind:

    <out_dir>/Videos_LeftCamera/LeftVideoSN001_comp.avi ...   20 fps, landscape frames
    <out_dir>/ActionUnit_Labels/SN001/SN001_au1.txt ...        one file per coded AU

Each label file has one line per video frame, `frame,intensity` (frames counted from 1,
intensity 0-5), for the twelve coded AUs 1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26.

Subjects are the real IDs; `tiny` keeps two per fold partition and short videos, `demo` all 27.
Frames are landscape like the real 1024x768 ones, but small. Each subject is one rendered
identity filmed in a lab session (`face_render.lab_scene`: a plain backdrop and frontal light,
as the real set was recorded, in place of the expression twins' in-the-wild scenes); AUs fire
independently with realistic co-occurrence, and intensity is the activation on a 0-5 scale
(`face_render.au_intensity`), so intensity >= 2 matches activation >= 0.3.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic import face_render

CODED_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
# The subject partition the 3-fold protocol uses (JAA-Net, ME-GraphAU).
PARTS = (
  tuple("SN002 SN010 SN001 SN026 SN027 SN032 SN030 SN009 SN016".split()),
  tuple("SN013 SN018 SN011 SN028 SN012 SN006 SN031 SN021 SN024".split()),
  tuple("SN003 SN029 SN023 SN025 SN008 SN005 SN007 SN017 SN004".split()),
)
FPS = 20

SIZES = {
  # subjects per part, frames per video, (height, width)
  "tiny": (2, 40, (48, 64)),
  "demo": (9, 320, (72, 96)),
}


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic DISFA of the given size (`tiny` or `demo`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  per_part, num_frames, (height, width) = SIZES[size]
  rng = np.random.default_rng(seed)
  video_dir = os.path.join(out_dir, "Videos_LeftCamera")
  os.makedirs(video_dir, exist_ok=True)
  for subject in [s for part in PARTS for s in part[:per_part]]:
    identity = face_render.random_identity(rng)
    session = face_render.lab_scene(rng, height, width)  # DISFA is a lab recording too
    frames, track = face_render.render_au_clip(num_frames, height, width, rng, identity, session)
    video_ops.encode_video(os.path.join(video_dir, f"LeftVideo{subject}_comp.avi"), frames, FPS)
    intensity = face_render.au_intensity(track, CODED_AUS)  # [T, 12]
    label_dir = os.path.join(out_dir, "ActionUnit_Labels", subject)
    os.makedirs(label_dir, exist_ok=True)
    for column, au in enumerate(CODED_AUS):
      with open(os.path.join(label_dir, f"{subject}_au{au}.txt"), "w") as f:
        f.writelines(f"{t},{value}\n" for t, value in enumerate(intensity[:, column], start=1))
