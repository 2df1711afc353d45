"""A small MEAD twin for tests, written and built once per session (`small_mead` in conftest):
a training actor (M003) and a test actor (M037), every emotion and level once, clips of
0.4-0.5 s, with two parameter files spoiled (`CORRUPTED`) and so skipped by the build."""

import os
import shutil

import numpy as np

from data_pipelines.builders import mead
from data_pipelines.synthetic import mead as mead_twin

# A truncated file, and one without its expression.
CORRUPTED = ("M003/flame/happy/level_2/001.npz", "M037/flame/sad/level_1/001.npz")


def write_and_build(raw_dir: str, data_dir: str) -> dict[str, int]:
  sizes = dict(mead_twin._SIZES)
  mead_twin._SIZES["test"] = ({"M003": 1, "M037": 1}, (0.4, 0.5))
  try:
    mead_twin.write(raw_dir, size="test", seed=0)
  finally:
    mead_twin._SIZES.clear()
    mead_twin._SIZES.update(sizes)
  for relative in CORRUPTED:
    shutil.copy(os.path.join(raw_dir, relative), os.path.join(raw_dir, relative + ".orig"))
  path = os.path.join(raw_dir, CORRUPTED[0])
  content = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(content[: len(content) // 2])
  path = os.path.join(raw_dir, CORRUPTED[1])
  with np.load(path) as archive:
    kept = {k: archive[k] for k in ("shape", "jaw_pose")}
  np.savez(path, **kept)
  return mead.build(raw_dir, data_dir, skip_invalid=True)
