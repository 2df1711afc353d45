"""The FLAME head model: its files read without running code, and its skinning against smplx.

The oracle is the `smplx` package's PyTorch `FLAME` layer on the synthetic model that
`fdjax data synth head_model` writes. smplx reads its model with plain `pickle.load`, so it gets
the synthetic file as written (numpy arrays, a scipy sparse `J_regressor`); fdjax reads a copy in
which the arrays are chumpy arrays, as in the original `generic_model.pkl`. That copy is written
here with a fake `chumpy.ch.Ch` registered in `sys.modules` only while pickling.
"""

import os
import pickle
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.spatial.transform import Rotation

from data_pipelines import cli
from data_pipelines.ops import safe_pickle
from data_pipelines.synthetic import talking_mesh
from data_pipelines.synthetic import vocaset as vocaset_twin
from fdjax.models import flame

CHUMPY_KEYS = ("v_template", "shapedirs", "posedirs")  # chumpy arrays in the original file


class Ch:
  """Pickles as `chumpy.ch.Ch` with the state chumpy's own `__getstate__` gives a terminal."""

  def __init__(self, x):
    self.x = x

  def __getstate__(self):
    return {
      "x": self.x,
      "_dirty_vars": {"x"},
      "_itr": None,
      "_depends_on_deps": {},
      "_make_dense": False,
      "_make_sparse": False,
    }


Ch.__module__ = "chumpy.ch"


