"""`launch/local.py`: N joined processes on this host, their logs, and what happens on failure.

The processes run `_allreduce_worker.py`, a stand-alone JAX program that joins through
`fdjax.distributed.initialize` and sums an array whose shards live in different processes.
"""

import json
import os
import sys

import pytest
from helpers import ROOT, subprocess_env

from fdjax import distributed
from launch import local

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_allreduce_worker.py")


def _worker(out_dir, *args):
  return [sys.executable, WORKER, "--out", str(out_dir), *args]


def _run(tmp_path, *worker_args, cpu_devices=2, grace_s=2.0):
  return local.run_local(
    _worker(tmp_path / "out", *worker_args),
    2,
    cpu_devices=cpu_devices,
    log_dir=str(tmp_path / "logs"),
    grace_s=grace_s,
    stream=False,
    env=subprocess_env(),
  )


def test_process_env_gives_each_process_its_id_and_own_devices():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"}
  env = local.process_env(1, 2, "127.0.0.1:1234", cpu_devices=4, base_env=base)
  assert env[distributed.ENV_COORDINATOR] == "127.0.0.1:1234"
  assert env[distributed.ENV_NUM_PROCESSES] == "2"
  assert env[distributed.ENV_PROCESS_ID] == "1"
  assert env["XLA_FLAGS"].split() == [
    "--xla_dump_to=/tmp/x",
    "--xla_force_host_platform_device_count=4",
  ]
  assert env["JAX_PLATFORMS"] == "cpu"
  gpu_env = local.process_env(1, 2, "127.0.0.1:1234", gpus_per_process=4, base_env={})
  assert gpu_env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_command_helpers():
  assert local.split_command(["-n", "2", "--", "fdjax", "train", "--", "x"]) == (
    ["-n", "2"],
    ["fdjax", "train", "--", "x"],
  )
  assert local.split_command(["-n", "2"]) == (["-n", "2"], [])
  with pytest.raises(SystemExit):
    local.main(["-n", "2"])
  assert local.workdir_of(["fdjax", "train", "--workdir", "runs/a"]) == "runs/a"
  assert local.workdir_of(["fdjax", "train", "--workdir=runs/b"]) == "runs/b"
  assert local.workdir_of(["fdjax", "train"]) is None
  resolved = local.resolve_command(["fdjax", "train"])
  assert resolved[-1] == "train" and (
    resolved[0] == "fdjax" or resolved[1:3] == ["-m", "fdjax.cli"]
  )


def test_two_processes_join_one_runtime_and_sum_across_processes(tmp_path):
  result = _run(tmp_path)
  assert result.returncode == 0, result.report
  assert result.failed_process is None
  for process in (0, 1):
    with open(tmp_path / "out" / f"process_{process}.json") as f:
      seen = json.load(f)
    # Process i contributes i + 1 on each of its 2 devices: 2 * 1 + 2 * 2.
    assert seen == {**seen, "process_index": process, "process_count": 2, "total": 6.0}
    assert seen["local_devices"] == 2 and seen["global_devices"] == 4
    log = open(tmp_path / "logs" / f"process_{process}.log").read()
    assert f"{distributed.JOINED_MARKER} process {process}/2" in log
  assert all(o.joined and o.returncode == 0 for o in result.processes)


def test_a_failing_process_stops_the_others_and_is_reported(tmp_path):
  result = _run(tmp_path, "--fail-process", "1", "--hang")
  assert result.returncode == 1
  assert result.failed_process == 1
  first, second = result.processes
  assert second.returncode == 1 and first.stopped_by is not None and first.returncode != 0
  assert "process 1 of 2 failed first (exited with code 1)" in result.report
  assert "process 0: stopped by the launcher" in result.report
  assert "fails on purpose" in open(second.log_path).read()


def test_join_timeout_names_the_process_that_never_joined(tmp_path):
  result = _run(tmp_path, "--delay-process", "1", "--delay-s", "60", "--timeout-s", "2")
  assert result.failed_process == 0
  assert "processes that never started to join the JAX runtime" in result.report
  assert "[1]" in result.report
  log = open(result.processes[0].log_path).read()
  assert "JoinTimeoutError: not all processes joined the JAX runtime within 2 s" in log
  assert "this is process 0/2" in log


def test_cli_runs_the_command_and_returns_its_status(tmp_path):
  import subprocess

  command = [
    sys.executable, "-m", "launch.local", "-n", "2", "--cpu-devices", "1", "--quiet",
    "--log-dir", str(tmp_path / "logs"), "--",
    *_worker(tmp_path / "out"),
  ]  # fmt: skip
  result = subprocess.run(
    command, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "fdjax launch local: all 2 processes finished" in result.stdout
  assert "worker result" not in result.stdout  # --quiet: output only in the logs
  assert sorted(os.listdir(tmp_path / "out")) == ["process_0.json", "process_1.json"]
