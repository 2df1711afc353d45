"""Test configuration: 8 fake CPU devices so every sharded code path runs without accelerators.

The flag must be set before JAX initialises its backends, hence at import time of conftest.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
