"""The FLAME head model: its model files, and linear blend skinning in JAX.

FLAME (Li et al., "Learning a model of facial shape and expression from 4D scans", 2017) is the
5023-vertex topology of VOCASET and of most FLAME-space work. Where this sits: tasks that predict
head-model coefficients decode them here into `vertices [..., V, 3]`, so vertex losses and LVE
apply; `fdjax data synth head_model` writes a stand-in model in the real files' layout.

The skinning is written from the published description (the SMPL and FLAME papers): identity and
expression blend shapes, joints regressed from the shaped template, Rodrigues rotations, pose
correctives linear in the entries of (R - I) of the non-root joints, the kinematic chain, and
linear blend skinning with the rest pose removed. Landmarks are barycentric points on triangles.

The model pickle (`generic_model.pkl`, a Python 2 pickle with chumpy arrays and a scipy sparse
joint regressor) is read by the restricted unpickler of `data_pipelines/ops/safe_pickle.py`,
extended with inert stand-ins for `chumpy.ch.Ch` and scipy's csc/csr matrices that only collect
their pickled state; neither chumpy nor scipy code runs, and any other global is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.ops import safe_pickle

Array = jax.Array

JOINTS = ("global", "neck", "jaw", "left_eye", "right_eye")  # FLAME's kinematic tree, in order
NUM_SHAPE = 300  # identity components first in `shapedirs`; the expression components follow

# Below this squared angle (rad^2) Rodrigues uses Taylor series: exact to float32 and with
# finite gradients at zero rotation.
_SMALL_ANGLE2 = 1e-2


class FlameFileError(ValueError):
  """A FLAME model or landmark file that cannot be read; the message names the file."""

  def __init__(self, path: str, reason: str):
    self.path = path
    super().__init__(f"{path}: {' '.join(str(reason).split())}")


@dataclasses.dataclass(frozen=True)
class FlameModel:
  """A head model's arrays (a pytree; `parents` is static)."""

  template: Array  # [V, 3] mean head, metres (`v_template`)
  shape_basis: Array  # [V, 3, S] identity blend shapes (`shapedirs[..., :300]`)
  expression_basis: Array  # [V, 3, E] expression blend shapes (`shapedirs[..., 300:]`)
  pose_basis: Array  # [V, 3, 9 * (K - 1)] pose correctives per entry of (R - I) (`posedirs`)
  joint_regressor: Array  # [K, V] joint locations as vertex averages (`J_regressor`)
  skinning_weights: Array  # [V, K] each vertex's weight per joint, rows sum to 1 (`weights`)
  faces: Array  # [F, 3] int32 triangles (`f`)
  landmark_faces: Array  # [L] int32 triangle of each landmark
  landmark_barycentric: Array  # [L, 3] barycentric coordinates of each landmark on it
  parents: tuple[int, ...]  # [K] parent joint of each joint, -1 for the root (`kintree_table[0]`)

  @property
  def num_vertices(self) -> int:
    return self.template.shape[0]

  @property
  def num_joints(self) -> int:
    return len(self.parents)


jax.tree_util.register_dataclass(
  FlameModel,
  data_fields=[f.name for f in dataclasses.fields(FlameModel) if f.name != "parents"],
  meta_fields=["parents"],
)


class FlameOutput(NamedTuple):
  vertices: Array  # [..., V, 3] posed and translated mesh
  joints: Array  # [..., K, 3] posed joint locations
  landmarks: Array  # [..., L, 3] landmarks on the posed mesh


# --- Rotations and skinning ------------------------------------------------------------------


