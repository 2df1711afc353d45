"""NeRSemble as exported for GaussianAvatars (VHAP's NeRF layout): one subject, many views.

Reads the layout `data_pipelines/synthetic/nersemble.py` describes (and writes as a twin):
`transforms_{train,val,test}.json` listing frames with a camera (intrinsics, camera-to-world in
OpenGL axes), an image, an optional foreground mask and the frame's FLAME parameters. The
splits are GaussianAvatars': `train` (training sequences and cameras), `val` (the same
sequences from the held-out camera: novel views) and `test` (a held-out sequence from every
camera: novel expressions).

One subject's images fit in memory, so the build is a validated decode into numpy arrays, one
`.npz` per split, rather than array_record files: `DATA_DIR/nersemble/{split}.npz` with

    image [N, H, W, 3] uint8, mask [N, H, W] uint8 (255 where no mask file is given),
    world_to_camera [N, 4, 4] float32 (OpenCV axes: x right, y down, z forward),
    intrinsics [N, 4] float32 (fx, fy, cx, cy in pixels), expression [N, E] float32,
    pose [N, 15] float32 (global, neck, jaw, left eye, right eye; axis-angle),
    translation [N, 3] float32, timestep [N] int32, camera [N] int32

plus `subject.npz` (`shape [S]`, `static_offset [V, 3]`, from `canonical_flame_param.npz` or
the first frame) and `dataset_info.json` (counts, image size, skipped examples). A bad frame
(unreadable image, wrong size, missing FLAME keys, non-finite camera) fails the build with one
line naming the file, or is skipped and counted under `skip_invalid`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from data_pipelines.builders.common import (
  ExampleValidator,
  InvalidExample,
  check_finite,
  check_shape,
)

NAME = "nersemble"
SPLITS = ("train", "val", "test")
FLAME_KEYS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")
_POSE_SIZES = {"rotation": 3, "neck_pose": 3, "jaw_pose": 3, "eyes_pose": 6, "translation": 3}


def read_transforms(path: str) -> dict:
  """A `transforms_*.json` file; a missing or malformed one raises naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found (a NeRSemble export has transforms_*.json)")
  try:
    with open(path) as f:
      content = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: not readable JSON ({error})") from error
  if not isinstance(content, dict) or not isinstance(content.get("frames"), list):
    raise ValueError(f"{path}: expected an object with a 'frames' list")
  return content


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise InvalidExample(path, "file not found")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as error:  # noqa: BLE001  a stranger's file: name it, one line
    raise InvalidExample(path, f"not a readable .npz ({type(error).__name__}: {error})") from error


def _read_image(path: str, mode: str, height: int, width: int) -> np.ndarray:
  from PIL import Image

  if not os.path.isfile(path):
    raise InvalidExample(path, "file not found")
  with Image.open(path) as image:
    array = np.asarray(image.convert(mode))
  expected = (height, width, 3) if mode == "RGB" else (height, width)
  check_shape(path, "image", array, expected)
  return array


def camera_from_entry(entry: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
  """(world_to_camera [4, 4] in OpenCV axes, intrinsics [4]) of a frame entry."""
  try:
    camera_to_world = np.asarray(entry["transform_matrix"], np.float64)
    intrinsics = np.array([entry[k] for k in ("fl_x", "fl_y", "cx", "cy")], np.float64)
  except (KeyError, TypeError, ValueError) as error:
    raise InvalidExample(where, f"frame {entry.get('file_path')}: bad camera ({error})") from error
  check_shape(where, "transform_matrix", camera_to_world, (4, 4))
  check_finite(where, "transform_matrix", camera_to_world)
  check_finite(where, "intrinsics", intrinsics)
  rotation = camera_to_world[:3, :3]
  if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4):
    raise InvalidExample(where, f"frame {entry.get('file_path')}: rotation is not orthonormal")
  camera_to_world = camera_to_world.copy()
  camera_to_world[:3, 1:3] *= -1  # OpenGL -> OpenCV axes
  return np.linalg.inv(camera_to_world).astype(np.float32), intrinsics.astype(np.float32)


