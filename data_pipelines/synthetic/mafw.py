"""Synthetic twin of MAFW (Multi-modal Affective database for dynamic FER in the Wild).

Writes the single-expression part of the release, in kind:

    <out_dir>/data/clips/00001.mp4 ...                      H.264 clips, whole frames
    <out_dir>/Train & Test Set/single/no_caption/set_1/train.txt, test.txt ... set_5/

Split files hold one clip per line, `<clip>.mp4 <label word>`, with the eleven single-emotion
words anger, disgust, fear, happiness, neutral, sadness, surprise, contempt, anxiety,
helplessness, disappointment (labels 1-11 in that order in MAFW's own tables). The five test
sets partition the clips (5-fold cross-validation).

Unlike DFEW's face crops, MAFW clips are whole movie frames (wider than tall here) with the
face somewhere near the middle; the renderer draws the head smaller accordingly.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from data_pipelines.builders import mafw as mafw_builder
from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic import face_render

# The builder's classes (the order of the label words) and folds.
CLASS_NAMES = mafw_builder.CLASS_NAMES
NUM_FOLDS = mafw_builder.NUM_FOLDS
FPS = 25

SIZES = {
  # clips per class and fold, frames per clip (min, max), (height, width) in pixels
  "tiny": (1, (8, 24), (48, 64)),
  "demo": (5, (24, 72), (96, 128)),
}


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic MAFW of the given size (`tiny` or `demo`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  per_class, (min_frames, max_frames), (height, width) = SIZES[size]
  rng = np.random.default_rng(seed)
  plan = [
    (fold, label)
    for fold in range(1, NUM_FOLDS + 1)
    for label in range(len(CLASS_NAMES))
    for _ in range(per_class)
  ]
  order = rng.permutation(len(plan))
  clips = sorted((int(order[i]) + 1, fold, label) for i, (fold, label) in enumerate(plan))
  clip_dir = os.path.join(out_dir, "data", "clips")
  os.makedirs(clip_dir, exist_ok=True)
  for clip, _, label in clips:
    identity = face_render.random_identity(rng)
    identity = dataclasses.replace(identity, face_scale=identity.face_scale * 0.85)
    length = int(rng.integers(min_frames, max_frames + 1))
    frames = face_render.render_expression_clip(
      CLASS_NAMES[label], length, height, width, rng, identity
    )
    video_ops.encode_video(os.path.join(clip_dir, f"{clip:05d}.mp4"), frames, FPS)
  for k in range(1, NUM_FOLDS + 1):
    set_dir = os.path.join(out_dir, "Train & Test Set", "single", "no_caption", f"set_{k}")
    os.makedirs(set_dir, exist_ok=True)
    for part in ("train", "test"):
      with open(os.path.join(set_dir, f"{part}.txt"), "w") as f:
        f.writelines(
          f"{clip:05d}.mp4 {CLASS_NAMES[label]}\n"
          for clip, fold, label in clips
          if (fold == k) == (part == "test")
        )
