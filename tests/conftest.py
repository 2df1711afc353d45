"""Test configuration: 8 fake CPU devices so every sharded code path runs without accelerators.

The flag must be set before JAX initialises its backends, hence at import time of conftest.
"""

import os

# LLVM optimisation level 2 instead of XLA's default 3 for the CPU code: at level 3 a loop
# fusion over a small many-dimensional shape compiles for seconds (the threefry rounds of every
# `jax.random.normal((3, 3, 8, 16))` a conv kernel initialiser draws: 2-4 s each against 0.3 s
# at level 2; the tiny face_motion_ae model's jitted init 21 s against 3.8 s). Level 2 keeps
# strict floating-point semantics (XLA's CPU fast-math stays off); the tests' models are tiny,
# so the time is in compiling, not running.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=2"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import sys  # noqa: E402

# Test-only modules (the tiny task, shared helpers) are imported by name from tests/.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tempfile  # noqa: E402

# Synthetic twins that experiments build on first use go to a fresh directory per test session
# (shared by the subprocesses tests start), never to the user's cache.
os.environ.setdefault("FDJAX_DATA_ROOT", tempfile.mkdtemp(prefix="fdjax-test-data-"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_mead(tmp_path_factory):
  """`(raw_dir, data_dir, split sizes)` of the small MEAD twin of `tests/mead_data.py`."""
  from mead_data import write_and_build

  raw_dir = str(tmp_path_factory.mktemp("small_mead_raw"))
  data_dir = str(tmp_path_factory.mktemp("small_mead_data"))
  return raw_dir, data_dir, write_and_build(raw_dir, data_dir)
