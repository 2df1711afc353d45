"""`fdjax stabilize`: a registered mesh sequence with the head's rigid motion taken out.

    fdjax stabilize --mesh_seq IN.npy --out OUT.npy (--workdir W | --artifact DIR)
        [--reference 0] [--transforms T.npy] [--batch 32] [--step N] [--params raw|ema]

`IN.npy` is `[T, V, 3]` or `[T, 3 V]` (the `vertices_npy` form), metres, registered to the
head model's topology. For every frame `t` the stabiliser (a `stabilize` run's latest
checkpoint, or an artifact `fdjax export` wrote from one) predicts the rigid motion taking the
skull under frame `t` onto the skull under the reference frame, and frame `t` is moved by it:
the skull then stays where it is in the reference frame and only skin motion remains. The
reference frame is left as it is. `OUT.npy` has the input's layout; `--transforms` also
writes the `[T, 4, 4]` transforms (`x_ref = R x_t + t`). Prints a JSON summary; bad input
(an unreadable file, the wrong vertex count, a reference frame out of range) is a one-line
error naming the file or flag, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from fdjax import export
from fdjax.checkpoint import CheckpointRestoreError
from fdjax.fit import MeshSequenceError, read_mesh_sequence
from fdjax.metrics import rigid

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]  # vertices [b,2,V,3], mask -> [b,4,4]


class StabilizeError(ValueError):
  """Input `fdjax stabilize` cannot use; the message names the file or flag."""


def stabilize_sequence(
  predict: Predict, vertices: np.ndarray, *, reference: int = 0, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
  """Every frame of `vertices [T, V, 3]` moved onto the reference frame's skull.

  `predict(pairs [b, 2, V, 3], mask [b, 2, V]) -> [b, 4, 4]` maps the skull of `pairs[:, 0]`
  onto that of `pairs[:, 1]`. Returns `(stabilised [T, V, 3], transforms [T, 4, 4])`; the
  reference frame's transform is the identity.
  """
  num_frames = len(vertices)
  if not 0 <= reference < num_frames:
    raise StabilizeError(f"--reference {reference}: the sequence has frames 0 to {num_frames - 1}")
  transforms = np.zeros((num_frames, 4, 4), np.float32)
  for start in range(0, num_frames, batch):
    frames = vertices[start : start + batch]
    pairs = np.stack([frames, np.broadcast_to(vertices[reference], frames.shape)], axis=1)
    mask = np.ones(pairs.shape[:3], bool)
    transforms[start : start + len(frames)] = np.asarray(predict(pairs, mask))
  transforms[reference] = np.eye(4, dtype=np.float32)
  stabilised = np.asarray(rigid.apply_transform(transforms, vertices), np.float32)
  return stabilised, transforms


def run_config(workdir: str):
  """The saved config of a `stabilize` run."""
  from fdjax import config as config_lib

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise StabilizeError(f"--workdir {workdir}: no config.json (not a training run's workdir)")
  config = config_lib.load_json_config(path)
  if config.task != "stabilize":
    raise StabilizeError(f"--workdir {workdir}: a {config.task!r} run, not a stabilize run")
  return config


def predictor_from_workdir(config, workdir: str, step: int | None, params: str | None) -> Predict:
  """The stabiliser of a `stabilize` run's checkpoint (latest, or `step`)."""
  from fdjax import trainer

  task, model, restored, _ = trainer.restore_params(config, workdir, step, params=params)
  fn = jax.jit(task.predict_fn(config, model)[0])
  return lambda pairs, mask: jax.device_get(fn(restored, pairs, mask))


def predictor_from_artifact(directory: str) -> tuple[Predict, int]:
  """`(predict, num_vertices)` from an exported `stabilize` artifact."""
  artifact = export.load(directory)
  shapes = {s["name"]: s["shape"] for s in artifact.inputs}
  if set(shapes) != {"vertices", "vertex_mask"}:
    raise StabilizeError(
      f"--artifact {directory}: inputs {sorted(shapes)}, not a stabilize artifact's "
      "(vertices, vertex_mask)"
    )
  batch = shapes["vertices"][0]

  def predict(pairs, mask):
    if isinstance(batch, int) and len(pairs) != batch:  # a fixed batch: pad the last chunk
      pad = batch - len(pairs)
      pairs = np.concatenate([pairs, np.repeat(pairs[-1:], pad, 0)])
      mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
      return np.asarray(artifact(vertices=pairs, vertex_mask=mask))[: batch - pad]
    return np.asarray(artifact(vertices=pairs, vertex_mask=mask))

  return predict, int(shapes["vertices"][2])


def main(argv: list[str]) -> int:
  """`fdjax stabilize ...`; returns the exit status."""
  parser = argparse.ArgumentParser(prog="fdjax stabilize", description=__doc__.split("\n")[0])
  parser.add_argument("--mesh_seq", required=True, help="registered sequence .npy, [T, V, 3]")
  parser.add_argument("--out", required=True, help="stabilised sequence .npy to write")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a stabilize training run (its latest checkpoint)")
  source.add_argument("--artifact", help="a directory `fdjax export` wrote from such a run")
  parser.add_argument("--reference", type=int, default=0, help="frame to stabilise to")
  parser.add_argument("--transforms", help="also write the [T, 4, 4] transforms here (.npy)")
  parser.add_argument("--batch", type=int, default=32, help="frames per stabiliser call")
  parser.add_argument("--step", type=int, default=None, help="--workdir: checkpoint step")
  parser.add_argument("--params", choices=("raw", "ema"), default=None, help="--workdir: which")
  parser.add_argument("--verbose", action="store_true", help="full traceback on errors")
  args = parser.parse_args(argv)
  start = time.monotonic()
  try:
    if args.workdir:  # the input is checked before the checkpoint is restored
      from fdjax.tasks import stabilize as task

      config = run_config(args.workdir)
      num_vertices = task.head_model(config).num_vertices
    else:
      predict, num_vertices = predictor_from_artifact(args.artifact)
    vertices = read_mesh_sequence(args.mesh_seq, num_vertices)
    if not 0 <= args.reference < len(vertices):
      raise StabilizeError(
        f"--reference {args.reference}: {args.mesh_seq} has frames 0 to {len(vertices) - 1}"
      )
    if args.workdir:
      predict = predictor_from_workdir(config, args.workdir, args.step, args.params)
    stabilised, transforms = stabilize_sequence(
      predict, vertices, reference=args.reference, batch=args.batch
    )
  except (
    StabilizeError,
    MeshSequenceError,
    CheckpointRestoreError,
    export.ArtifactError,
    export.SignatureError,
  ) as e:
    if args.verbose:
      raise
    print(f"fdjax stabilize: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  as_read = np.load(args.mesh_seq, mmap_mode="r", allow_pickle=False)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.save(args.out, stabilised.reshape(as_read.shape))
  if args.transforms:
    np.save(args.transforms, transforms)
  angles = np.asarray(rigid.rotation_error_deg(transforms, np.eye(4, dtype=np.float32)))
  summary = {
    "frames": len(vertices),
    "reference": args.reference,
    "mean_rotation_removed_deg": round(float(angles.mean()), 4),
    "seconds": round(time.monotonic() - start, 1),
  }
  print(json.dumps(summary))
  return 0
