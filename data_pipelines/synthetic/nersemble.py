"""Synthetic twin of NeRSemble as GaussianAvatars trains on it: multi-view images of one head.

Writes the layout of NeRSemble sequences exported for GaussianAvatars by VHAP (one subject, its
sequences combined, `transforms_*.json` in the NeRF convention), which
`data_pipelines/builders/nersemble.py` reads:

    transforms.json            every frame; shared intrinsics, timestep and camera indices
    transforms_train.json      training sequences, training cameras
    transforms_val.json        training sequences, the held-out camera (novel views)
    transforms_test.json       the held-out sequence, every camera (novel expressions)
    images/TTTTT_CC.png        RGB on a white background, timestep T, camera C
    fg_masks/TTTTT_CC.png      foreground coverage (0-255)
    flame_param/TTTTT.npz      shape [300], expr [1, 100], rotation, neck_pose, jaw_pose [1, 3],
                               eyes_pose [1, 6], translation [1, 3], static_offset [1, V, 3]
    canonical_flame_param.npz  the subject's shape and static offset at zero expression and pose
    head_model/                the stand-in FLAME model the heads were posed with
                               (`fdjax data synth head_model`; real data brings its own FLAME)

A frame entry holds `timestep_index`, `timestep_id`, `camera_index`, `camera_id`, `fl_x`,
`fl_y`, `cx`, `cy`, `h`, `w`, `camera_angle_x/y`, `transform_matrix` (camera-to-world, OpenGL
axes: x right, y up, z backwards), `file_path`, `fg_mask_path` and `flame_param_path`.

The head is the synthetic FLAME stand-in's mesh posed by per-frame FLAME parameters (smooth
random expression, jaw, neck and head-rotation trajectories per sequence) and drawn with a colour
per vertex (skin with a fine pattern, brows, eyes, lips; no lighting), perspective-correct
interpolation inside triangles, 2x2 supersampled. Cameras sit on a sphere around the head, in
front of it; the frontal camera is held out. Sizes:

- tiny: 8 cameras, 32 px, 2 training sequences of 3 frames, a test sequence of 2 frames;
- demo: 16 cameras, 128 px, 4 training sequences of 10 frames, a test sequence of 6 frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from data_pipelines.synthetic import head_model as head_model_twin

_SIZES = {
  # cameras, image side, training sequences, frames per sequence, test frames
  "tiny": (8, 32, 2, 3, 2),
  "demo": (16, 128, 4, 10, 6),
}
DISTANCE = 0.6  # metres from the head centre to every camera
FACE_FILL = 0.8  # share of the image height the face spans from the frontal camera
HEAD_CENTRE = (0.0, 0.0, 0.05)  # where the cameras look, metres (the face surface's middle)
SUPERSAMPLE = 2
BACKGROUND = 1.0  # white, as GaussianAvatars trains
NUM_EXPRESSION_USED = 12  # expression components the trajectories move
_FACE_HEIGHT = 0.19  # metres: the stand-in's face square plus margin


def camera_directions(num_cameras: int) -> list[tuple[float, float]]:
  """(azimuth, elevation) in degrees of each camera; index `held_out_camera` is frontal."""
  if num_cameras == 16:
    upper = [(a, 14.0) for a in np.linspace(-50, 50, 8)]
    lower = [(0.0, -6.0)] + [(a, -10.0) for a in (-50, -34, -17, 17, 34, 50)]
    return [*upper, lower[0], *lower[1:], (0.0, 30.0)]
  if num_cameras == 8:
    return [(-40, 12), (-14, 14), (14, 14), (40, 12), (-35, -10), (35, -10), (0, 32), (0, -4)]
  raise ValueError(f"the twin places 8 or 16 cameras, not {num_cameras}")


def held_out_camera(num_cameras: int) -> int:
  """The camera of the novel-view split: the frontal one (index 8 of 16, as VHAP holds out)."""
  return 8 if num_cameras == 16 else num_cameras - 1


def look_at(azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray]:
  """World-to-camera rotation [3, 3] and translation [3] (OpenCV axes) of a camera at
  `DISTANCE` from `HEAD_CENTRE` in direction (azimuth about +y, elevation towards +y)."""
  az, el = math.radians(azimuth), math.radians(elevation)
  centre = np.asarray(HEAD_CENTRE)
  position = centre + DISTANCE * np.array(
    [math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)]
  )
  forward = (centre - position) / np.linalg.norm(centre - position)  # camera +z
  right = np.cross(forward, [0.0, 1.0, 0.0])
  right /= np.linalg.norm(right)  # camera +x
  down = np.cross(forward, right)  # camera +y
  rotation = np.stack([right, down, forward])
  return rotation, -rotation @ position


def vertex_colours(template: np.ndarray) -> np.ndarray:
  """[V, 3] colours in [0, 1] from positions on the neutral face (u, v over the face square)."""
  u = template[:, 0] / np.abs(template[:, 0]).max()
  v = template[:, 1] / np.abs(template[:, 1]).max()
  skin = np.array([0.86, 0.66, 0.56]) + 0.06 * np.stack(
    [np.cos(2.0 * u), np.sin(1.5 * v), np.cos(1.0 * (u + v))], -1
  )
  skin = skin + 0.05 * (np.sin(7 * np.pi * u) * np.sin(6 * np.pi * v))[:, None]  # fine pattern

  def blob(cu, cv, ru, rv, sharpness=8.0):
    d = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    return 0.5 - 0.5 * np.tanh(0.5 * sharpness * (d - 1.0))  # a sigmoid edge at d = 1

  colour = skin
  for side in (-1, 1):
    colour = _mix(colour, [0.32, 0.22, 0.16], blob(0.4 * side, 0.45, 0.24, 0.06))  # brow
    colour = _mix(colour, [0.95, 0.95, 0.93], blob(0.4 * side, 0.25, 0.13, 0.055))  # sclera
    colour = _mix(colour, [0.25, 0.38, 0.55], blob(0.4 * side, 0.25, 0.045, 0.045))  # iris
  colour = _mix(colour, [0.74, 0.32, 0.33], blob(0.0, -0.45, 0.3, 0.12))  # lips
  colour = _mix(colour, [0.9, 0.6, 0.55], 0.6 * blob(0.0, -0.12, 0.12, 0.14))  # nose tip
  return np.clip(colour, 0.0, 1.0).astype(np.float32)


def _mix(colour: np.ndarray, target, weight: np.ndarray) -> np.ndarray:
  return colour * (1 - weight[:, None]) + np.asarray(target) * weight[:, None]


def render_view(
  vertices: np.ndarray,
  faces: np.ndarray,
  colours: np.ndarray,
  rotation: np.ndarray,
  translation: np.ndarray,
  focal: float,
  size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """One view: image [size, size, 3] uint8 on white and foreground mask [size, size] uint8.

  Perspective-correct interpolation of vertex colours (barycentric weights over depth), on a
  grid `SUPERSAMPLE` times finer, averaged down.
  """
  from fdjax.render.mesh import rasterise

  fine = size * SUPERSAMPLE
  cam = vertices.astype(np.float64) @ rotation.T + translation  # [V, 3]
  f, c = focal * SUPERSAMPLE, fine / 2
  screen = np.stack([f * cam[:, 0] / cam[:, 2] + c, f * cam[:, 1] / cam[:, 2] + c], -1)
  triangle = rasterise(screen, cam[:, 2], faces, fine, fine)  # [fine, fine]
  covered = triangle >= 0
  rows, cols = np.nonzero(covered)
  corners = faces[triangle[rows, cols]]  # [M, 3]
  px, py = cols + 0.5, rows + 0.5
  a, b, cc = (screen[corners[:, i]] for i in range(3))
  area = (b[:, 0] - a[:, 0]) * (cc[:, 1] - a[:, 1]) - (cc[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
  w1 = ((px - a[:, 0]) * (cc[:, 1] - a[:, 1]) - (cc[:, 0] - a[:, 0]) * (py - a[:, 1])) / area
  w2 = ((b[:, 0] - a[:, 0]) * (py - a[:, 1]) - (px - a[:, 0]) * (b[:, 1] - a[:, 1])) / area
  screen_weights = np.clip(np.stack([1 - w1 - w2, w1, w2], -1), 0, 1)
  weights = screen_weights / cam[corners, 2]  # perspective-correct: over depth, renormalised
  weights /= weights.sum(-1, keepdims=True)
  image = np.full((fine, fine, 3), BACKGROUND)
  image[rows, cols] = np.einsum("mk,mkc->mc", weights, colours[corners])
  image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((1, 3))
  mask = covered.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
  to_u8 = lambda x: np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
  return to_u8(image), to_u8(mask)


def _trajectories(rng: np.random.Generator, frames: int) -> dict[str, np.ndarray]:
  """Per-frame FLAME parameters of one sequence: smooth paths through random keyframes."""
  keys = max(2, frames // 3 + 1)

  def path(scale, dims):
    keyframes = rng.normal(0.0, scale, (keys, dims))
    position = np.linspace(0, keys - 1, frames)
    low = np.minimum(np.floor(position).astype(int), keys - 2)
    t = position - low
    t = t * t * (3 - 2 * t)  # smoothstep between keyframes
    return (1 - t)[:, None] * keyframes[low] + t[:, None] * keyframes[low + 1]

  expression = np.zeros((frames, head_model_twin.NUM_EXPRESSION))
  expression[:, :NUM_EXPRESSION_USED] = path(1.2, NUM_EXPRESSION_USED)
  jaw = np.zeros((frames, 3))
  jaw[:, 0] = np.abs(path(0.12, 1)[:, 0])  # opening only
  return {
    "expr": expression,
    "rotation": path(0.08, 3),
    "neck_pose": path(0.04, 3),
    "jaw_pose": jaw,
    "eyes_pose": np.zeros((frames, 6)),
    "translation": path(0.004, 3),
  }


def _camera_entry(rotation, translation, focal, size) -> dict:
  """The intrinsics and camera-to-world matrix (OpenGL axes) of a frame entry."""
  world_to_camera = np.eye(4)
  world_to_camera[:3, :3], world_to_camera[:3, 3] = rotation, translation
  camera_to_world = np.linalg.inv(world_to_camera)
  camera_to_world[:3, 1:3] *= -1  # OpenCV (y down, z forward) -> OpenGL (y up, z backward)
  angle = 2 * math.atan(size / (2 * focal))
  return {
    "cx": size / 2,
    "cy": size / 2,
    "fl_x": focal,
    "fl_y": focal,
    "h": size,
    "w": size,
    "camera_angle_x": angle,
    "camera_angle_y": angle,
    "transform_matrix": camera_to_world.tolist(),
  }


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes the twin of `size` (tiny, demo) to `out_dir` (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  from PIL import Image

  from fdjax.models import flame

  if size not in _SIZES:
    raise ValueError(f"size must be one of {sorted(_SIZES)}, got {size!r}")
  num_cameras, side, num_train, frames_per, test_frames = _SIZES[size]
  rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
  model_dir = os.path.join(out_dir, "head_model")
  head_model_twin.write(model_dir, seed=seed)
  model = flame.load_flame(os.path.join(model_dir, "generic_model.pkl"))
  template = np.asarray(model.template)
  faces = np.asarray(model.faces)
  colours = vertex_colours(template)

  shape = np.zeros(head_model_twin.NUM_SHAPE, np.float32)
  shape[:20] = rng.normal(0.0, 1.0, 20)
  # A smooth 1-2 mm static offset, as VHAP's tracking adds to the template.
  static_offset = (0.0015 * np.sin(20 * template[:, :1]) * np.array([[0.0, 0.3, 1.0]])).astype(
    np.float32
  )
  offset_model = dataclasses.replace(model, template=model.template + jnp.asarray(static_offset))
  sequences = [("train", frames_per)] * num_train + [("test", test_frames)]
  focal = FACE_FILL * side * DISTANCE / _FACE_HEIGHT
  cameras = [look_at(*d) for d in camera_directions(num_cameras)]
  held_out = held_out_camera(num_cameras)
  for name in ("images", "fg_masks", "flame_param"):
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)

  trajectories = [_trajectories(rng, frames) for _, frames in sequences]
  every = {k: np.concatenate([p[k] for p in trajectories]) for k in trajectories[0]}
  pose = np.concatenate([every[k] for k in ("rotation", "neck_pose", "jaw_pose", "eyes_pose")], -1)
  # One compiled call for every frame (the model an argument, not a constant to fold).
  posed = jax.jit(lambda m, *a: flame.flame_forward(m, *a).vertices)(
    offset_model,
    jnp.asarray(shape),
    *(jnp.asarray(a, jnp.float32) for a in (every["expr"], pose, every["translation"])),
  )
  posed = np.asarray(posed)  # [all frames, V, 3]

  splits: dict[str, list] = {"train": [], "val": [], "test": []}
  timestep = 0
  for sequence, ((role, frames), params) in enumerate(zip(sequences, trajectories)):
    vertices = posed[timestep : timestep + frames]
    for t in range(frames):
      np.savez(
        os.path.join(out_dir, "flame_param", f"{timestep:05d}.npz"),
        shape=shape,
        static_offset=static_offset[None],
        **{k: v[t : t + 1].astype(np.float32) for k, v in params.items()},
      )
      for c, (rotation, translation) in enumerate(cameras):
        image, mask = render_view(vertices[t], faces, colours, rotation, translation, focal, side)
        stem = f"{timestep:05d}_{c:02d}"
        Image.fromarray(image).save(os.path.join(out_dir, "images", stem + ".png"))
        Image.fromarray(mask).save(os.path.join(out_dir, "fg_masks", stem + ".png"))
        entry = {
          "timestep_index": timestep,
          "timestep_index_original": timestep,
          "timestep_id": f"SEQ{sequence:02d}_frame_{t:05d}",
          "camera_index": c,
          "camera_id": f"cam{c:02d}",
          **_camera_entry(rotation, translation, focal, side),
          "file_path": f"images/{stem}.png",
          "fg_mask_path": f"fg_masks/{stem}.png",
          "flame_param_path": f"flame_param/{timestep:05d}.npz",
        }
        split = "test" if role == "test" else ("val" if c == held_out else "train")
        splits[split].append(entry)
      timestep += 1

  np.savez(
    os.path.join(out_dir, "canonical_flame_param.npz"),
    shape=shape,
    static_offset=static_offset[None],
    expr=np.zeros((1, head_model_twin.NUM_EXPRESSION), np.float32),
    rotation=np.zeros((1, 3), np.float32),
    neck_pose=np.zeros((1, 3), np.float32),
    jaw_pose=np.array([[0.3, 0.0, 0.0]], np.float32),
    eyes_pose=np.zeros((1, 6), np.float32),
    translation=np.zeros((1, 3), np.float32),
  )
  shared = {k: v for k, v in splits["train"][0].items() if k in _SHARED_KEYS}
  everything = splits["train"] + splits["val"] + splits["test"]
  for name, frames in (("", everything), *((f"_{k}", v) for k, v in splits.items())):
    db = {
      **shared,
      "frames": frames,
      "timestep_indices": sorted({f["timestep_index"] for f in frames}),
      "camera_indices": sorted({f["camera_index"] for f in frames}),
    }
    with open(os.path.join(out_dir, f"transforms{name}.json"), "w") as f:
      json.dump(db, f, indent=1)


_SHARED_KEYS = ("cx", "cy", "fl_x", "fl_y", "h", "w", "camera_angle_x", "camera_angle_y")
