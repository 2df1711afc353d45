"""`fdjax render avatar`: a trained Gaussian avatar driven by a FLAME sequence, to MP4.

    fdjax render avatar --workdir W --flame PARAMS.npz --camera CAM.json --out clip.mp4

`W` is a `gaussian_avatar` run (its config and latest checkpoint). `PARAMS.npz` is a FLAME
sequence in the layout GaussianAvatars reads for reenactment (VHAP's): per frame `expr [T, E]`,
`rotation`, `neck_pose`, `jaw_pose [T, 3]`, `eyes_pose [T, 6]`, `translation [T, 3]`, and
optionally the identity `shape [S]` and `static_offset [1, V, 3]` (default: the trained
subject's). `CAM.json` is one camera as a frame entry of `transforms_*.json` (`transform_matrix`
camera-to-world in OpenGL axes, `fl_x`, `fl_y`, `cx`, `cy`, `w`, `h`), or a whole
`transforms_*.json` of which `--camera_index` picks the frame. The rasteriser's overflow counts
over the clip are printed (non-zero means some splats were dropped for want of bucket room).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

_SIZES = {"rotation": 3, "neck_pose": 3, "jaw_pose": 3, "eyes_pose": 6, "translation": 3}


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as error:  # noqa: BLE001  a stranger's file: name it, one line
    raise ValueError(f"{path}: not a readable .npz ({type(error).__name__}: {error})") from error


def read_flame_sequence(path: str) -> dict[str, np.ndarray]:
  """`expression [T, E]`, `pose [T, 15]`, `translation [T, 3]` (+ `shape`, `static_offset`).

  `path` is one .npz of T frames, or a directory of per-frame .npz files (a VHAP export's
  `flame_param/`), taken in name order.
  """
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
    if not files:
      raise FileNotFoundError(f"{path}: no .npz FLAME parameter files in the directory")
    frames = [_read_npz(os.path.join(path, f)) for f in files]
    keys = [k for k in ("expr", *_SIZES) if all(k in frame for frame in frames)]
    content = {k: np.concatenate([np.atleast_2d(frame[k]) for frame in frames]) for k in keys}
    content.update({k: frames[0][k] for k in ("shape", "static_offset") if k in frames[0]})
  elif os.path.isfile(path):
    content = _read_npz(path)
  else:
    raise FileNotFoundError(f"{path}: FLAME parameter file not found")
  missing = [k for k in ("expr", *_SIZES) if k not in content]
  if missing:
    raise ValueError(f"{path}: missing FLAME parameters {missing}")
  expression = np.asarray(content["expr"], np.float32)
  expression = expression.reshape(-1, expression.shape[-1])
  frames = len(expression)
  parts = {}
  for key, size in _SIZES.items():
    value = np.asarray(content[key], np.float32)
    if value.size != frames * size:
      raise ValueError(f"{path}: {key} has shape {value.shape}, expected [{frames}, {size}]")
    parts[key] = value.reshape(frames, size)
  for key, value in (("expr", expression), *parts.items()):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{path}: {key} has non-finite values")
  pose = np.concatenate([parts[k] for k in ("rotation", "neck_pose", "jaw_pose", "eyes_pose")], -1)
  sequence = {"expression": expression, "pose": pose, "translation": parts["translation"]}
  for key in ("shape", "static_offset"):
    if key in content:
      sequence[key] = np.asarray(content[key], np.float32)
  return sequence


def read_camera(path: str, index: int = 0) -> tuple[np.ndarray, np.ndarray, int, int]:
  """`(world_to_camera [4, 4], intrinsics [4], height, width)` of a camera file."""
  from data_pipelines.builders import nersemble
  from data_pipelines.builders.common import InvalidExample

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: camera file not found")
  try:
    with open(path) as f:
      content = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: not readable JSON ({error})") from error
  if isinstance(content, dict) and isinstance(content.get("frames"), list):
    if not 0 <= index < len(content["frames"]):
      raise ValueError(
        f"{path}: --camera_index {index} outside its {len(content['frames'])} frames"
      )
    content = {**{k: v for k, v in content.items() if k != "frames"}, **content["frames"][index]}
  if not isinstance(content, dict) or "h" not in content or "w" not in content:
    raise ValueError(
      f"{path}: expected a camera entry with transform_matrix, fl_x, fl_y, cx, cy, w, h"
    )
  try:
    world_to_camera, intrinsics = nersemble.camera_from_entry(content, path)
  except InvalidExample as error:
    raise ValueError(str(error)) from error
  return world_to_camera, intrinsics, int(content["h"]), int(content["w"])


def main(argv: list[str]) -> int:
  """`fdjax render avatar`: see the module docstring. Returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="fdjax render avatar", description=__doc__.split("\n")[0].split(": ", 1)[1]
  )
  parser.add_argument("--workdir", required=True, help="a gaussian_avatar training run")
  parser.add_argument("--flame", required=True, help="FLAME sequence .npz (VHAP's keys)")
  parser.add_argument("--camera", required=True, help="camera .json (a transforms frame entry)")
  parser.add_argument("--camera_index", type=int, default=0, help="frame of a transforms file")
  parser.add_argument("--out", required=True, help="output .mp4")
  parser.add_argument("--fps", type=float, default=25.0, help="frame rate of the sequence")
  parser.add_argument("--step", type=int, default=None, help="checkpoint (default: latest)")
  parser.add_argument("--batch", type=int, default=8, help="frames rendered at once")
  args = parser.parse_args(argv)
  try:
    sequence = read_flame_sequence(args.flame)
    world_to_camera, intrinsics, height, width = read_camera(args.camera, args.camera_index)
    config_path = os.path.join(args.workdir, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"{config_path}: not found (is {args.workdir} a training run?)")
  except (ValueError, FileNotFoundError) as error:
    print(f"fdjax render avatar: error: {error}", file=sys.stderr)
    return 1

  from fdjax import config as config_lib
  from fdjax import trainer
  from fdjax.render.mesh import write_video

  config = config_lib.load_json_config(config_path)
  if config.task != "gaussian_avatar":
    print(f"fdjax render avatar: error: {args.workdir} trained {config.task!r}", file=sys.stderr)
    return 1
  start = time.perf_counter()
  _, model, params, collections, step = trainer.restore_variables(
    config, args.workdir, args.step, params="raw"
  )
  frames, overflow = render_sequence(
    config,
    model,
    params,
    collections,
    sequence,
    world_to_camera,
    intrinsics,
    height,
    width,
    batch=args.batch,
  )
  num_frames = write_video(frames, args.out, args.fps)
  seconds = time.perf_counter() - start
  print(
    f"wrote {args.out}: {num_frames} frames of {width}x{height} from step {step} "
    f"({num_frames / max(seconds, 1e-9):.1f} frames/s); rasteriser overflow {overflow}"
  )
  return 0


