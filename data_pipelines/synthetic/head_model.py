"""Synthetic stand-in for the FLAME head model, written in the real model files' layout.

The real `generic_model.pkl` cannot be shipped (registration and licence), so this writes one of
the same keys, types and shapes, read by `fdjax/models/flame.py` and by the `smplx` package:

    generic_model.pkl           {v_template [V, 3], shapedirs [V, 3, 400] (300 identity + 100
                                expression), posedirs [V, 3, 36], J_regressor scipy csc [5, V],
                                J [5, 3], weights [V, 5], kintree_table [2, 5], f [F, 3] uint32,
                                bs_type, bs_style}; float64 like the original (plain numpy here,
                                where the original has chumpy arrays)
    flame_static_embedding.pkl  {lmk_face_idx [51], lmk_b_coords [51, 3]} (smplx's name and keys)
    landmark_embedding.npy      {static_lmk_faces_idx, static_lmk_bary_coords} (FLAME's layout)
    regions/rigid.txt           the rigid (skull) region: forehead, nose bridge, ear roots
                                (`head_regions.py`)

The mesh is the VOCASET twin's: the same rig (vertex positions in the canonical face square and
the Delaunay triangles of `FLAME_sample.ply`) and, as `v_template`, the neutral face that twin
writes there, for the same seed. On it:

- identity blend shapes: low-frequency cosine fields over the face square, each along a random
  direction, with amplitudes falling with frequency (as PCA variances do): a few mm per unit;
- expression blend shapes: the twin rig's lip spread/round, blink and brow fields first, then
  low-frequency fields localised on the mouth or on the eyes and brows, faded to a tenth over
  the skin that lies on bone (forehead, nose bridge, ear roots: `head_regions.bone_weight`);
- joints (global, neck, jaw, eyes) regressed sparsely from vertex neighbourhoods: the rim of
  the face (global), its lower rim (neck), the two jaw hinges, a ring around each eye;
- smooth skinning weights: the jaw below the mouth line, the neck along the lower rim, each eye
  over its socket, the global joint the rest; pose correctives follow each joint's weights.

Both sizes write the same model (`size` exists for the `data synth` interface).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import scipy.sparse

from data_pipelines.synthetic import head_regions, talking_mesh
from data_pipelines.synthetic import vocaset as vocaset_twin

NUM_SHAPE, NUM_EXPRESSION = 300, 100
# As `fdjax.models.flame.JOINTS`, not imported from there so that `data synth` starts no JAX.
JOINTS = ("global", "neck", "jaw", "left_eye", "right_eye")
_PARENTS = (-1, 0, 1, 1, 1)
_ROOT_PARENT = 4294967295  # how the original kintree_table marks the root (uint32 -1)

_MOUTH = (0.0, -0.45)  # as talking_mesh places the features in the face square [-1, 1]^2
_EYES = ((0.4, 0.25), (-0.4, 0.25))  # left eye at +u, right eye at -u
_SHAPE_SCALE = 0.006  # metres: largest displacement of the lowest-frequency identity field
_EXPRESSION_SCALE = 0.003
_POSE_SCALE = 0.002  # metres per unit entry of (R - I)


def _seed(seed: int, *keys: int) -> int:
  return int(np.random.SeedSequence([seed, 7, *keys]).generate_state(1)[0])


def _cosine_fields(uv: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The `count` lowest-frequency cosine products over the face square (constant excluded).

  Returns:
    fields [count, V] in [-1, 1] and their frequencies [count].
  """
  pairs = sorted(
    ((a, b) for a in range(32) for b in range(32) if a or b),
    key=lambda p: (p[0] ** 2 + p[1] ** 2, p),
  )[:count]
  phase = np.pi * (uv + 1.0) / 2.0  # [V, 2] in [0, pi]
  fields = np.stack([np.cos(a * phase[:, 0]) * np.cos(b * phase[:, 1]) for a, b in pairs])
  return fields, np.array([np.hypot(a, b) for a, b in pairs])


def _random_rotations(rng: np.random.Generator, count: int) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(count, 3, 3)))
  return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # [count, 3, 3]