def rodrigues(axis_angle: Array) -> Array:
  """Rotation matrices from axis-angle vectors: [..., 3] -> [..., 3, 3].

  R = I + (sin t / t) K + ((1 - cos t) / t^2) K^2 with K the cross-product matrix of the vector
  and t its length; K^2 = a a^T - t^2 I. Near zero both factors come from their Taylor series, so
  R and its gradient are finite and exact there.
  """
  axis_angle = jnp.asarray(axis_angle)
  x, y, z = axis_angle[..., 0], axis_angle[..., 1], axis_angle[..., 2]
  angle2 = x * x + y * y + z * z  # [...]
  small = angle2 < _SMALL_ANGLE2
  angle = jnp.sqrt(jnp.where(small, 1.0, angle2))
  half = 0.5 * angle
  sin_factor = jnp.where(small, 1 - angle2 / 6 + angle2**2 / 120, jnp.sin(angle) / angle)
  # (1 - cos t) / t^2 = (sin(t/2) / t)^2 * 2, without the cancellation of 1 - cos t.
  cos_factor = jnp.where(
    small, 0.5 - angle2 / 24 + angle2**2 / 720, 0.5 * jnp.square(jnp.sin(half) / half)
  )
  zero = jnp.zeros_like(x)
  cross = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*x.shape, 3, 3)
  eye = jnp.eye(3, dtype=axis_angle.dtype)
  cross2 = axis_angle[..., :, None] * axis_angle[..., None, :] - angle2[..., None, None] * eye
  return eye + sin_factor[..., None, None] * cross + cos_factor[..., None, None] * cross2


def landmarks_from_vertices(
  vertices: Array, faces: Array, landmark_faces: Array, landmark_barycentric: Array
) -> Array:
  """Barycentric points on triangles: vertices [..., V, 3] -> landmarks [..., L, 3]."""
  corners = vertices[..., faces[landmark_faces], :]  # [..., L, 3 corners, 3]
  return jnp.einsum("...lcx,lc->...lx", corners, landmark_barycentric.astype(vertices.dtype))


def blend(coefficients: Array, basis: Array, dtype: jnp.dtype = jnp.float32) -> Array:
  """[..., N] x [V, 3, >= N] -> [..., V, 3], in `dtype` with float32 accumulation; float32
  matmuls at full precision (accelerators otherwise round float32 operands)."""
  return jnp.einsum(
    "...n,vcn->...vc",
    coefficients.astype(dtype),
    basis[..., : coefficients.shape[-1]].astype(dtype),
    precision=jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None,
    preferred_element_type=jnp.float32,
  )


def blend_shapes(
  model: FlameModel, shape: Array, expression: Array, *, dtype: jnp.dtype = jnp.float32
) -> Array:
  """The shaped template `T + S beta + E psi`: [..., V, 3] at the broadcast of the leading dims
  of `shape [..., S']` and `expression [..., E']` (the first S', E' components are used)."""
  shape, expression = (jnp.asarray(a, jnp.float32) for a in (shape, expression))
  for name, value, size in (
    ("shape", shape, model.shape_basis.shape[-1]),
    ("expression", expression, model.expression_basis.shape[-1]),
  ):
    if value.shape[-1] > size:
      raise ValueError(f"{name} has {value.shape[-1]} coefficients; the model has {size}")
  # Identity and expression blend at their own leading shapes (one identity for many frames).
  return (
    model.template
    + blend(shape, model.shape_basis, dtype)
    + blend(expression, model.expression_basis, dtype)
  )


def flame_forward(
  model: FlameModel,
  shape: Array,
  expression: Array,
  pose: Array,
  translation: Array | None = None,
  *,
  dtype: jnp.dtype = jnp.float32,
) -> FlameOutput:
  """The head mesh for head-model coefficients (a pure function: jit, vmap and grad apply).

  Leading dimensions `...` of the arguments broadcast against each other (e.g. `shape [B, 1, S]`
  with `expression [B, T, E]`); a batch sharded over devices stays sharded.

  Args:
    model: the head model.
    shape: [..., S'] identity coefficients, S' <= S (the first S' components are used).
    expression: [..., E'] expression coefficients, E' <= E.
    pose: [..., 3 K] axis-angle rotation per joint in `JOINTS` order (global, neck, jaw, eyes).
    translation: [..., 3] added to everything last; None for zero.
    dtype: compute dtype of the blend-shape contractions (the bulk of the FLOPs: identity,
      expression and pose correctives), e.g. `jnp.bfloat16`; they accumulate in float32, and the
      joints, kinematic chain and skinning are always float32.

  Returns:
    `FlameOutput` of float32 `vertices [..., V, 3]`, `joints [..., K, 3]`, `landmarks [..., L, 3]`.
  """
  shaped = blend_shapes(model, shape, expression, dtype=dtype)
  return articulate(model, shaped, pose, translation, dtype=dtype)


