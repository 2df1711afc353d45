"""`fdjax fit flame`: head-model coefficients for a registered mesh sequence.

    fdjax fit flame --meshes SEQ.npy --out PARAMS.npz [--model generic_model.pkl]
        [--iterations 30] [--smoothness 1e-9] [--num_devices N] [--verbose]

One identity (`shape [S]`) for the whole sequence and, per frame, `expression [T, E]`,
`pose [T, 15]` and `translation [T, 3]` minimise the mean squared vertex distance plus
`smoothness` times the mean squared change of the per-frame coefficients between consecutive
frames. The solver (docs/design.md section 17):

1. rigid start: each frame's global rotation and translation align the template to it (Kabsch);
2. Levenberg-Marquardt on everything: for a fixed pose the mesh is affine in the identity and
   expression coefficients (`flame.articulate` of `flame.blend_shapes`), so their Jacobian
   columns are the blend shapes pushed through the linearised skinning, and the pose and
   translation columns come from forward-mode differentiation. Each frame's Gauss-Newton blocks
   (`J^T J`, `J^T r`) are computed on the device holding the frame (frames sharded over the
   devices); the host solves the bordered block-tridiagonal system (per-frame blocks coupled
   by the smoothness term, all coupled through the shared identity) in float64: a block
   Thomas sweep over the frames, then the Schur complement of the identity.

Without `--model` the synthetic head model (`data_pipelines/synthetic/head_model.py`, seed 0)
is used. Writes the coefficients and `vertex_error_mm [T]` (mean vertex distance per frame)
to the .npz and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.spatial.transform import Rotation

from data_pipelines.ops import safe_pickle
from fdjax.metrics import rigid
from fdjax.models import flame

MM_PER_METRE = 1000.0
PER_FRAME = ("expression", "pose", "translation")  # the per-frame unknowns, in block order


class MeshSequenceError(ValueError):
  """A mesh sequence file that cannot be fitted; the message names the file."""


def read_mesh_sequence(path: str, num_vertices: int) -> np.ndarray:
  """`[T, V, 3]` or `[T, 3 V]` float .npy -> float32 [T, V, 3], checked against the model."""
  try:
    vertices = np.load(path, allow_pickle=False)
  except Exception as e:  # a stranger's file: name it, one line
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    raise MeshSequenceError(f"{path}: not a readable .npy ({reason})") from e
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


def rigid_start(model: flame.FlameModel, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per frame, the global rotation (axis-angle [T, 3]) and translation [T, 3] that best align
  the template, rotated about the root joint as the model rotates it, to `vertices [T, V, 3]`."""
  template = np.asarray(model.template, np.float64)  # [V, 3]
  root = np.asarray(model.joint_regressor, np.float64)[0] @ template  # [3]
  # y = R x + t_k (Kabsch) is y = R (x - root) + root + t with t = t_k + R root - root.
  source = np.broadcast_to(template, vertices.shape)
  transform = np.asarray(rigid.kabsch(source, vertices), np.float64)  # [T, 4, 4]
  rotations, offsets = transform[:, :3, :3], transform[:, :3, 3]
  translation = offsets + np.einsum("tij,j->ti", rotations, root) - root
  return Rotation.from_matrix(rotations).as_rotvec(), translation


def _frame_blocks(model, basis, shape, expression, pose, translation, target, weight):
  """One frame's Gauss-Newton blocks over (identity, expression, pose, translation).

  `basis [S + E, V, 3]` are the identity then expression blend shapes; residuals are in mm,
  scaled by `weight` (sqrt of the frame's share of the data term; 0 for padding).

  Returns `J^T J [N, N]`, `J^T r [N]` with N = S + E + 3 K + 3, and `|r|^2`.
  """
  shaped = flame.blend_shapes(model, shape, expression)

  def mesh(shaped, pose, translation):  # [V, 3] in mm
    return MM_PER_METRE * flame.articulate(model, shaped, pose, translation).vertices

  vertices, along_shaped = jax.linearize(lambda s: mesh(s, pose, translation), shaped)
  residual = (weight * (vertices - MM_PER_METRE * target)).reshape(-1)  # [3V]
  coefficient_columns = jax.vmap(along_shaped)(basis).reshape(basis.shape[0], -1)  # [S+E, 3V]
  pose_columns, translation_columns = jax.jacfwd(mesh, argnums=(1, 2))(shaped, pose, translation)
  columns = jnp.concatenate(
    [
      coefficient_columns,
      pose_columns.reshape(-1, pose.shape[-1]).T,
      translation_columns.reshape(-1, 3).T,
    ]
  )  # [N, 3V]
  columns = weight * columns
  exact = jax.lax.Precision.HIGHEST
  gram = jnp.einsum("nr,mr->nm", columns, columns, precision=exact)
  return gram, jnp.dot(columns, residual, precision=exact), jnp.sum(residual**2)


