"""`fdjax fit flame`: head-model coefficients for a registered mesh sequence.

    fdjax fit flame --meshes SEQ.npy --out PARAMS.npz [--model generic_model.pkl]
        [--steps 1000] [--learning_rate 0.05] [--smoothness 1e-7] [--num_devices N] [--verbose]

One identity (`shape [S]`) for the whole sequence and, per frame, `expression [T, E]`,
`pose [T, 15]` and `translation [T, 3]` are fitted by Adam (cosine-decayed learning rate) to
the mean squared vertex distance, plus `smoothness` times the mean squared change of the
per-frame coefficients between consecutive frames. Frames are sharded over all devices (padded
to a multiple of the device count and masked). Without `--model` the synthetic head model
(`data_pipelines/synthetic/head_model.py`, seed 0) is used. Writes the coefficients and
`vertex_error_mm [T]` (mean vertex distance per frame) to the .npz and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines.ops import safe_pickle
from fdjax.models import flame


class MeshSequenceError(ValueError):
  """A mesh sequence file that cannot be fitted; the message names the file."""


def read_mesh_sequence(path: str, num_vertices: int) -> np.ndarray:
  """`[T, V, 3]` or `[T, 3 V]` float .npy -> float32 [T, V, 3], checked against the model."""
  try:
    vertices = np.load(path, allow_pickle=False)
  except Exception as e:  # a stranger's file: name it, one line
    raise MeshSequenceError(f"{path}: not a readable .npy ({type(e).__name__}: {e})") from e
  if vertices.ndim == 2 and vertices.shape[1] % 3 == 0:
    vertices = vertices.reshape(vertices.shape[0], -1, 3)
  if vertices.ndim != 3 or vertices.shape[2] != 3 or vertices.dtype.kind not in "fiu":
    raise MeshSequenceError(f"{path}: expected [T, V, 3] or [T, 3V] numbers, got {vertices.shape}")
  if vertices.shape[1] != num_vertices:
    raise MeshSequenceError(
      f"{path}: {vertices.shape[1]} vertices per frame; the head model has {num_vertices}"
    )
  if not len(vertices) or not np.isfinite(vertices).all():
    raise MeshSequenceError(f"{path}: no frames, or non-finite vertices")
  return vertices.astype(np.float32)


def _loss(params, model, target, frame_mask, smoothness, replicated):
  out = flame.flame_forward(
    model, params["shape"][None], params["expression"], params["pose"], params["translation"]
  )
  per_frame = jnp.mean(jnp.sum(jnp.square(out.vertices - target), -1), -1)  # [T]
  data = jnp.sum(per_frame * frame_mask) / jnp.sum(frame_mask)
  # The small per-frame coefficients are gathered (replicated) for the neighbour differences.
  gathered = [
    jax.lax.with_sharding_constraint(params[k], replicated)
    for k in ("expression", "pose", "translation")
  ]
  mask = jax.lax.with_sharding_constraint(frame_mask, replicated)
  pairs = mask[1:] * mask[:-1]  # [T - 1] consecutive valid frames
  change = sum(jnp.sum(jnp.square(jnp.diff(v, axis=0)), -1) for v in gathered)
  return data + smoothness * jnp.sum(change * pairs) / jnp.maximum(jnp.sum(pairs), 1.0)


def _fit_step(params, opt_state, model, target, frame_mask, smoothness, optimizer, replicated):
  grads = jax.grad(_loss)(params, model, target, frame_mask, smoothness, replicated)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def fit_flame(
  model: flame.FlameModel,
  vertices: np.ndarray,
  *,
  steps: int = 1000,
  learning_rate: float = 0.05,
  smoothness: float = 1e-7,
  num_devices: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Fits one identity and per-frame expression, pose and translation to `vertices [T, V, 3]`.

  Frames are sharded over the first `num_devices` devices (all by default).

  Returns:
    `(params, vertex_error_mm)`: `shape [S]`, `expression [T, E]`, `pose [T, 3 K]`,
    `translation [T, 3]`, and the mean vertex distance of each fitted frame in millimetres [T].
  """
  num_frames = len(vertices)
  devices = np.array(jax.devices()[:num_devices])
  padded = -(-num_frames // len(devices)) * len(devices)
  mesh = Mesh(devices, ("frames",))
  frames, replicated = NamedSharding(mesh, P("frames")), NamedSharding(mesh, P())
  target = np.concatenate([vertices, np.repeat(vertices[-1:], padded - num_frames, 0)])
  frame_mask = (np.arange(padded) < num_frames).astype(np.float32)
  # Start each frame's translation at the offset of its centroid from the template's.
  centring = target.mean(1) - np.asarray(model.template).mean(0)  # [T, 3]
  params = {
    "shape": jax.device_put(jnp.zeros(model.shape_basis.shape[-1]), replicated),
    "expression": jnp.zeros((padded, model.expression_basis.shape[-1])),
    "pose": jnp.zeros((padded, 3 * model.num_joints)),
    "translation": jnp.asarray(centring),
  }
  params = {k: jax.device_put(v, replicated if k == "shape" else frames) for k, v in params.items()}
  target, frame_mask = jax.device_put(target, frames), jax.device_put(frame_mask, frames)
  model = jax.device_put(model, replicated)
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01))
  opt_state = optimizer.init(params)
  step = jax.jit(_fit_step, static_argnames=("optimizer", "replicated"), donate_argnums=(0, 1))
  for _ in range(steps):
    params, opt_state = step(
      params, opt_state, model, target, frame_mask, smoothness, optimizer, replicated
    )
    # One step in flight at a time: XLA:CPU's in-process collectives deadlocked on overlapping
    # executions across fake devices.
    jax.block_until_ready(params)
  fitted = flame.flame_forward(
    model, params["shape"][None], params["expression"], params["pose"], params["translation"]
  ).vertices
  error_mm = 1000.0 * np.asarray(jnp.linalg.norm(fitted - target, axis=-1).mean(-1))
  params = {
    k: np.asarray(v) if k == "shape" else np.asarray(v)[:num_frames] for k, v in params.items()
  }
  return params, error_mm[:num_frames]