def articulate(
  model: FlameModel,
  shaped: Array,
  pose: Array,
  translation: Array | None = None,
  *,
  dtype: jnp.dtype = jnp.float32,
) -> FlameOutput:
  """Poses a shaped template (`blend_shapes`): joints regressed from `shaped [..., V, 3]`, pose
  correctives, the kinematic chain, skinning, landmarks, then `translation`. For a fixed pose
  this is affine in `shaped` (what `fdjax/fit.py` exploits). Arguments as `flame_forward`."""
  num_joints = model.num_joints
  shaped, pose = jnp.asarray(shaped, jnp.float32), jnp.asarray(pose, jnp.float32)
  if translation is None:
    translation = jnp.zeros((*pose.shape[:-1], 3), jnp.float32)
  translation = jnp.asarray(translation, jnp.float32)
  if pose.shape[-1] != 3 * num_joints or translation.shape[-1] != 3:
    raise ValueError(
      f"pose must be [..., {3 * num_joints}] and translation [..., 3], got "
      f"{tuple(pose.shape)} and {tuple(translation.shape)}"
    )
  batch = jnp.broadcast_shapes(shaped.shape[:-2], pose.shape[:-1], translation.shape[:-1])
  pose, translation = (jnp.broadcast_to(a, (*batch, a.shape[-1])) for a in (pose, translation))
  exact = jax.lax.Precision.HIGHEST
  shaped = jnp.broadcast_to(shaped, (*batch, *shaped.shape[-2:]))  # [..., V, 3]
  joints = jnp.einsum("kv,...vc->...kc", model.joint_regressor, shaped, precision=exact)

  rotations = rodrigues(pose.reshape(*batch, num_joints, 3))  # [..., K, 3, 3]
  pose_feature = (rotations[..., 1:, :, :] - jnp.eye(3)).reshape(*batch, 9 * (num_joints - 1))
  posed = shaped + blend(pose_feature, model.pose_basis, dtype)  # [..., V, 3]
  # World transform of each joint: its parent's, then its own rotation about its rest location.
  world_rotations = [rotations[..., 0, :, :]]
  world_joints = [joints[..., 0, :]]
  for k in range(1, num_joints):
    parent = model.parents[k]
    offset = joints[..., k, :] - joints[..., parent, :]
    world_rotations.append(
      jnp.matmul(world_rotations[parent], rotations[..., k, :, :], precision=exact)
    )
    world_joints.append(
      world_joints[parent]
      + jnp.einsum("...ij,...j->...i", world_rotations[parent], offset, precision=exact)
    )
  world_rotations = jnp.stack(world_rotations, -3)  # [..., K, 3, 3]
  world_joints = jnp.stack(world_joints, -2)  # [..., K, 3]
  # Skinning transforms with the rest pose removed: x -> R (x - j_rest) + j_posed.
  skin_translations = world_joints - jnp.einsum(
    "...kij,...kj->...ki", world_rotations, joints, precision=exact
  )
  weights = model.skinning_weights
  vertex_rotations = jnp.einsum("vk,...kij->...vij", weights, world_rotations, precision=exact)
  vertex_translations = jnp.einsum("vk,...ki->...vi", weights, skin_translations, precision=exact)
  vertices = (
    jnp.einsum("...vij,...vj->...vi", vertex_rotations, posed, precision=exact)
    + vertex_translations
  )

  offset = translation[..., None, :]
  landmarks = landmarks_from_vertices(
    vertices, model.faces, model.landmark_faces, model.landmark_barycentric
  )
  return FlameOutput(
    vertices=vertices + offset, joints=world_joints + offset, landmarks=landmarks + offset
  )


