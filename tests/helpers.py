"""Shared helpers for the framework tests: running `fdjax` in a subprocess, reading logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TINY = os.path.join(TESTS, "configs", "tiny.py")


def subprocess_env(num_devices: int = 8) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
  # The same fast-compiling CPU code as tests/conftest.py's.
  env["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=2"
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def fdjax_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "fdjax.cli", *args]


def start_fdjax(*args: str, log_path: str) -> subprocess.Popen:
  log = open(log_path, "w")
  return subprocess.Popen(
    fdjax_command(*args), env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
  )


def run_fdjax(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    fdjax_command(*args),
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["split"] == split]