def _identity_basis(uv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """[V, 3, 300]: three directions (a random frame) per low-frequency field."""
  fields, frequency = _cosine_fields(uv, NUM_SHAPE // 3)
  frames = _random_rotations(rng, len(fields))  # [N, 3, 3]
  amplitude = _SHAPE_SCALE / (1.0 + frequency)  # [N]
  basis = np.einsum("nv,n,ndc->vdnc", fields, amplitude, frames)  # column c of frame n
  return basis.reshape(len(uv), 3, NUM_SHAPE)  # components ordered by field, then direction


def _expression_basis(rig: talking_mesh.FaceRig, rng: np.random.Generator) -> np.ndarray:
  """[V, 3, 100]: the rig's spread, round, blink and brow fields, then localised fields."""
  uv = rig.uv.astype(np.float64)
  named = [talking_mesh.FIELDS.index(n) for n in ("lip_spread", "lip_round", "blink", "brow_raise")]
  components = [rig.fields[k].astype(np.float64) for k in named]  # each [V, 3]
  mouth = np.exp(-(((uv[:, 0] - _MOUTH[0]) / 0.5) ** 2 + ((uv[:, 1] - _MOUTH[1]) / 0.35) ** 2))
  upper = 1.0 / (1.0 + np.exp(-(uv[:, 1] - 0.1) / 0.08))
  # Skin on bone barely moves with expression (only the rig's brow field still drags the
  # forehead).
  mobility = 1.0 - 0.9 * head_regions.bone_weight(uv)
  fields, frequency = _cosine_fields(uv, NUM_EXPRESSION)
  for n in range(NUM_EXPRESSION - len(components)):
    region = mouth if n % 2 == 0 else upper
    direction = rng.normal(size=3)
    direction[2] *= 0.5  # expressions move mostly across the face, less in depth
    field = (fields[n // 2] * region * mobility)[:, None] * direction
    components.append(field / (1.0 + frequency[n // 2]))
  basis = np.stack(components, -1)  # [V, 3, 100]
  return basis * (_EXPRESSION_SCALE / np.abs(basis).max(axis=(0, 1)))


def _blobs(uv: np.ndarray, centres: list[tuple[float, float]], sigma: float) -> np.ndarray:
  d2 = ((uv[:, None, :] - np.array(centres)) ** 2).sum(-1)  # [V, C]
  return np.exp(-d2 / (2 * sigma**2)).sum(-1)


def _joint_regressor(uv: np.ndarray) -> scipy.sparse.csc_matrix:
  """[5, V] sparse: each joint a normalised weighting of a few vertex neighbourhoods."""
  rows = [
    _blobs(uv, [(0.95, 0.0), (-0.95, 0.0), (0.0, 0.95), (0.0, -0.95)], 0.08),  # global
    _blobs(uv, [(0.85, -0.9), (-0.85, -0.9), (0.0, -0.95)], 0.08),  # neck
    _blobs(uv, [(0.92, -0.2), (-0.92, -0.2)], 0.08),  # jaw hinges
  ]
  for eye in _EYES:  # a ring around the eye: its centroid lies behind the (convex) surface
    distance = np.hypot(uv[:, 0] - eye[0], uv[:, 1] - eye[1])
    rows.append(np.exp(-(((distance - 0.12) / 0.03) ** 2)))
  dense = np.stack(rows)  # [5, V]
  dense[dense < 0.05 * dense.max(axis=1, keepdims=True)] = 0.0
  return scipy.sparse.csc_matrix(dense / dense.sum(axis=1, keepdims=True))


def _skinning_weights(uv: np.ndarray) -> np.ndarray:
  """[V, 5] smooth, non-negative, rows summing to 1."""
  u, v = uv[:, 0], uv[:, 1]
  neck = 1.0 / (1.0 + np.exp((v + 0.75) / 0.05))
  below_mouth = 1.0 / (1.0 + np.exp((v - _MOUTH[1] - 0.03) / 0.04))
  jaw = below_mouth * np.exp(-((u / 0.75) ** 2)) * (1.0 - neck)
  eyes = [0.9 * np.exp(-((np.hypot(u - e[0], v - e[1]) / 0.09) ** 2)) for e in _EYES]
  weights = np.stack([np.zeros_like(u), neck, jaw, *eyes], -1)
  weights[:, 0] = np.clip(1.0 - weights[:, 1:].sum(-1), 0.0, None)
  return weights / weights.sum(-1, keepdims=True)


def _pose_basis(uv: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """[V, 3, 36]: per non-root joint and entry of (R - I), a smooth field on that joint's skin."""
  fields, _ = _cosine_fields(uv, 4)
  basis = np.zeros((len(uv), 3, 9 * (len(JOINTS) - 1)))
  for k in range(1, len(JOINTS)):
    for entry in range(9):
      shading = 1.0 + 0.5 * np.tensordot(rng.normal(size=len(fields)), fields, 1)  # [V]
      basis[:, :, 9 * (k - 1) + entry] = (weights[:, k] * shading)[:, None] * rng.normal(size=3)
  return basis * (_POSE_SCALE / np.abs(basis).max())


def _landmark_points() -> np.ndarray:
  """[51, 2] face-square positions of the 51 static landmarks (iBUG 68 without the contour)."""

  def arc(centre, half_width, height, count):
    s = np.linspace(-1.0, 1.0, count)
    return np.stack([centre[0] + half_width * s, centre[1] + height * (1 - s**2)], -1)

  def ellipse(centre, radii, count, start=np.pi):
    angle = start - 2 * np.pi * np.arange(count) / count
    return np.stack(
      [centre[0] + radii[0] * np.cos(angle), centre[1] + radii[1] * np.sin(angle)], -1
    )

  right_eye, left_eye = _EYES[1], _EYES[0]
  return np.concatenate(
    [
      arc((right_eye[0], 0.42), 0.22, 0.06, 5),  # right brow
      arc((left_eye[0], 0.42), 0.22, 0.06, 5),  # left brow
      np.stack([np.zeros(4), np.linspace(0.2, -0.1, 4)], -1),  # nose bridge
      np.stack([np.linspace(-0.15, 0.15, 5), np.full(5, -0.2)], -1),  # nose base
      ellipse(right_eye, (0.12, 0.05), 6),
      ellipse(left_eye, (0.12, 0.05), 6),
      ellipse(_MOUTH, (0.3, 0.12), 12),  # outer lip
      ellipse(_MOUTH, (0.2, 0.04), 8),  # inner lip
    ]
  )


def _embed(points: np.ndarray, uv: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The triangle containing each point and the point's barycentric coordinates in it."""
  a, b, c = (uv[faces[:, i]] for i in range(3))  # [F, 2] each
  e1, e2, p = b - a, c - a, points[:, None, :] - a  # p [L, F, 2]
  det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # [F]
  beta = (p[..., 0] * e2[:, 1] - p[..., 1] * e2[:, 0]) / det
  gamma = (e1[:, 0] * p[..., 1] - e1[:, 1] * p[..., 0]) / det
  coordinates = np.stack([1.0 - beta - gamma, beta, gamma], -1)  # [L, F, 3]
  best = coordinates.min(-1).argmax(-1)  # [L], the triangle the point lies in
  return best.astype(np.int64), coordinates[np.arange(len(points)), best]


def make_head_model(seed: int = 0) -> tuple[dict, dict]:
  """The model dict of `generic_model.pkl` and the static landmark embedding, from `seed`."""
  rig = talking_mesh.make_rig(vocaset_twin.NUM_VERTICES, vocaset_twin._seed(seed, 0))
  # The twin's FLAME_sample.ply shows its first subject's neutral face: that is the template.
  template = talking_mesh.make_subject(
    rig, vocaset_twin.SUBJECTS[0], vocaset_twin._seed(seed, 2, 0), female=True
  ).neutral.astype(np.float64)
  faces = talking_mesh.rig_faces(rig)
  uv = rig.uv.astype(np.float64)
  rng = np.random.default_rng(_seed(seed))
  regressor = _joint_regressor(uv)
  weights = _skinning_weights(uv)
  shapedirs = np.concatenate([_identity_basis(uv, rng), _expression_basis(rig, rng)], -1)
  model = {
    "v_template": template,
    "shapedirs": shapedirs,
    "posedirs": _pose_basis(uv, weights, rng),
    "J_regressor": regressor,
    "J": regressor @ template,
    "weights": weights,
    "kintree_table": np.array([[_ROOT_PARENT, *_PARENTS[1:]], range(len(JOINTS))], np.int64),
    "f": faces.astype(np.uint32),
    "bs_type": "lrotmin",
    "bs_style": "lbs",
  }
  landmark_faces, barycentric = _embed(_landmark_points(), uv, faces)
  return model, {"lmk_face_idx": landmark_faces, "lmk_b_coords": barycentric}


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes `generic_model.pkl`, the landmark embeddings and the named regions to `out_dir`."""
  del size  # one model whatever the size
  os.makedirs(out_dir, exist_ok=True)
  model, landmarks = make_head_model(seed)
  with open(os.path.join(out_dir, "generic_model.pkl"), "wb") as f:
    pickle.dump(model, f, protocol=2)
  with open(os.path.join(out_dir, "flame_static_embedding.pkl"), "wb") as f:
    pickle.dump(landmarks, f, protocol=2)
  embedding = {
    "static_lmk_faces_idx": landmarks["lmk_face_idx"],
    "static_lmk_bary_coords": landmarks["lmk_b_coords"],
  }
  np.save(os.path.join(out_dir, "landmark_embedding.npy"), np.array(embedding, dtype=object))
  head_regions.write(out_dir, seed)