# --- Reading the model files ------------------------------------------------------------------


class _PickledState:
  """An inert stand-in for a class a model pickle names: it records the pickled state, no more.

  Created empty (NEWOBJ or copy_reg._reconstructor), then given its state dict (BUILD).
  """

  __slots__ = ("state",)
  pickled_as = "?"

  def __new__(cls, *args: Any) -> _PickledState:
    if args:
      raise pickle.UnpicklingError(f"{cls.pickled_as} with constructor arguments is not supported")
    instance = object.__new__(cls)
    instance.state = None
    return instance

  def __init__(self, *args: Any) -> None:
    if args:
      raise pickle.UnpicklingError(f"{self.pickled_as} with constructor arguments is not supported")

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"{self.pickled_as} state is {type(state).__name__}, not dict")
    self.state = state

  def to_numpy(self) -> np.ndarray:
    raise NotImplementedError


class _ChumpyArray(_PickledState):
  """`chumpy.ch.Ch`: a terminal chumpy array keeps its value in the state's `x`."""

  __slots__ = ()
  pickled_as = "chumpy.ch.Ch"

  def to_numpy(self) -> np.ndarray:
    value = (self.state or {}).get("x")
    if not isinstance(value, np.ndarray | float | int):
      raise pickle.UnpicklingError(
        "chumpy.ch.Ch without an array `x` (not a terminal chumpy array)"
      )
    return np.asarray(value)


class _SparseMatrix(_PickledState):
  """scipy's csc/csr matrix: `data`, `indices`, `indptr` and `_shape`, densified with numpy."""

  __slots__ = ()
  compressed_axis = 1  # csc: columns are compressed; csr sets 0

  def to_numpy(self) -> np.ndarray:
    state = self.state or {}
    try:
      data, indices, indptr = (np.asarray(state[k]) for k in ("data", "indices", "indptr"))
      shape = tuple(int(n) for n in state.get("_shape", state.get("shape")))
    except (KeyError, TypeError, ValueError) as e:
      raise pickle.UnpicklingError(
        f"{self.pickled_as} state lacks data/indices/indptr/_shape"
      ) from e
    if len(shape) != 2 or min(shape) < 0:
      raise pickle.UnpicklingError(f"{self.pickled_as} has shape {shape}")
    compressed, other = shape[self.compressed_axis], shape[1 - self.compressed_axis]
    counts = np.diff(indptr)
    if (
      indptr.shape != (compressed + 1,)
      or indptr[0] != 0
      or (counts < 0).any()
      or indptr[-1] != len(indices)
      or len(indices) != len(data)
      or (len(indices) and (indices.min() < 0 or indices.max() >= other))
    ):
      raise pickle.UnpicklingError(f"{self.pickled_as} has inconsistent index arrays")
    dense = np.zeros(shape, np.result_type(data.dtype, np.float32))
    outer = np.repeat(np.arange(compressed), counts)
    rows, cols = (indices, outer) if self.compressed_axis == 1 else (outer, indices)
    np.add.at(dense, (rows, cols), data)  # duplicates sum, as scipy's todense does
    return dense


def _sparse_class(name: str, module: str, compressed_axis: int) -> type[_SparseMatrix]:
  return type(
    f"_Sparse_{name}",
    (_SparseMatrix,),
    {"__slots__": (), "pickled_as": f"{module}.{name}", "compressed_axis": compressed_axis},
  )