def default_head_model() -> flame.FlameModel:
  """The synthetic head model (seed 0), built in memory."""
  from data_pipelines.synthetic import head_model

  arrays, landmarks = head_model.make_head_model(0)
  return flame.flame_model_from_arrays(
    arrays, landmarks["lmk_face_idx"], landmarks["lmk_b_coords"], name="synthetic head model"
  )


def main(argv: list[str]) -> int:
  """`fdjax fit flame ...`; returns the exit status."""
  parser = argparse.ArgumentParser(prog="fdjax fit", description=__doc__.split("\n")[0])
  parser.add_argument("target", choices=("flame",), help="the model to fit")
  parser.add_argument("--meshes", required=True, help="registered sequence .npy, [T, V, 3]")
  parser.add_argument("--out", required=True, help="coefficients .npz to write")
  parser.add_argument("--model", help="generic_model.pkl (default: the synthetic head model)")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--learning_rate", type=float, default=0.05)
  parser.add_argument("--smoothness", type=float, default=1e-7)
  parser.add_argument("--num_devices", type=int, default=None, help="shard over (default: all)")
  parser.add_argument("--verbose", action="store_true", help="full traceback on errors")
  args = parser.parse_args(argv)
  start = time.monotonic()
  try:
    model = default_head_model() if args.model is None else flame.load_flame(args.model)
    vertices = read_mesh_sequence(args.meshes, model.num_vertices)
  except (MeshSequenceError, flame.FlameFileError, safe_pickle.UnsafePickleError) as e:
    if args.verbose:
      raise
    print(f"fdjax fit: {e}", file=sys.stderr)
    return 2
  params, error_mm = fit_flame(
    model,
    vertices,
    steps=args.steps,
    learning_rate=args.learning_rate,
    smoothness=args.smoothness,
    num_devices=args.num_devices,
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **params, vertex_error_mm=error_mm)
  summary = {
    "frames": len(vertices),
    "mean_vertex_error_mm": round(float(error_mm.mean()), 4),
    "max_frame_vertex_error_mm": round(float(error_mm.max()), 4),
    "seconds": round(time.monotonic() - start, 1),
  }
  print(json.dumps(summary))
  return 0
