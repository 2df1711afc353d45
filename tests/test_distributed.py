"""`fdjax.distributed`: where join parameters come from, join timeouts, and the preflight line.

Multi-process behaviour (joining, the config-hash exchange) runs real processes; the rest runs
in the test process with its 8 fake CPU devices.
"""

import os
import subprocess
import sys

import jax
import pytest
from helpers import ROOT, TINY, subprocess_env

from fdjax import config as config_lib
from fdjax import distributed
from fdjax import sharding as sharding_lib

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch", "_allreduce_worker.py")


def test_single_process_needs_no_join():
  assert distributed.join_spec_from_env({}) is None
  assert distributed.join_spec_from_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is None
  single = {"FDJAX_COORDINATOR": "h:1", "FDJAX_NUM_PROCESSES": "1", "FDJAX_PROCESS_ID": "0"}
  assert distributed.join_spec_from_env(single) is None
  assert distributed.initialize(timeout_s=1) is None


def test_join_parameters_come_from_fdjax_variables_slurm_or_auto():
  spec = distributed.join_spec_from_env(
    {"FDJAX_COORDINATOR": "10.0.0.1:8476", "FDJAX_NUM_PROCESSES": "4", "FDJAX_PROCESS_ID": "3"}
  )
  assert spec == distributed.JoinSpec("fdjax-env", "10.0.0.1:8476", 4, 3)
  slurm = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
  }
  assert distributed.join_spec_from_env(slurm) == distributed.JoinSpec("slurm", None, 2, 1)
  auto = distributed.join_spec_from_env({"FDJAX_DISTRIBUTED": "auto"})
  assert auto == distributed.JoinSpec("auto", None, None, None)


@pytest.mark.parametrize(
  "env, message",
  [
    ({"FDJAX_COORDINATOR": "h:1"}, "FDJAX_NUM_PROCESSES, FDJAX_PROCESS_ID not set"),
    (
      {"FDJAX_COORDINATOR": "h:1", "FDJAX_NUM_PROCESSES": "2", "FDJAX_PROCESS_ID": "2"},
      "FDJAX_PROCESS_ID=2 is not in [0, FDJAX_NUM_PROCESSES=2)",
    ),
    (
      {"FDJAX_COORDINATOR": "h", "FDJAX_NUM_PROCESSES": "2", "FDJAX_PROCESS_ID": "0"},
      "is not of the form host:port",
    ),
    (
      {"FDJAX_COORDINATOR": "h:1", "FDJAX_NUM_PROCESSES": "two", "FDJAX_PROCESS_ID": "0"},
      "FDJAX_NUM_PROCESSES='two' is not an integer",
    ),
  ],
)
def test_bad_join_variables_are_named(env, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
    distributed.join_spec_from_env(env)


def _lone_process(tmp_path, process_id):
  """Runs one process of a 2-process run whose other process never starts."""
  env = subprocess_env(2)
  env.update(
    FDJAX_COORDINATOR=f"127.0.0.1:{_free_port()}", FDJAX_NUM_PROCESSES="2",
    FDJAX_PROCESS_ID=str(process_id),
  )  # fmt: skip
  command = [sys.executable, WORKER, "--out", str(tmp_path), "--timeout-s", "2"]
  return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _free_port():
  from launch.local import free_port

  return free_port()


def test_coordinator_alone_times_out_naming_itself_and_the_missing_processes(tmp_path):
  result = _lone_process(tmp_path, 0)
  assert result.returncode == 1
  assert "JoinTimeoutError: not all processes joined the JAX runtime within 2 s" in result.stderr
  assert "this is process 0/2 via coordinator 127.0.0.1:" in result.stderr
  assert "waited for processes 1" in result.stderr


def test_worker_without_coordinator_says_process_0_did_not_join(tmp_path):
  result = _lone_process(tmp_path, 1)
  assert result.returncode == 1
  assert "this is process 1/2" in result.stderr
  assert "process 0 (the coordinator) did not join" in result.stderr


def _mesh_and_config(*overrides):
  config = config_lib.load_config(TINY, list(overrides))
  return config, sharding_lib.make_mesh(config.mesh)


def test_preflight_prints_one_line_per_process(capsys):
  config, mesh = _mesh_and_config("--config.batch_size=16")
  line = distributed.preflight(config, mesh)
  digest = config_lib.config_hash(config)[:12]
  assert line == (
    "fdjax preflight: process 0/1 | devices 8 local, 8 global (cpu) | mesh data=8 fsdp=1 "
    f"tensor=1 | batch 16 global, 16 per process | config {digest}"
  )
  assert capsys.readouterr().out == line + "\n"


def test_preflight_rejects_a_batch_that_does_not_split_over_the_devices():
  config, mesh = _mesh_and_config("--config.batch_size=12")
  with pytest.raises(distributed.PreflightError, match="does not divide by 1 processes and by"):
    distributed.preflight(config, mesh)
  config, mesh = _mesh_and_config("--config.batch_size=16", "--config.grad_accum_steps=3")
  with pytest.raises(distributed.PreflightError, match="does not divide by grad_accum_steps=3"):
    distributed.preflight(config, mesh)


def test_preflight_rejects_a_mesh_that_does_not_cover_the_devices():
  config = config_lib.load_config(TINY, ["--config.mesh.data=4"])
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:4])
  with pytest.raises(distributed.PreflightError, match="has 4 devices but the runtime has 8"):
    distributed.preflight(config, mesh)


PREFLIGHT_WORKER = """
import os, sys
import jax
from fdjax import config as config_lib, distributed
distributed.initialize(60)
process = int(os.environ["FDJAX_PROCESS_ID"])
lr = 0.1 if process == 1 and sys.argv[2] == "differ" else 0.01
config = config_lib.load_config(sys.argv[1], [f"--config.optim.lr={lr}"])
mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"))
distributed.preflight(config, mesh)
print("preflight passed")
"""


@pytest.mark.parametrize("configs", ["same", "differ"])
def test_preflight_compares_config_hashes_across_processes(tmp_path, configs):
  from launch import local

  script = tmp_path / "preflight_worker.py"
  script.write_text(PREFLIGHT_WORKER)
  result = local.run_local(
    [sys.executable, str(script), TINY, configs],
    2,
    cpu_devices=1,
    log_dir=str(tmp_path / "logs"),
    grace_s=2,
    stream=False,
    env=subprocess_env(),
  )
  logs = [open(p.log_path).read() for p in result.processes]
  if configs == "same":
    assert result.returncode == 0, result.report
    assert all("preflight passed" in log for log in logs)
    assert "fdjax preflight: process 1/2 | devices 1 local, 2 global" in logs[1]
  else:
    assert result.returncode == 1
    for log in logs:
      assert "the processes were started with different configs" in log
      assert "processes [0] have" in log and "processes [1] have" in log