def _reconstructor(cls: Any, base: Any, state: Any) -> _PickledState:
  """`copy_reg._reconstructor` (protocol 0/1 pickles of plain classes), for stand-ins only."""
  if not (isinstance(cls, type) and issubclass(cls, _PickledState)) or base is not object:
    raise pickle.UnpicklingError(f"refused copy_reg._reconstructor of {cls!r}")
  if state is not None:
    raise pickle.UnpicklingError(f"refused copy_reg._reconstructor of {cls.pickled_as} with state")
  return cls.__new__(cls)


def _set(items: Any = ()) -> set:
  """`set` as pickles of chumpy state use it: from a list or tuple only."""
  if not isinstance(items, list | tuple):
    raise pickle.UnpicklingError(f"refused set() of {type(items).__name__}")
  return set(items)


def _flame_globals() -> dict[tuple[str, str], Any]:
  extra: dict[tuple[str, str], Any] = {("chumpy.ch", "Ch"): _ChumpyArray}
  for builtins in ("__builtin__", "builtins"):
    extra[(builtins, "set")] = _set
    extra[(builtins, "object")] = object
  for copyreg in ("copy_reg", "copyreg"):
    extra[(copyreg, "_reconstructor")] = _reconstructor
  for kind, compressed_axis in (("csc", 1), ("csr", 0)):
    for module in (f"scipy.sparse.{kind}", f"scipy.sparse._{kind}"):
      for suffix in ("matrix", "array"):
        name = f"{kind}_{suffix}"
        extra[(module, name)] = _sparse_class(name, module, compressed_axis)
  return extra


FLAME_PICKLE_GLOBALS = _flame_globals()


def _plain(value: Any) -> Any:
  """Replaces stand-ins by numpy arrays, through dicts, lists and tuples."""
  if isinstance(value, _PickledState):
    return value.to_numpy()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return type(value)(_plain(v) for v in value)
  return value


def read_flame_pickle(path: str | os.PathLike) -> Any:
  """A FLAME-format pickle's content, chumpy arrays and sparse matrices as numpy arrays.

  Raises:
    safe_pickle.UnsafePickleError: the pickle names a global outside numpy, plain data, chumpy
      terminal arrays and scipy csc/csr matrices (nothing of it runs).
    FlameFileError: the file is missing, truncated or not a pickle of that kind.
  """
  path = os.fspath(path)
  try:
    return _plain(safe_pickle.load_pickle(path, FLAME_PICKLE_GLOBALS))
  except safe_pickle.UnsafePickleError:
    raise
  except Exception as e:  # any failure to decode a stranger's file: name the file, one line
    raise FlameFileError(path, f"not a readable pickle ({type(e).__name__}: {e})") from e