def flame_from_npz(path: str, content: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`expression [E]`, `pose [15]`, `translation [3]` of one frame's FLAME parameter file."""
  missing = [k for k in FLAME_KEYS if k not in content]
  if missing:
    raise InvalidExample(path, f"missing FLAME parameters {missing}")
  flat = {k: np.asarray(content[k], np.float32).reshape(-1) for k in FLAME_KEYS}
  for key, size in _POSE_SIZES.items():
    if flat[key].size != size:
      raise InvalidExample(path, f"{key} has {flat[key].size} values, expected {size}")
  for key, value in flat.items():
    check_finite(path, key, value)
  pose = np.concatenate([flat[k] for k in ("rotation", "neck_pose", "jaw_pose", "eyes_pose")])
  return {"expression": flat["expr"], "pose": pose, "translation": flat["translation"]}


def _load_frame(raw_dir: str, entry: dict, where: str) -> dict[str, np.ndarray]:
  height, width = int(entry["h"]), int(entry["w"])
  world_to_camera, intrinsics = camera_from_entry(entry, where)
  image = _read_image(os.path.join(raw_dir, entry["file_path"]), "RGB", height, width)
  mask = np.full((height, width), 255, np.uint8)
  if entry.get("fg_mask_path"):
    mask = _read_image(os.path.join(raw_dir, entry["fg_mask_path"]), "L", height, width)
  flame_path = os.path.join(raw_dir, entry["flame_param_path"])
  return {
    "image": image,
    "mask": mask,
    "world_to_camera": world_to_camera,
    "intrinsics": intrinsics,
    **flame_from_npz(flame_path, _read_npz(flame_path)),
    "timestep": np.int32(entry["timestep_index"]),
    "camera": np.int32(entry["camera_index"]),
  }


def _subject(raw_dir: str, first_flame: str) -> dict[str, np.ndarray]:
  canonical = os.path.join(raw_dir, "canonical_flame_param.npz")
  path = canonical if os.path.isfile(canonical) else first_flame
  content = _read_npz(path)
  if "shape" not in content:
    raise InvalidExample(path, "missing the identity 'shape'")
  shape = np.asarray(content["shape"], np.float32).reshape(-1)
  static_offset = np.asarray(content.get("static_offset", np.zeros((0, 3))), np.float32)
  static_offset = static_offset.reshape(-1, 3)
  check_finite(path, "shape", shape)
  check_finite(path, "static_offset", static_offset)
  return {"shape": shape, "static_offset": static_offset}


def build(raw_dir: str, data_dir: str, skip_invalid: bool = False) -> dict[str, int]:
  """Validates and decodes every split of `raw_dir` into `data_dir/nersemble/`."""
  if not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"{raw_dir}: raw dataset directory not found")
  out = os.path.join(data_dir, NAME)
  os.makedirs(out, exist_ok=True)
  sizes, skipped, image_size, first_flame = {}, {}, None, None
  for split in SPLITS:
    where = os.path.join(raw_dir, f"transforms_{split}.json")
    frames = read_transforms(where)["frames"]
    validator = ExampleValidator(skip_invalid=skip_invalid)
    examples = []
    for entry in frames:
      with validator.validated(os.path.join(raw_dir, str(entry.get("file_path")))):
        example = _load_frame(raw_dir, entry, where)
        if image_size is None:
          image_size = example["image"].shape[:2]
          first_flame = os.path.join(raw_dir, entry["flame_param_path"])
        elif example["image"].shape[:2] != image_size:
          raise InvalidExample(
            os.path.join(raw_dir, entry["file_path"]),
            f"image is {example['image'].shape[:2]}, the others {image_size}",
          )
        examples.append(example)
    validator.report(split)
    skipped[split] = len(validator.skipped)
    if not examples:
      raise ValueError(f"{where}: no usable frames")
    arrays = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    np.savez(os.path.join(out, f"{split}.npz"), **arrays)
    sizes[split] = len(examples)
  np.savez(os.path.join(out, "subject.npz"), **_subject(raw_dir, first_flame))
  info = {"name": NAME, "splits": sizes, "image_size": list(image_size), "skipped": skipped}
  with open(os.path.join(out, "dataset_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  return sizes


def load_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
  """The arrays of one built split (see the module docstring)."""
  path = os.path.join(data_dir, NAME, f"{split}.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no built {NAME} split {split!r} (run `fdjax data build`)")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def load_subject(data_dir: str) -> dict[str, np.ndarray]:
  """`shape [S]` and `static_offset [V, 3]` of the built subject."""
  path = os.path.join(data_dir, NAME, "subject.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no built {NAME} subject (run `fdjax data build`)")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def inspect(data_dir: str, out_png: str | None = None) -> dict:
  """Counts, image size and pixel statistics per split; a sheet of one frame's views."""
  report = {}
  for split in SPLITS:
    arrays = load_split(data_dir, split)
    images = arrays["image"]
    report[split] = {
      "num_examples": len(images),
      "image": list(images.shape[1:]),
      "cameras": sorted(set(arrays["camera"].tolist())),
      "timesteps": len(set(arrays["timestep"].tolist())),
      "pixel_mean": [round(float(x), 2) for x in images.reshape(-1, 3).mean(0)],
      "foreground": round(float(arrays["mask"].mean() / 255), 3),
    }
  if out_png:
    from PIL import Image

    train = load_split(data_dir, "train")
    views = train["image"][train["timestep"] == train["timestep"][0]]
    Image.fromarray(np.concatenate(list(views), axis=1)).save(out_png)
    report["sheet"] = out_png
  return report
