"""Synthetic twin of DFEW (Dynamic Facial Expression in the Wild): its raw layout, rendered faces.

Writes what the official single-label release holds, in kind:

    <out_dir>/Clip/clip_224x224/00001/00001_00001.jpg ...   face-cropped frames per clip
    <out_dir>/EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    <out_dir>/EmoLabel_DataSplit/test(single-labeled)/set_1.csv ... set_5.csv
    <out_dir>/annotation/set_1_train.txt ... set_5_test.txt

The split CSVs are the official ones: a header `video_name,label`, then one clip per line, the
clip number unpadded and the label 1-7 (1 Happy, 2 Sad, 3 Neutral, 4 Angry, 5 Surprise,
6 Disgust, 7 Fear). The five test sets partition the clips (5-fold cross-validation). The
`annotation/` lists carry the same splits in the `path num_frames label` form that the usual
training code consumes (paths relative to `out_dir`, labels 1-7).

Frames are smaller than the real 224 pixels (`size` knob) and every clip shows one rendered
person whose expression unfolds over time (see `face_render`).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_pipelines.synthetic import face_render

# Label k (1-based, as in the files) is CLASS_NAMES[k - 1].
CLASS_NAMES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
EXPRESSIONS = ("happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear")
NUM_FOLDS = 5

SIZES = {
  # clips per class and fold, frames per clip (min, max), frame side in pixels
  "tiny": (1, (8, 24), 48),
  "demo": (8, (24, 72), 112),
  # For judging whether a model learns the expressions at all: 60 clips per class and fold
  # (1680 training clips per fold). A linear classifier on 32-pixel apex-minus-first frames
  # reaches a UAR of 0.68 at 60 clips per class and 0.69 at 200 (chance 0.14;
  # `data_pipelines.synthetic.visibility`), so the expressions are readable from pixels; the
  # demo twin's 224 training clips are still few for a video transformer trained from scratch.
  "large": (60, (24, 72), 112),
}


def write_frame_folder(folder: str, prefix: str, frames: np.ndarray) -> None:
  """Writes frames as `<prefix>_00001.jpg`, ... (1-based, zero-padded to five digits)."""
  os.makedirs(folder, exist_ok=True)
  for k, frame in enumerate(frames, start=1):
    Image.fromarray(frame).save(os.path.join(folder, f"{prefix}_{k:05d}.jpg"), quality=90)


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic DFEW of the given size (`tiny`, `demo` or `large`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  per_class, (min_frames, max_frames), side = SIZES[size]
  rng = np.random.default_rng(seed)
  plan = [
    (fold, label)
    for fold in range(1, NUM_FOLDS + 1)
    for label in range(1, len(CLASS_NAMES) + 1)
    for _ in range(per_class)
  ]
  # Clip numbers are not grouped by fold or class in the real release either.
  order = rng.permutation(len(plan))
  clips = sorted((int(order[i]) + 1, fold, label) for i, (fold, label) in enumerate(plan))
  num_frames = {}
  for clip, _, label in clips:
    length = int(rng.integers(min_frames, max_frames + 1))
    frames = face_render.render_expression_clip(EXPRESSIONS[label - 1], length, side, side, rng)
    name = f"{clip:05d}"
    write_frame_folder(os.path.join(out_dir, "Clip", "clip_224x224", name), name, frames)
    num_frames[clip] = length
  for part in ("train", "test"):
    os.makedirs(
      os.path.join(out_dir, "EmoLabel_DataSplit", f"{part}(single-labeled)"), exist_ok=True
    )
  os.makedirs(os.path.join(out_dir, "annotation"), exist_ok=True)
  for k in range(1, NUM_FOLDS + 1):
    for part in ("train", "test"):
      members = [(c, lab) for c, fold, lab in clips if (fold == k) == (part == "test")]
      csv_path = os.path.join(
        out_dir, "EmoLabel_DataSplit", f"{part}(single-labeled)", f"set_{k}.csv"
      )
      with open(csv_path, "w") as f:
        f.write("video_name,label\n")
        f.writelines(f"{c},{lab}\n" for c, lab in members)
      with open(os.path.join(out_dir, "annotation", f"set_{k}_{part}.txt"), "w") as f:
        f.writelines(f"Clip/clip_224x224/{c:05d} {num_frames[c]} {lab}\n" for c, lab in members)