def _read_npy(path: str) -> Any:
  """An .npy file; an object array (a pickled dict, as FLAME's landmark_embedding.npy) is read
  by the restricted unpickler instead of numpy's, which would run it."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    _, _, dtype = header(f)
    if not dtype.hasobject:
      f.seek(0)
      return np.load(f, allow_pickle=False)
    content = _plain(safe_pickle.loads_pickle(f.read(), path, FLAME_PICKLE_GLOBALS))
  if isinstance(content, np.ndarray) and content.dtype.hasobject and content.shape == ():
    return _plain(content[()])
  return content


def _read_arrays(path: str) -> Mapping[str, Any]:
  """A dict of arrays from .pkl, .npz or .npy (object array of a dict)."""
  extension = os.path.splitext(path)[1].lower()
  try:
    if extension == ".npz":
      with np.load(path, allow_pickle=False) as archive:
        content = {k: archive[k] for k in archive.files}
    elif extension == ".npy":
      content = _read_npy(path)
    else:
      return _as_dict(path, read_flame_pickle(path))
  except (safe_pickle.UnsafePickleError, FlameFileError):
    raise
  except Exception as e:
    raise FlameFileError(path, f"not a readable {extension} file ({type(e).__name__}: {e})") from e
  return _as_dict(path, content)


def _as_dict(path: str, content: Any) -> Mapping[str, Any]:
  if not isinstance(content, Mapping):
    raise FlameFileError(path, f"expected a dict of arrays, got {type(content).__name__}")
  return content


def _array(path: str, content: Mapping[str, Any], keys: tuple[str, ...], dtype) -> np.ndarray:
  for key in keys:
    if key in content:
      value = content[key]
      if callable(getattr(value, "toarray", None)):  # a scipy sparse matrix built in memory
        value = value.toarray()
      try:
        value = np.asarray(value, dtype)
      except (TypeError, ValueError) as e:
        raise FlameFileError(path, f"{key!r} is not a {np.dtype(dtype).name} array: {e}") from e
      if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise FlameFileError(path, f"{key!r} has non-finite values")
      return value
  raise FlameFileError(
    path, f"missing {' / '.join(map(repr, keys))}; has {sorted(map(str, content))}"
  )


def read_landmark_embedding(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Static landmark embedding: (triangle [L] int32, barycentric coordinates [L, 3] float32).

  Reads the smplx/RingNet `flame_static_embedding.pkl` (`lmk_face_idx`, `lmk_b_coords`), FLAME's
  `landmark_embedding.npy` (`static_lmk_faces_idx`, `static_lmk_bary_coords`) or an .npz/.pkl
  with `lmk_faces_idx`, `lmk_bary_coords`.
  """
  path = os.fspath(path)
  content = _read_arrays(path)
  faces = _array(path, content, ("lmk_faces_idx", "lmk_face_idx", "static_lmk_faces_idx"), np.int64)
  barycentric = _array(
    path, content, ("lmk_bary_coords", "lmk_b_coords", "static_lmk_bary_coords"), np.float32
  )
  if faces.ndim != 1 or barycentric.shape != (faces.shape[0], 3):
    raise FlameFileError(
      path, f"landmarks must be [L] and [L, 3], got {faces.shape} and {barycentric.shape}"
    )
  return faces.astype(np.int32), barycentric