def _system(model, basis, shape, per_frame, target, weights, *, num_identity):
  """Per device: the blocks of its frames (`lax.map`), the identity's summed over all frames.

  Returns `identity_gram [S, S]`, `identity_gradient [S]` (summed), `frame_gram [T, M, N]`
  (each frame's rows of its own unknowns, M = N - S), `frame_gradient [T, M]`, `data [T]`.
  """

  def frame(xs):
    expression, pose, translation, target, weight = xs
    return _frame_blocks(model, basis, shape, expression, pose, translation, target, weight)

  expression, pose, translation = per_frame
  basis = jax.lax.pcast(basis, ("frames",), to="varying")  # tangents of per-device frames
  gram, gradient, data = jax.lax.map(frame, (expression, pose, translation, target, weights))
  s = num_identity
  identity_gram = jax.lax.psum(gram[:, :s, :s].sum(0), "frames")
  identity_gradient = jax.lax.psum(gradient[:, :s].sum(0), "frames")
  return identity_gram, identity_gradient, gram[:, s:, :], gradient[:, s:], data


def solve_bordered_tridiagonal(
  identity_gram: np.ndarray,
  identity_gradient: np.ndarray,
  frame_gram: np.ndarray,
  frame_gradient: np.ndarray,
  coupling: float,
) -> tuple[np.ndarray, np.ndarray]:
  """Solves `H d = -g` for the identity step `ds [S]` and per-frame steps `dx [T, M]`, where
  H = [[A, B^T], [B, D + coupling * L]]: `A = identity_gram`, `B_t = frame_gram[t, :, :S]`,
  `D_t = frame_gram[t, :, S:]` (block diagonal) and L the path Laplacian over frames (times the
  identity), which the smoothness term adds. Block Thomas over frames, then the Schur complement.
  """
  num_frames, size, _ = frame_gram.shape
  s = identity_gram.shape[0]
  coupled = frame_gram[:, :, :s]  # [T, M, S]
  eye = np.eye(size)
  neighbours = np.full(num_frames, 2.0)
  neighbours[[0, -1]] = 1.0
  if num_frames == 1:
    neighbours[:] = 0.0
  diagonal = frame_gram[:, :, s:] + coupling * neighbours[:, None, None] * eye  # [T, M, M]
  # Right-hand sides solved against the block-tridiagonal part: -g_t and B_t (S columns).
  rhs = np.concatenate([-frame_gradient[:, :, None], coupled], axis=2)  # [T, M, 1 + S]
  inverses, carried = [], []
  for t in range(num_frames):  # forward sweep: D'_t = D_t - c^2 D'_{t-1}^-1
    block, right = diagonal[t], rhs[t]
    if t:
      block = block - coupling**2 * inverses[-1]
      right = right + coupling * inverses[-1] @ carried[-1]
    inverses.append(np.linalg.inv(block))
    carried.append(right)
  solved = np.empty_like(rhs)
  for t in reversed(range(num_frames)):  # back substitution: X_t = D'_t^-1 (R_t + c X_{t+1})
    right = carried[t] + (coupling * solved[t + 1] if t + 1 < num_frames else 0.0)
    solved[t] = inverses[t] @ right
  # The identity's Schur complement: (A - sum B_t^T Y_t) ds = -g_s - sum B_t^T y_t.
  schur = identity_gram - np.einsum("tms,tmn->sn", coupled, solved[:, :, 1:])
  schur_rhs = -identity_gradient - np.einsum("tms,tm->s", coupled, solved[:, :, 0])
  identity_step = np.linalg.solve(schur, schur_rhs)
  frame_step = solved[:, :, 0] - solved[:, :, 1:] @ identity_step
  return identity_step, frame_step


