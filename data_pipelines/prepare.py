"""Making sure a task's dataset is built before training reads it.

Experiments name a dataset (`config.data.name`), where its built array_record files live
(`config.data.data_dir`) and where its raw files are (`config.data.raw_dir`). When the built
dataset is missing it is built from the raw files; when those are missing too and the config
allows it (`config.data.synthetic = "tiny" | "demo"`, or "large" for twins that have it), the
dataset's synthetic twin is written first. So an experiment runs out of the box on the twin,
and on the real data by pointing `raw_dir` at the download. In a multi-process run, process 0
prepares and the others wait.
"""

from __future__ import annotations

import fcntl
import glob
import importlib
import os
from typing import Any

DEFAULT_ROOT = os.path.join("~", ".cache", "fdjax", "datasets")
# Bumped whenever a synthetic twin's content changes, so stale caches are not reused.
SYNTHETIC_VERSION = 2  # 2: the shaded face renderer, the HDTF twin


def data_root() -> str:
  """Where synthetic twins are cached: $FDJAX_DATA_ROOT, else ~/.cache/fdjax/datasets."""
  return os.path.expanduser(os.environ.get("FDJAX_DATA_ROOT") or DEFAULT_ROOT)


def default_dirs(name: str, synthetic: str) -> tuple[str, str]:
  """(raw_dir, data_dir) under `data_root()` for the synthetic twin of `name`."""
  root = os.path.join(data_root(), f"{name}-synthetic-{synthetic}-v{SYNTHETIC_VERSION}")
  return os.path.join(root, "raw"), os.path.join(root, "tfds")


def is_built(name: str, data_dir: str) -> bool:
  """Whether `data_dir` holds a finished TFDS build of `name`."""
  return bool(glob.glob(os.path.join(data_dir, name, "**", "dataset_info.json"), recursive=True))


def resolve_dirs(data_config: Any) -> tuple[str, str]:
  """The (raw_dir, data_dir) a data config means, filling defaults for the synthetic twin."""
  raw_dir, data_dir = data_config.raw_dir, data_config.data_dir
  if not data_dir or not raw_dir:
    if not data_config.synthetic:
      raise ValueError(
        f"config.data.data_dir and config.data.raw_dir must be set for {data_config.name!r} "
        "(or config.data.synthetic to use its synthetic twin)"
      )
    default_raw, default_data = default_dirs(data_config.name, data_config.synthetic)
    raw_dir, data_dir = raw_dir or default_raw, data_dir or default_data
  return os.path.expanduser(raw_dir), os.path.expanduser(data_dir)


def ensure_dataset(data_config: Any) -> tuple[str, str]:
  """Builds (after synthesising, if allowed) the dataset when it is not built yet.

  Returns:
    (raw_dir, data_dir).
  """
  import jax

  raw_dir, data_dir = resolve_dirs(data_config)
  name = data_config.name
  if jax.process_index() == 0 and not is_built(name, data_dir):
    # Several runs on this machine (sweep points) may ask at once: one prepares, the others
    # wait for it and then find the build.
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not is_built(name, data_dir):
        _prepare(data_config, raw_dir, data_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"dataset {name} ready")
  return raw_dir, data_dir


def _prepare(data_config: Any, raw_dir: str, data_dir: str) -> None:
  """Synthesises (if allowed and needed) and builds the dataset."""
  name = data_config.name
  has_raw = os.path.isdir(raw_dir) and bool(os.listdir(raw_dir))
  if not has_raw:
    if not data_config.synthetic:
      raise FileNotFoundError(
        f"dataset {name!r}: no build in {data_dir} and no raw files in {raw_dir}"
      )
    print(f"writing the synthetic {name} twin ({data_config.synthetic}) to {raw_dir}", flush=True)
    synthetic = importlib.import_module(f"data_pipelines.synthetic.{name}")
    synthetic.write(raw_dir, size=data_config.synthetic, seed=0)
  print(f"building {name} from {raw_dir} into {data_dir}", flush=True)
  builder = importlib.import_module(f"data_pipelines.builders.{name}")
  builder.build(raw_dir, data_dir, skip_invalid=data_config.skip_invalid)
