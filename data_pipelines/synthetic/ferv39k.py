"""Synthetic twin of FERV39k (38,935 clips from 22 scenes, 7 classes, one train/test split).

Writes the face-crop release and its all-scenes split files, in kind:

    <out_dir>/2_ClipsforFaceCrop/<Scene>/<Emotion>/<0000>/01.jpg ...   face-cropped frames
    <out_dir>/4_setups/All_scenes/train_All.csv, test_All.csv

Split files hold one clip per line, `<Scene>/<Emotion>/<clip> <Emotion>` (for example
`Action/Sad/0010 Sad`), with the emotion words Happy, Sad, Neutral, Angry, Surprise, Disgust,
Fear. Clip numbers count up within each scene and emotion; the same folder holds train and
test clips.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_pipelines.synthetic import face_render

CLASS_NAMES = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")
EXPRESSIONS = ("happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear")

SIZES = {
  # scenes, (train, test) clips per scene and class, frames per clip (min, max), frame side
  "tiny": (("Action", "DailyLife"), (2, 1), (8, 24), 48),
  "demo": (("Action", "Argue", "DailyLife"), (10, 3), (12, 45), 112),
}


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic FERV39k of the given size (`tiny` or `demo`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  scenes, (num_train, num_test), (min_frames, max_frames), side = SIZES[size]
  rng = np.random.default_rng(seed)
  lines: dict[str, list[str]] = {"train": [], "test": []}
  for scene in scenes:
    for emotion, expression in zip(CLASS_NAMES, EXPRESSIONS):
      parts = ["train"] * num_train + ["test"] * num_test
      for clip, part in enumerate(rng.permutation(parts)):
        length = int(rng.integers(min_frames, max_frames + 1))
        frames = face_render.render_expression_clip(expression, length, side, side, rng)
        relative = f"{scene}/{emotion}/{clip:04d}"
        folder = os.path.join(out_dir, "2_ClipsforFaceCrop", *relative.split("/"))
        os.makedirs(folder, exist_ok=True)
        for k, frame in enumerate(frames, start=1):
          Image.fromarray(frame).save(os.path.join(folder, f"{k:02d}.jpg"), quality=90)
        lines[str(part)].append(f"{relative} {emotion}\n")
  setup_dir = os.path.join(out_dir, "4_setups", "All_scenes")
  os.makedirs(setup_dir, exist_ok=True)
  for part, part_lines in lines.items():
    with open(os.path.join(setup_dir, f"{part}_All.csv"), "w") as f:
      f.writelines(part_lines)