def fit_flame(
  model: flame.FlameModel,
  vertices: np.ndarray,
  *,
  iterations: int = 30,
  smoothness: float = 1e-9,
  tolerance: float = 1e-3,
  num_devices: int | None = None,
  log=None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Fits one identity and per-frame expression, pose and translation to `vertices [T, V, 3]`.

  Levenberg-Marquardt from the rigid start (module docstring), at most `iterations` steps,
  stopping once an accepted step lowers the objective by less than `tolerance` of it. Frames
  are sharded over the first `num_devices` devices (all by default). `log(message)` is called
  once per iteration when given.

  Returns:
    `(params, vertex_error_mm)`: `shape [S]`, `expression [T, E]`, `pose [T, 3 K]`,
    `translation [T, 3]`, and the mean vertex distance of each fitted frame in millimetres [T].
  """
  num_frames = len(vertices)
  num_identity = model.shape_basis.shape[-1]
  num_expression = model.expression_basis.shape[-1]
  sizes = (num_expression, 3 * model.num_joints, 3)
  devices = np.array(jax.devices()[:num_devices])
  padded = -(-num_frames // len(devices)) * len(devices)
  mesh = Mesh(devices, ("frames",))
  frames, replicated = NamedSharding(mesh, P("frames")), NamedSharding(mesh, P())
  target = np.concatenate([vertices, np.repeat(vertices[-1:], padded - num_frames, 0)])
  # Residuals weighted so that their squared sum is the mean squared vertex distance in mm^2.
  weights = np.where(np.arange(padded) < num_frames, 1.0 / np.sqrt(num_frames * len(target[0])), 0)
  weights = weights.astype(np.float32)
  # The smoothness term in the same units: per pair of consecutive frames, c |x_t+1 - x_t|^2.
  coupling = smoothness * MM_PER_METRE**2 / max(num_frames - 1, 1)

  rotation, translation = rigid_start(model, target)
  shape = np.zeros(num_identity)
  per_frame = np.zeros((padded, sum(sizes)))  # [T, E + 3K + 3]: expression, pose, translation
  per_frame[:, num_expression : num_expression + 3] = rotation
  per_frame[:, -3:] = translation

  model = jax.device_put(model, replicated)
  basis = jax.device_put(
    jnp.concatenate([model.shape_basis, model.expression_basis], -1).transpose(2, 0, 1), replicated
  )  # [S + E, V, 3]
  target, weights = jax.device_put(target, frames), jax.device_put(weights, frames)
  system = jax.jit(
    jax.shard_map(
      functools.partial(_system, num_identity=num_identity),
      mesh=mesh,
      in_specs=(P(), P(), P(), (P("frames"),) * 3, P("frames"), P("frames")),
      out_specs=(P(), P(), P("frames"), P("frames"), P("frames")),
    )
  )

  def split(x: np.ndarray) -> tuple:
    parts = np.split(x.astype(np.float32), np.cumsum(sizes)[:-1], axis=1)
    return tuple(jax.device_put(p, frames) for p in parts)

  def evaluate(shape: np.ndarray, x: np.ndarray) -> tuple[float, tuple]:
    """The objective at (shape, x) and its Gauss-Newton blocks (valid frames, float64)."""
    blocks = system(model, basis, jnp.asarray(shape, jnp.float32), split(x), target, weights)
    # One step in flight at a time: XLA:CPU's in-process collectives deadlocked on overlapping
    # executions across fake devices.
    identity_gram, identity_gradient, frame_gram, frame_gradient, data = (
      np.asarray(b, np.float64) for b in jax.block_until_ready(blocks)
    )
    smooth = coupling * float(np.sum(np.square(np.diff(x[:num_frames], axis=0))))
    blocks = (
      identity_gram,
      identity_gradient,
      frame_gram[:num_frames],
      frame_gradient[:num_frames],
    )
    return float(data.sum()) + smooth, blocks

  current, blocks = evaluate(shape, per_frame)
  damping = 1e-3
  index = np.arange(sum(sizes))
  for iteration in range(iterations):
    identity_gram, identity_gradient, frame_gram, frame_gradient = blocks
    # The smoothness term's gradient: c (n_t x_t - x_t-1 - x_t+1), i.e. c L x.
    change = np.diff(per_frame[:num_frames], axis=0)
    laplacian = np.zeros((num_frames, sum(sizes)))
    laplacian[:-1] -= change
    laplacian[1:] += change
    frame_gradient = frame_gradient + coupling * laplacian
    while True:  # Marquardt: damp each unknown by its own curvature until the step helps
      damped_identity = identity_gram + damping * np.diag(np.diag(identity_gram) + 1e-12)
      damped_frames = frame_gram.copy()
      damped_frames[:, index, num_identity + index] *= 1.0 + damping
      damped_frames[:, index, num_identity + index] += damping * 1e-12
      identity_step, frame_step = solve_bordered_tridiagonal(
        damped_identity, identity_gradient, damped_frames, frame_gradient, coupling
      )
      candidate = per_frame.copy()
      candidate[:num_frames] += frame_step
      value, candidate_blocks = evaluate(shape + identity_step, candidate)
      if value < current or damping > 1e10:
        break
      damping *= 10.0
    if log is not None:
      log(f"iteration {iteration}: objective {current:.6g} -> {value:.6g}, damping {damping:.1e}")
    if value >= current:
      break  # no step lowers the objective: converged to float32 precision
    improvement = current - value
    shape, per_frame, current, blocks = shape + identity_step, candidate, value, candidate_blocks
    damping = max(damping / 3.0, 1e-9)
    if improvement < tolerance * current:
      break

  params = dict(zip(PER_FRAME, np.split(per_frame[:num_frames], np.cumsum(sizes)[:-1], axis=1)))
  params = {"shape": shape, **params}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  fitted = flame.flame_forward(
    model, params["shape"][None], params["expression"], params["pose"], params["translation"]
  ).vertices
  error_mm = MM_PER_METRE * np.linalg.norm(np.asarray(fitted) - vertices, axis=-1).mean(-1)
  return params, error_mm


def random_sequence(
  model: flame.FlameModel, num_frames: int, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """A sequence generated by the head model from known coefficients, to check fits against:
  one random identity (unit normal), expressions, pose (0.2 rad) and translation (1 cm) that
  follow random sinusoids over the sequence.

  Returns:
    `(vertices [T, V, 3], coefficients)` with the `fit_flame` parameter names.
  """
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 1.0, num_frames)[:, None]

  def smooth(size: int, scale: float) -> np.ndarray:
    wave = np.sin(2 * np.pi * t * rng.uniform(0.3, 1.5, size) + rng.uniform(0, 6, size))
    return (scale * wave).astype(np.float32)

  num_expression = model.expression_basis.shape[-1]
  coefficients = {
    "shape": rng.normal(size=model.shape_basis.shape[-1]).astype(np.float32),
    "expression": smooth(num_expression, 1.0) * rng.normal(size=num_expression).astype(np.float32),
    "pose": smooth(3 * model.num_joints, 0.2),
    "translation": smooth(3, 0.01),
  }
  vertices = flame.flame_forward(
    model,
    coefficients["shape"][None],
    coefficients["expression"],
    coefficients["pose"],
    coefficients["translation"],
  ).vertices
  return np.asarray(vertices), coefficients


def default_head_model() -> flame.FlameModel:
  """The synthetic head model: `flame.synthetic_head_model()` under the name callers first used."""
  return flame.synthetic_head_model()


def main(argv: list[str]) -> int:
  """`fdjax fit flame ...`; returns the exit status."""
  parser = argparse.ArgumentParser(prog="fdjax fit", description=__doc__.split("\n")[0])
  parser.add_argument("target", choices=("flame",), help="the model to fit")
  parser.add_argument("--meshes", required=True, help="registered sequence .npy, [T, V, 3]")
  parser.add_argument("--out", required=True, help="coefficients .npz to write")
  parser.add_argument("--model", help="generic_model.pkl (default: the synthetic head model)")
  parser.add_argument("--iterations", type=int, default=30, help="Levenberg-Marquardt steps")
  parser.add_argument(
    "--smoothness", type=float, default=1e-9, help="weight of the frame-to-frame change"
  )
  parser.add_argument("--num_devices", type=int, default=None, help="shard over (default: all)")
  parser.add_argument("--verbose", action="store_true", help="progress and full tracebacks")
  args = parser.parse_args(argv)
  start = time.monotonic()
  try:
    model = flame.synthetic_head_model() if args.model is None else flame.load_flame(args.model)
    vertices = read_mesh_sequence(args.meshes, model.num_vertices)
  except (MeshSequenceError, flame.FlameFileError, safe_pickle.UnsafePickleError) as e:
    if args.verbose:
      raise
    print(f"fdjax fit: {e}", file=sys.stderr)
    return 2
  params, error_mm = fit_flame(
    model,
    vertices,
    iterations=args.iterations,
    smoothness=args.smoothness,
    num_devices=args.num_devices,
    log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None,
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