def flame_model_from_arrays(
  content: Mapping[str, Any],
  landmark_faces: np.ndarray | None = None,
  landmark_barycentric: np.ndarray | None = None,
  *,
  num_shape: int = NUM_SHAPE,
  name: str = "<arrays>",
) -> FlameModel:
  """A `FlameModel` from the model file's dict (`v_template`, `shapedirs`, ...), validated.

  `posedirs` may be [V, 3, P], [3 V, P] or [P, 3 V]; `J_regressor` dense or scipy sparse;
  `kintree_table` [2, K] with joints in topological order. `name` stands in for the path in errors.
  """
  template = _array(name, content, ("v_template",), np.float32)
  if template.ndim != 2 or template.shape[1] != 3:
    raise FlameFileError(name, f"v_template must be [V, 3], got {template.shape}")
  num_vertices = template.shape[0]
  shapedirs = _array(name, content, ("shapedirs",), np.float32)
  if shapedirs.shape[:2] != (num_vertices, 3) or shapedirs.ndim != 3:
    raise FlameFileError(name, f"shapedirs must be [{num_vertices}, 3, N], got {shapedirs.shape}")
  if shapedirs.shape[2] <= num_shape:
    raise FlameFileError(
      name,
      f"shapedirs has {shapedirs.shape[2]} components: none left for expression after {num_shape}",
    )
  kintree = _array(name, content, ("kintree_table",), np.int64)
  if kintree.ndim != 2 or kintree.shape[0] != 2:
    raise FlameFileError(name, f"kintree_table must be [2, K], got {kintree.shape}")
  num_joints = kintree.shape[1]
  parents = (-1, *(int(p) for p in kintree[0, 1:]))
  if any(not 0 <= p < k for k, p in enumerate(parents) if k):
    raise FlameFileError(name, f"kintree_table parents {parents[1:]} are not in topological order")
  posedirs = _array(name, content, ("posedirs",), np.float32)
  num_pose = 9 * (num_joints - 1)
  if posedirs.shape == (num_vertices, 3, num_pose):
    pose_basis = posedirs
  elif posedirs.shape == (3 * num_vertices, num_pose):
    pose_basis = posedirs.reshape(num_vertices, 3, num_pose)
  elif posedirs.shape == (num_pose, 3 * num_vertices):
    pose_basis = posedirs.T.reshape(num_vertices, 3, num_pose)
  else:
    raise FlameFileError(
      name, f"posedirs must be [{num_vertices}, 3, {num_pose}] or reshaped, got {posedirs.shape}"
    )
  regressor = _array(name, content, ("J_regressor",), np.float32)
  weights = _array(name, content, ("weights",), np.float32)
  faces = _array(name, content, ("f",), np.int64)
  if regressor.shape != (num_joints, num_vertices) or weights.shape != (num_vertices, num_joints):
    raise FlameFileError(
      name,
      f"J_regressor must be [{num_joints}, {num_vertices}] and weights [{num_vertices}, "
      f"{num_joints}], got {regressor.shape} and {weights.shape}",
    )
  if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= num_vertices:
    raise FlameFileError(name, f"f must be [F, 3] vertex indices below {num_vertices}")
  if landmark_faces is None:
    landmark_faces, landmark_barycentric = np.zeros((0,), np.int32), np.zeros((0, 3), np.float32)
  landmark_faces = np.asarray(landmark_faces, np.int32)
  if len(landmark_faces) and (landmark_faces.min() < 0 or landmark_faces.max() >= len(faces)):
    raise FlameFileError(name, f"landmark triangles must be below {len(faces)}")
  return FlameModel(
    template=jnp.asarray(template),
    shape_basis=jnp.asarray(shapedirs[:, :, :num_shape]),
    expression_basis=jnp.asarray(shapedirs[:, :, num_shape:]),
    pose_basis=jnp.asarray(pose_basis),
    joint_regressor=jnp.asarray(regressor),
    skinning_weights=jnp.asarray(weights),
    faces=jnp.asarray(faces, jnp.int32),
    landmark_faces=jnp.asarray(landmark_faces),
    landmark_barycentric=jnp.asarray(landmark_barycentric, jnp.float32),
    parents=parents,
  )


def load_flame(
  model_path: str | os.PathLike,
  landmark_path: str | os.PathLike | None = None,
  *,
  num_shape: int = NUM_SHAPE,
) -> FlameModel:
  """Loads `generic_model.pkl` (or an .npz of the same keys) and a static landmark embedding.

  Example:
    model = load_flame("head_model/generic_model.pkl", "head_model/flame_static_embedding.pkl")
    out = flame_forward(model, jnp.zeros([300]), jnp.zeros([100]), jnp.zeros([15]))
  """
  model_path = os.fspath(model_path)
  landmarks = (None, None) if landmark_path is None else read_landmark_embedding(landmark_path)
  return flame_model_from_arrays(
    _read_arrays(model_path), *landmarks, num_shape=num_shape, name=model_path
  )


@functools.cache
def synthetic_head_model(seed: int = 0) -> FlameModel:
  """The synthetic stand-in (`data_pipelines/synthetic/head_model.py`), built in memory once:
  what fdjax uses wherever a head model is needed and none is given."""
  from data_pipelines.synthetic import head_model

  arrays, landmarks = head_model.make_head_model(seed)
  with jax.ensure_compile_time_eval():  # concrete arrays even when first asked inside a trace
    return flame_model_from_arrays(
      arrays, landmarks["lmk_face_idx"], landmarks["lmk_b_coords"], name="synthetic head model"
    )


def head_model(path: str = "") -> FlameModel:
  """The head model a config names: `path` to a `generic_model.pkl` (or .npz), or "" for the
  synthetic stand-in."""
  return synthetic_head_model() if not path else _load_cached(os.path.abspath(path))


@functools.cache
def _load_cached(path: str) -> FlameModel:
  with jax.ensure_compile_time_eval():
    return load_flame(path)
