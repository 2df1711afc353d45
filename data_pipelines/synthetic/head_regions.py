"""Skin over bone on the synthetic head model (`head_model.py`), and its named rigid region.

    regions/rigid.txt   vertex indices (one per line) of the skin that sits on bone and moves
                        least with expression: the forehead, the nose bridge and the ear roots

`bone_weight(uv)` is a smooth weight over the rig's canonical face square `[-1, 1]^2`
(`talking_mesh.FaceRig.uv`): 1 on the forehead above the brows, the nose bridge and the ear
roots, 0 elsewhere. The head model's localised expression fields fade there (real expressions
barely move skin that lies on the skull), and the rigid region is where the weight is at least
one half, so it is the same vertex set for every identity of the model. It is the stabilisation
task's named mask: Procrustes on it is the strong classical baseline, and the skull vertex
error is measured over it (docs/design.md section 19). A real FLAME model comes with its own
region file (`config.data.rigid_region`).
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines.synthetic import talking_mesh
from data_pipelines.synthetic import vocaset as vocaset_twin

RIGID = "rigid"
# Face-square boxes (|u| from, |u| to, v from, v to) whose union is the skin over bone.
BONE_BOXES = {
  "forehead": (0.0, 0.75, 0.6, 1.0),
  "nose_bridge": (0.0, 0.12, 0.0, 0.3),
  "ear_roots": (0.85, 1.0, -0.1, 0.3),
}
_EDGE = 0.03  # width of the weight's fall-off at a box's inner edges, face-square units


def _step(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x / _EDGE))


def bone_weight(uv: np.ndarray) -> np.ndarray:
  """`[V]` in [0, 1]: how much vertex `uv [V, 2]` lies on bone (the union of `BONE_BOXES`)."""
  side, height = np.abs(uv[:, 0]), uv[:, 1]
  weight = np.zeros(len(uv))
  for side_from, side_to, height_from, height_to in BONE_BOXES.values():
    box = np.ones(len(uv))
    # Only edges inside the face square fall off; the square's own edges bound nothing.
    if side_from > 0.0:
      box *= _step(side - side_from)
    if side_to < 1.0:
      box *= _step(side_to - side)
    if height_from > -1.0:
      box *= _step(height - height_from)
    if height_to < 1.0:
      box *= _step(height_to - height)
    weight = np.maximum(weight, box)
  return weight


def rigid_region(seed: int = 0) -> np.ndarray:
  """`[V] bool`: the rigid region of the head model written for `seed`."""
  rig = talking_mesh.make_rig(vocaset_twin.NUM_VERTICES, vocaset_twin._seed(seed, 0))
  return bone_weight(rig.uv.astype(np.float64)) >= 0.5


def write(out_dir: str, seed: int = 0) -> None:
  """Writes `regions/rigid.txt` under `out_dir`."""
  os.makedirs(os.path.join(out_dir, "regions"), exist_ok=True)
  with open(os.path.join(out_dir, "regions", f"{RIGID}.txt"), "w") as f:
    f.write(talking_mesh.region_lines(rigid_region(seed)))
