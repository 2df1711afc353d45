"""benchmarks/gpu_suite.sh end to end on CPU (`--dry-run`): every benchmark runs, the JSON lines
land in the output file, and one MFU line is printed per measurement."""

import json
import os
import subprocess
import sys

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_suite_dry_run_runs_every_benchmark_and_prints_mfu_lines(tmp_path):
  out = tmp_path / "suite.jsonl"
  # One CPU device, as a user's machine has, and the suite's fast-compiling CPU code (LLVM level
  # 2, tests/conftest.py): the dry run is mostly XLA compilation, 103 s of CPU at the default
  # level 3 against 77 s at 2.
  env = {**subprocess_env(num_devices=1), "PYTHON": sys.executable}
  result = subprocess.run(
    ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run", str(out)],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line["benchmark"] for line in lines] == ["audio2mesh_step"] * 2 + [
    "video_step",
    "mae_step",
  ]
  assert [line.get("training") for line in lines[:2]] == ["teacher_forcing", "autoregressive"]
  assert all(line["compute_dtype"] == "bfloat16" for line in lines)
  assert all(line["step_time_s"] > 0 for line in lines)
  mfu = [line for line in result.stdout.splitlines() if line.startswith("MFU ")]
  assert len(mfu) == 4
  assert all(line.endswith(" s)") and ": n/a (" in line for line in mfu)  # no CPU peak
