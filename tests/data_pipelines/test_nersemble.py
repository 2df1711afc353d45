"""The NeRSemble twin (VHAP/GaussianAvatars layout) and its builder: splits, cameras that put
the FLAME mesh where the images show it, one-line errors naming bad files."""

import json
import os
import shutil

import numpy as np
import pytest

from data_pipelines import prepare
from data_pipelines.builders import nersemble
from data_pipelines.builders.common import InvalidExample
from fdjax import config as config_lib
from fdjax.tasks import gaussian_avatar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments/avatar/nersemble.py") + ":runlocal=True"


@pytest.fixture(scope="module")
def twin():
  """The tiny twin, written and built once per session (the avatar task test reuses it)."""
  config = config_lib.load_config(CONFIG)
  raw_dir, data_dir = prepare.ensure_dataset(config.data)
  return config, raw_dir, data_dir


def test_twin_layout_and_splits(twin):
  _, raw_dir, data_dir = twin
  train = nersemble.read_transforms(os.path.join(raw_dir, "transforms_train.json"))
  val = nersemble.read_transforms(os.path.join(raw_dir, "transforms_val.json"))
  test = nersemble.read_transforms(os.path.join(raw_dir, "transforms_test.json"))
  assert train["camera_indices"] == list(range(7)) and val["camera_indices"] == [7]
  assert set(train["timestep_indices"]) == set(val["timestep_indices"])
  assert not set(test["timestep_indices"]) & set(train["timestep_indices"])
  assert test["camera_indices"] == list(range(8))
  frame = train["frames"][0]
  for key in ("transform_matrix", "fl_x", "cx", "file_path", "fg_mask_path", "flame_param_path"):
    assert key in frame
  with np.load(os.path.join(raw_dir, frame["flame_param_path"])) as params:
    assert params["expr"].shape == (1, 100) and params["eyes_pose"].shape == (1, 6)
    assert params["static_offset"].shape == (1, 5023, 3)
  built = {s: nersemble.load_split(data_dir, s) for s in nersemble.SPLITS}
  assert [len(built[s]["image"]) for s in nersemble.SPLITS] == [42, 6, 16]
  assert built["train"]["image"].shape[1:] == (32, 32, 3)
  assert built["train"]["pose"].shape[1:] == (15,)


def test_built_cameras_project_the_posed_mesh_onto_its_mask(twin):
  config, _, _ = twin
  examples = gaussian_avatar.split_examples(config, "test")
  for i in (0, 5, 11):
    rotation, translation = (
      examples["world_to_camera"][i, :3, :3],
      examples["world_to_camera"][i, :3, 3],
    )
    fx, fy, cx, cy = examples["intrinsics"][i]
    cam = examples["vertices"][i] @ rotation.T + translation
    x, y = fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy
    rows, cols = np.nonzero(examples["mask"][i] > 127)
    # The mesh's projected extent is the mask's, to within a pixel and a half.
    assert abs(x.min() - cols.min()) < 1.5 and abs(x.max() - (cols.max() + 1)) < 1.5
    assert abs(y.min() - rows.min()) < 1.5 and abs(y.max() - (rows.max() + 1)) < 1.5


def test_bad_files_fail_naming_the_file_or_are_skipped_and_counted(twin, tmp_path):
  _, raw_dir, _ = twin
  raw = tmp_path / "raw"
  shutil.copytree(raw_dir, raw, ignore=shutil.ignore_patterns("head_model"))
  with open(raw / "transforms_train.json") as f:
    frames = json.load(f)["frames"]
  image = raw / frames[3]["file_path"]
  image.write_bytes(b"not a png")
  with pytest.raises(InvalidExample, match=str(image)) as error:
    nersemble.build(str(raw), str(tmp_path / "built"))
  assert "\n" not in str(error.value)
  sizes = nersemble.build(str(raw), str(tmp_path / "built"), skip_invalid=True)
  assert sizes["train"] == 41
  with open(tmp_path / "built" / "nersemble" / "dataset_info.json") as f:
    assert json.load(f)["skipped"]["train"] == 1

  flame_file = raw / frames[0]["flame_param_path"]
  np.savez(flame_file, expr=np.zeros((1, 100)))
  with pytest.raises(InvalidExample, match=rf"{flame_file}: missing FLAME parameters"):
    nersemble.build(str(raw), str(tmp_path / "built2"))
  (raw / "transforms_val.json").write_text("{not json")
  with pytest.raises(ValueError, match="transforms_val.json: not readable JSON"):
    nersemble.build(str(raw), str(tmp_path / "built3"), skip_invalid=True)