def render_sequence(
  config,
  model,
  params,
  collections,
  sequence,
  world_to_camera,
  intrinsics,
  height,
  width,
  *,
  batch: int = 8,
) -> tuple[np.ndarray, int]:
  """Frames `[T, H, W, 3] uint8` of the avatar posed by `sequence`, and the overflow total."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from data_pipelines import prepare
  from fdjax.models import flame
  from fdjax.models import gaussian_avatar as avatar_lib
  from fdjax.tasks import gaussian_avatar as task

  head, shape = task.head_model(config), sequence.get("shape")
  if shape is None or "static_offset" not in sequence:
    _, data_dir = prepare.resolve_dirs(config.data)
    subject_head, subject_shape = task.subject_model(config, data_dir)
    head = subject_head if "static_offset" not in sequence else head
    shape = subject_shape if shape is None else shape
  if "static_offset" in sequence:
    offset = sequence["static_offset"].reshape(-1, 3)[: head.num_vertices]
    head = dataclasses.replace(head, template=head.template + jnp.asarray(offset))
  pose = jax.jit(lambda m, e, p, t: flame.flame_forward(m, shape, e, p, t).vertices)
  vertices = np.asarray(
    pose(head, sequence["expression"], sequence["pose"], sequence["translation"])
  )
  state = collections[task.COLLECTION]
  effective = avatar_lib.effective_params(params, state)
  settings = {**task.render_settings(config), "height": height, "width": width}
  draw = jax.jit(
    lambda b: task.render_views(
      model, effective, state, b, render=settings, background=float(config.data.background)
    )
  )
  views = {
    "vertices": vertices,
    "world_to_camera": np.repeat(world_to_camera[None], len(vertices), 0),
    "intrinsics": np.repeat(intrinsics[None], len(vertices), 0),
  }
  images, overflow = [], 0
  for out, _, _ in task.rendered_batches(draw, views, batch):
    images.append(np.asarray(jnp.clip(out.colour * 255 + 0.5, 0, 255)).astype(np.uint8))
    overflow += int(jnp.sum(out.aux["bucket_overflow"]) + jnp.sum(out.aux["pair_overflow"]))
  return np.concatenate(images), overflow
