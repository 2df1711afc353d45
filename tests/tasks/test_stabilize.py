"""The stabilize task: the pair generator, a tiny run that beats Procrustes, its artifact loaded
by jax alone, and `fdjax stabilize` (from the workdir and from the artifact, and its errors)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from test_export import CASES_JAX_ONLY, run_jax_only

from data_pipelines import head_pairs
from fdjax import cli, export, trainer
from fdjax import config as config_lib
from fdjax.metrics import rigid
from fdjax.models import stabilizer
from fdjax.tasks import stabilize

# The tiny stabiliser, 100 steps of 16 pairs: enough to pull clearly ahead of both baselines.
SPEC = "experiments/stabilize/head_pairs.py:size=tiny,runlocal=True,steps=100"
OVERRIDES = ["--config.optim.lr=0.003"]
BLOCK = 32  # the runlocal config's block size: every source here shares one compiled renderer
NO_SKIN_MOTION = dict(
  neutral_probability=1.0,
  jaw_open_max=0.0,
  jaw_side_std=0.0,
  neck_std=0.0,
  eye_std=0.0,
  noise_mm=0.0,
  partial_probability=0.0,
)


@pytest.fixture(scope="module")
def config():
  return config_lib.load_config(SPEC, OVERRIDES)


@pytest.fixture(scope="module")
def head(config):
  return stabilize.head_model(config), stabilize.rigid_region(config).indices


def _source(head, seed=0, stream=head_pairs.TRAIN_STREAM, **options):
  model, region = head
  options = head_pairs.PairOptions(**options)
  return head_pairs.HeadPairSource(
    model, region, options, seed=seed, stream=stream, block_size=BLOCK
  )


def test_pairs_are_deterministic_per_index_and_streams_differ(head):
  example = _source(head, seed=3)[BLOCK + 5]
  assert example["vertices"].shape == (2, 5023, 3) and example["vertices"].dtype == np.float32
  assert example["vertex_mask"].shape == (2, 5023) and example["vertex_mask"].dtype == bool
  assert example["transform"].shape == (4, 4)
  again = _source(head, seed=3)
  again[0]  # another block read first: the example does not depend on what was read before
  for key, value in again[BLOCK + 5].items():
    np.testing.assert_array_equal(value, example[key])
  assert not np.allclose(_source(head, seed=4)[BLOCK + 5]["vertices"], example["vertices"])
  held_out = _source(head, seed=3, stream=head_pairs.EVAL_STREAM)[BLOCK + 5]
  assert not np.allclose(held_out["vertices"], example["vertices"])


def test_without_skin_motion_the_transform_maps_mesh_a_onto_mesh_b(head):
  rigid_only = _source(head, **NO_SKIN_MOTION)
  skin = _source(head)
  for index in (0, 7):
    pair = rigid_only[index]
    moved = np.asarray(rigid.apply_transform(pair["transform"], pair["vertices"][0]))
    np.testing.assert_allclose(moved, pair["vertices"][1], atol=2e-6)
    assert np.linalg.norm(pair["vertices"][1] - pair["vertices"][0], axis=-1).mean() > 5e-3
    # With skin motion, the rigid region still follows the transform far better than the face.
    pair = skin[index]
    residual = np.linalg.norm(
      np.asarray(rigid.apply_transform(pair["transform"], pair["vertices"][0]))
      - pair["vertices"][1],
      axis=-1,
    )
    assert residual[head[1]].mean() < 0.5 * residual.mean()


def test_a_skull_carried_by_the_neck_joint_moves_with_the_neck(head):
  model, region = head
  weights = np.array(model.skinning_weights)
  weights[region] = np.eye(model.num_joints)[1]  # FLAME's layout: the head skinned to the neck
  neck_model = dataclasses.replace(model, skinning_weights=jax.numpy.asarray(weights))
  assert head_pairs.skull_joint(model, region) == 0
  assert head_pairs.skull_joint(neck_model, region) == 1
  options = {**NO_SKIN_MOTION, "neck_std": 0.2}
  pair = _source((neck_model, region), **options)[3]
  moved = np.asarray(rigid.apply_transform(pair["transform"], pair["vertices"][0][region]))
  np.testing.assert_allclose(moved, pair["vertices"][1][region], atol=2e-6)
  # The root joint's motion alone misses the neck rotation.
  root = _source((model, region), **options)[3]
  assert rigid.rotation_error_deg(root["transform"], pair["transform"]) > 1.0


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stabilize"))
  trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    metrics = json.load(f)
  task, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  params = jax.device_get(params)
  return {
    "workdir": workdir,
    "metrics": metrics,
    "predict": lambda v, m: np.asarray(jax.jit(predict)(params, v, m)),
  }


def test_a_tiny_run_beats_procrustes_on_held_out_pairs(run):
  # Untrained, the stabiliser is Procrustes on the rigid region (its initial alignment).
  m = run["metrics"]
  assert m["num_pairs"] == 64
  error = m["skull_vertex_error_mm"]
  assert error < 0.5 * m["procrustes_all/skull_vertex_error_mm"], m
  assert error < 0.8 * m["procrustes_rigid/skull_vertex_error_mm"], m
  assert m["rotation_error_deg"] < m["procrustes_rigid/rotation_error_deg"], m


def test_unobserved_vertices_do_not_reach_the_prediction(run, head):
  partial = _source(head, stream=head_pairs.EVAL_STREAM, partial_probability=1.0)
  batch = [partial[i] for i in range(3)]
  vertices = np.stack([b["vertices"] for b in batch])
  mask = np.stack([b["vertex_mask"] for b in batch])
  assert (~mask).any()
  garbage = np.where(mask[..., None], vertices, np.float32(1e3))
  np.testing.assert_array_equal(run["predict"](garbage, mask), run["predict"](vertices, mask))


@pytest.fixture(scope="module")
def artifact(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("artifact"))
  assert export.main(["--workdir", run["workdir"], "--out", out]) == 0
  return out


def test_artifact_in_a_jax_only_process_equals_predict(run, artifact, head, tmp_path):
  out = artifact
  signature = export.read_signature(out)["functions"]["predict"]
  assert {s["name"]: s["shape"] for s in signature["inputs"]} == {
    "vertices": ["b", 2, 5023, 3],
    "vertex_mask": ["b", 2, 5023],
  }
  source = _source(head, stream=head_pairs.EVAL_STREAM)
  cases = {}
  for batch in (1, 3):
    examples = [source[i] for i in range(batch)]
    inputs = {k: np.stack([e[k] for e in examples]) for k in ("vertices", "vertex_mask")}
    cases[str(tmp_path / f"batch{batch}")] = inputs
    np.savez(str(tmp_path / f"batch{batch}_in.npz"), **inputs)
  proc = run_jax_only(tmp_path, CASES_JAX_ONLY, [out, *cases])
  assert proc.returncode == 0, proc.stderr
  for path, inputs in cases.items():
    expected = run["predict"](inputs["vertices"], inputs["vertex_mask"])
    for how in ("loader", "snippet"):
      got = np.load(f"{path}_{how}.npz")["output"]
      assert got.shape == (len(expected), 4, 4) and got.dtype == np.float32
      np.testing.assert_allclose(got, expected, atol=1e-5)


def test_stabilize_command_removes_head_motion_and_names_bad_input(
  run, artifact, head, tmp_path, capsys
):
  _, region = head
  pair = _source(head, stream=head_pairs.EVAL_STREAM, **NO_SKIN_MOTION)
  mesh = pair[0]["vertices"][0]  # one face, moved rigidly from frame to frame
  motions = np.stack([pair[i]["transform"] for i in range(5)])
  frames = np.asarray(rigid.apply_transform(motions, np.broadcast_to(mesh, (5, *mesh.shape))))
  sequence = tmp_path / "seq.npy"
  np.save(sequence, frames.reshape(5, -1))  # the [T, 3V] vertices_npy form
  results = {}
  for name, source in (("workdir", run["workdir"]), ("artifact", artifact)):
    out = tmp_path / f"{name}.npy"
    args = ["stabilize", "--mesh_seq", str(sequence), "--out", str(out), f"--{name}", source]
    assert cli.main([*args, "--reference", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 5 and summary["reference"] == 2
    results[name] = np.load(out)
    assert results[name].shape == (5, 3 * 5023)
  np.testing.assert_allclose(results["artifact"], results["workdir"], atol=1e-5)
  stabilised = results["workdir"].reshape(5, 5023, 3)
  before = np.linalg.norm(frames[:, region] - frames[2, region], axis=-1).mean(-1)
  after = np.linalg.norm(stabilised[:, region] - frames[2, region], axis=-1).mean(-1)
  assert after[2] == 0.0 and before.max() > 0.01, (before, after)
  assert after.max() < 0.1 * before.max() and after.max() < 1e-3, (before, after)

  np.save(tmp_path / "wrong_count.npy", np.zeros((3, 100, 3), np.float32))
  (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
  bad = {
    "wrong_count.npy": [],
    "garbage.npy": [],
    "seq.npy": ["--reference", "9"],
  }
  for name, extra in bad.items():
    path = str(tmp_path / name)
    args = ["stabilize", "--mesh_seq", path, "--out", str(tmp_path / "o.npy")]
    assert cli.main([*args, "--workdir", run["workdir"], *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and (path in error if not extra else "--reference 9" in error), error
  assert not (tmp_path / "o.npy").exists()


def test_rotation_from_6d_keeps_the_first_two_columns_of_a_rotation():
  rotations = Rotation.random(5, random_state=0).as_matrix().astype(np.float32)
  six = np.concatenate([rotations[:, :, 0], rotations[:, :, 1]], axis=-1)
  np.testing.assert_allclose(stabilizer.rotation_from_6d(six), rotations, atol=1e-6)
  skewed = np.asarray(stabilizer.rotation_from_6d(six * 3.0 + 0.2))  # any 6D gives a rotation
  np.testing.assert_allclose(
    skewed @ np.swapaxes(skewed, 1, 2), np.tile(np.eye(3), (5, 1, 1)), atol=1e-5
  )
  np.testing.assert_allclose(np.linalg.det(skewed), 1.0, atol=1e-5)