def _pickle_with_fake_chumpy(content, path, protocol):
  package, module = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
  module.Ch, package.ch = Ch, module
  sys.modules.update({"chumpy": package, "chumpy.ch": module})
  try:
    with open(path, "wb") as f:
      pickle.dump(content, f, protocol=protocol)
  finally:
    del sys.modules["chumpy"], sys.modules["chumpy.ch"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The synthetic model via the CLI, a chumpy copy, and the directory smplx reads."""
  root = tmp_path_factory.mktemp("head_model")
  out = root / "synth"
  assert cli.main(["synth", "head_model", "--out", str(out)]) == 0
  plain = flame.read_flame_pickle(out / "generic_model.pkl")
  assert isinstance(plain["J_regressor"], np.ndarray)  # the sparse matrix, densified
  with open(out / "generic_model.pkl", "rb") as f:  # the synthetic file with real scipy
    content = pickle.load(f)
  assert scipy.sparse.issparse(content["J_regressor"])
  for key in CHUMPY_KEYS:
    content[key] = Ch(content[key])
  chumpy_path = root / "generic_model_chumpy.pkl"
  _pickle_with_fake_chumpy(content, chumpy_path, protocol=2)
  smplx_dir = root / "smplx"
  smplx_dir.mkdir()
  shutil.copy(out / "generic_model.pkl", smplx_dir / "FLAME_NEUTRAL.pkl")
  shutil.copy(out / "flame_static_embedding.pkl", smplx_dir / "flame_static_embedding.pkl")
  return types.SimpleNamespace(out=out, chumpy=chumpy_path, smplx=smplx_dir, plain=plain)


@pytest.fixture(scope="module")
def model(files):
  sys.modules["chumpy"] = None  # an import of chumpy would now fail
  try:
    return flame.load_flame(files.chumpy, files.out / "landmark_embedding.npy")
  finally:
    del sys.modules["chumpy"]


def _coefficients(seed, batch=4):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(batch, 300)).astype(np.float32),  # shape
    rng.normal(size=(batch, 100)).astype(np.float32),  # expression
    (0.3 * rng.normal(size=(batch, 15))).astype(np.float32),  # pose
    (0.05 * rng.normal(size=(batch, 3))).astype(np.float32),  # translation
  )


def test_vertices_joints_and_landmarks_match_smplx(files, model):
  import smplx
  import torch

  shape, expression, pose, translation = _coefficients(0)
  layer = smplx.FLAME(
    model_path=str(files.smplx),
    num_betas=300,
    num_expression_coeffs=100,
    batch_size=len(shape),
    use_face_contour=False,
  )
  names = ("global_orient", "neck_pose", "jaw_pose", "leye_pose", "reye_pose")
  with torch.no_grad():
    reference = layer(
      betas=torch.tensor(shape),
      expression=torch.tensor(expression),
      transl=torch.tensor(translation),
      **{name: torch.tensor(pose[:, 3 * k : 3 * k + 3]) for k, name in enumerate(names)},
    )
  out = flame.flame_forward(model, shape, expression, pose, translation)
  joints = reference.joints.numpy()  # [B, 5 joints + 51 landmarks, 3]
  assert out.landmarks.shape == (4, 51, 3) and joints.shape == (4, 56, 3)
  np.testing.assert_allclose(out.vertices, reference.vertices.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.joints, joints[:, :5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.landmarks, joints[:, 5:], atol=1e-5, rtol=0)
  # The coefficients matter: the posed mesh is centimetres away from the template.
  assert np.abs(np.asarray(out.vertices) - np.asarray(model.template)).max() > 0.01


def test_chumpy_arrays_and_sparse_regressor_load_as_the_plain_arrays(files, model):
  plain = files.plain
  np.testing.assert_array_equal(model.template, plain["v_template"].astype(np.float32))
  np.testing.assert_array_equal(
    np.concatenate([model.shape_basis, model.expression_basis], -1),
    plain["shapedirs"].astype(np.float32),
  )
  np.testing.assert_array_equal(model.pose_basis, plain["posedirs"].astype(np.float32))
  np.testing.assert_array_equal(model.joint_regressor, plain["J_regressor"].astype(np.float32))
  assert model.parents == (-1, 0, 1, 1, 1) and "chumpy" not in sys.modules
  with open(files.chumpy, "rb") as f, pytest.raises(ModuleNotFoundError, match="chumpy"):
    pickle.load(f)  # the file really needs chumpy to load the ordinary way


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_pickles_with_csr_regressor_and_reshaped_posedirs_load_the_same(
  tmp_path, files, model, protocol
):
  """Protocols 0/1 build objects with copy_reg._reconstructor; csr and [3V, P] posedirs too."""
  with open(files.out / "generic_model.pkl", "rb") as f:
    content = pickle.load(f)
  content["J_regressor"] = scipy.sparse.csr_matrix(content["J_regressor"])
  content["posedirs"] = Ch(content["posedirs"].reshape(-1, 36))
  content["v_template"] = Ch(content["v_template"])
  path = tmp_path / "old.pkl"
  _pickle_with_fake_chumpy(content, path, protocol=protocol)
  loaded = flame.load_flame(path, files.out / "flame_static_embedding.pkl")
  for field in ("template", "pose_basis", "joint_regressor", "landmark_faces"):
    np.testing.assert_array_equal(getattr(loaded, field), getattr(model, field))


def test_npz_model_and_landmark_files_load_the_same(tmp_path, files, model):
  plain = files.plain
  arrays = {k: v for k, v in plain.items() if isinstance(v, np.ndarray)}
  np.savez(tmp_path / "model.npz", **arrays)
  np.savez(
    tmp_path / "landmarks.npz",
    lmk_faces_idx=np.asarray(model.landmark_faces),
    lmk_bary_coords=np.asarray(model.landmark_barycentric),
  )
  loaded = flame.load_flame(tmp_path / "model.npz", tmp_path / "landmarks.npz")
  for leaf, expected in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
    np.testing.assert_array_equal(leaf, expected)


class _System:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_a_pickle_asking_for_any_other_global_is_refused_naming_it(tmp_path, files):
  marker = tmp_path / "ran"
  evil = tmp_path / "generic_model.pkl"
  evil.write_bytes(pickle.dumps({"v_template": _System(f"touch {marker}")}, protocol=2))
  with pytest.raises(safe_pickle.UnsafePickleError) as error:
    flame.load_flame(evil)
  assert str(evil) in str(error.value) and "system" in error.value.refused
  assert not marker.exists()

  other_chumpy = types.ModuleType("chumpy.ch_ops")

  class add(Ch):  # a chumpy expression, not a terminal array
    pass

  add.__module__, add.__qualname__, other_chumpy.add = "chumpy.ch_ops", "add", add
  sys.modules.update({"chumpy": types.ModuleType("chumpy"), "chumpy.ch_ops": other_chumpy})
  try:
    (tmp_path / "expr.pkl").write_bytes(pickle.dumps({"v_template": add(1.0)}, protocol=2))
  finally:
    del sys.modules["chumpy"], sys.modules["chumpy.ch_ops"]
  with pytest.raises(safe_pickle.UnsafePickleError, match="chumpy.ch_ops.add"):
    flame.read_flame_pickle(tmp_path / "expr.pkl")


def _one_line_error_naming(path, call):
  with pytest.raises((flame.FlameFileError, safe_pickle.UnsafePickleError)) as error:
    call()
  message = str(error.value)
  assert str(path) in message and "\n" not in message, message
  return message


def test_truncated_and_garbage_files_give_one_line_errors_naming_the_file(tmp_path, files):
  data = (files.out / "generic_model.pkl").read_bytes()
  for cut in (0, 1, 100, len(data) // 3, len(data) - 1):
    path = tmp_path / f"cut{cut}.pkl"
    path.write_bytes(data[:cut])
    _one_line_error_naming(path, lambda path=path: flame.load_flame(path))
  landmarks = (files.out / "flame_static_embedding.pkl").read_bytes()
  rng = np.random.default_rng(0)
  for n in range(20):  # random byte flips: a clean error or a valid embedding, never a crash
    corrupt = bytearray(landmarks)
    corrupt[rng.integers(len(corrupt))] = rng.integers(256)
    path = tmp_path / f"flip{n}.pkl"
    path.write_bytes(bytes(corrupt))
    try:
      flame.read_landmark_embedding(path)
    except (flame.FlameFileError, safe_pickle.UnsafePickleError) as e:
      assert str(path) in str(e) and "\n" not in str(e)
  cases = {
    "garbage.pkl": b"this is not a pickle\n\x00\xff",
    "garbage.npz": b"PK\x03\x04 not really a zip",
    "garbage.npy": b"\x93NUMPY\x01\x00garbage",
    "truncated.npz": None,
    "wrong.pkl": pickle.dumps([1, 2, 3]),
    "missing_keys.pkl": pickle.dumps({"v_template": np.zeros((3, 3))}),
  }
  np.savez(tmp_path / "full.npz", lmk_faces_idx=np.zeros(3, np.int64))
  cases["truncated.npz"] = (tmp_path / "full.npz").read_bytes()[:40]
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    _one_line_error_naming(path, lambda path=path: flame.load_flame(path))
    _one_line_error_naming(path, lambda path=path: flame.read_landmark_embedding(path))
  assert "missing 'shapedirs'" in _one_line_error_naming(
    tmp_path / "missing_keys.pkl", lambda: flame.load_flame(tmp_path / "missing_keys.pkl")
  )
  _one_line_error_naming(tmp_path / "absent.pkl", lambda: flame.load_flame(tmp_path / "absent.pkl"))


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-4, 0.099, 0.101, 1.0, 3.0])
def test_rodrigues_matches_scipy_near_and_far_from_zero(scale):
  vectors = scale * np.random.default_rng(1).normal(size=(16, 3)) / np.sqrt(3)
  expected = Rotation.from_rotvec(vectors).as_matrix()
  np.testing.assert_allclose(
    flame.rodrigues(jnp.asarray(vectors, jnp.float32)), expected, atol=2e-6
  )


def test_rodrigues_gradient_at_zero_is_finite_and_the_cross_product_generator():
  jacobian = jax.jacobian(flame.rodrigues)(jnp.zeros(3))  # [3, 3, 3]: dR_ij / da_k
  generators = np.zeros((3, 3, 3))
  for k in range(3):  # dR/da_k at 0 is the cross-product matrix of the k-th unit vector
    generators[..., k] = np.cross(np.eye(3)[k], np.eye(3))
  np.testing.assert_allclose(jacobian, -generators, atol=1e-7)


def test_jit_vmap_grad_and_broadcasting(model):
  shape, expression, pose, translation = _coefficients(2)
  eager = flame.flame_forward(model, shape, expression, pose, translation)
  jitted = jax.jit(flame.flame_forward)(model, shape, expression, pose, translation)
  mapped = jax.vmap(flame.flame_forward, in_axes=(None, 0, 0, 0, 0))(
    model, shape, expression, pose, translation
  )
  for a, b, c in zip(eager, jitted, mapped):
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
  # One identity over a sequence of frames; fewer components is the zero-padded full set.
  frames = flame.flame_forward(model, shape[:1, None, :100], expression[None], pose[None])
  padded = np.pad(shape[:1, :100], ((0, 0), (0, 200)))
  single = flame.flame_forward(model, np.repeat(padded, 4, 0), expression, pose)
  assert frames.vertices.shape == (1, 4, model.num_vertices, 3)
  np.testing.assert_allclose(frames.vertices[0], single.vertices, atol=1e-6)

  def loss(pose, shape):
    out = flame.flame_forward(model, shape, jnp.zeros(100), pose)
    return jnp.sum(out.vertices**2) + jnp.sum(out.landmarks**2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.zeros(15), jnp.zeros(300))
  for grad in grads:
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_sharded_batch_matches_unsharded_and_stays_sharded(model):
  shape, expression, pose, translation = _coefficients(3, batch=8)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch = NamedSharding(mesh, P("data"))
  args = jax.device_put((shape, expression, pose, translation), batch)
  replicated = jax.device_put(model, NamedSharding(mesh, P()))
  out = jax.jit(flame.flame_forward)(replicated, *args)
  expected = flame.flame_forward(model, shape, expression, pose, translation)
  np.testing.assert_allclose(out.vertices, expected.vertices, atol=1e-6)
  assert {s.data.shape[0] for s in out.vertices.addressable_shards} == {1}


def test_bfloat16_compute_stays_within_a_millimetre(model):
  shape, expression, pose, translation = _coefficients(4)
  full = flame.flame_forward(model, shape, expression, pose, translation)
  half = flame.flame_forward(model, shape, expression, pose, translation, dtype=jnp.bfloat16)
  assert half.vertices.dtype == jnp.float32
  error = np.abs(np.asarray(half.vertices) - np.asarray(full.vertices)).max()
  assert 0 < error < 1e-3


def test_synthetic_model_is_built_on_the_vocaset_twin_mesh(files):
  content = files.plain
  rig = talking_mesh.make_rig(vocaset_twin.NUM_VERTICES, vocaset_twin._seed(0, 0))
  np.testing.assert_array_equal(content["f"], talking_mesh.rig_faces(rig))
  assert content["shapedirs"].shape == (5023, 3, 400) and content["shapedirs"].dtype == np.float64
  assert content["posedirs"].shape == (5023, 3, 36)
  assert content["kintree_table"].tolist() == [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]
  regressor, weights = content["J_regressor"], content["weights"]
  np.testing.assert_allclose(regressor.sum(1), 1.0, atol=1e-12)
  assert (regressor >= 0).all() and (regressor > 0).sum() < 0.1 * regressor.size  # sparse
  np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-12)
  assert (weights >= 0).all() and (weights.max(0) > 0.5).all()  # every joint moves some skin
  joints = regressor @ content["v_template"]
  low, high = content["v_template"].min(0), content["v_template"].max(0)
  assert ((joints > low) & (joints < high)).all()
  assert joints[3, 0] > 0 > joints[4, 0] and joints[1, 1] < joints[0, 1]  # eyes apart, neck low
  # Smooth bases: along mesh edges the fields change far less than between random vertices.
  edges = np.concatenate([content["f"][:, [0, 1]], content["f"][:, [1, 2]]]).astype(np.int64)
  pairs = np.random.default_rng(0).integers(0, 5023, size=edges.shape)
  for basis in (content["shapedirs"], content["posedirs"]):
    along = np.abs(basis[edges[:, 0]] - basis[edges[:, 1]]).mean()
    random = np.abs(basis[pairs[:, 0]] - basis[pairs[:, 1]]).mean()
    assert along < 0.3 * random
