"""A real SLURM run: `launch/slurm.py` submits to a single-node slurmctld + slurmd on localhost.

The cluster (`launch/slurm_test_cluster.py`) has its own config, state and munge key under the
test's temporary directory. Without SLURM installed (`.ci/install_slurm.sh`) or without root
(slurmd starts jobs as their owner) the tests skip with that reason, unless
`FDJAX_REQUIRE_SLURM=1` (set in CI) turns the skip into a failure.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, subprocess_env

from launch import slurm_test_cluster

LAUNCH_TESTS = os.path.dirname(os.path.abspath(__file__))


def _unavailable_reason():
  missing = slurm_test_cluster.missing_binaries()
  if missing:
    return f"SLURM is not installed (missing {', '.join(missing)}; run .ci/install_slurm.sh)"
  if os.getuid() != 0:
    return "the test SLURM cluster needs root: slurmd starts jobs as their owner"
  return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  reason = _unavailable_reason()
  if reason:
    if os.environ.get("FDJAX_REQUIRE_SLURM") == "1":
      pytest.fail(f"FDJAX_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)
  root = tmp_path_factory.mktemp("slurm")
  with slurm_test_cluster.LocalSlurmCluster(str(root)) as running:
    yield running


def _submit(cluster, *launch_args, command):
  env = cluster.env(subprocess_env())
  env["PYTHONPATH"] = os.pathsep.join([LAUNCH_TESTS, env["PYTHONPATH"]])
  result = subprocess.run(
    [sys.executable, "-m", "fdjax.cli", "launch", "slurm", *launch_args, "--", *command],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  job_id = result.stdout.strip()
  assert job_id.isdigit(), result.stdout
  return job_id


def _explain(cluster, job_id, workdir):
  parts = [cluster.read_logs()]
  for directory in ("slurm", "logs"):
    path = os.path.join(workdir, directory)
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
      parts.append(f"--- {name}\n{open(os.path.join(path, name), errors='replace').read()}")
  return "\n".join(parts)


def test_two_task_job_joins_one_jax_runtime_and_finishes_with_a_checkpoint(cluster, tmp_path):
  workdir = str(tmp_path / "run")
  train = [
    sys.executable, "-m", "fdjax.cli", "train", "--config", f"{TINY}:steps=6",
    "--config.task=probetask", "--config.checkpoint.every=0", "--config.eval_every=3",
    "--workdir", workdir,
  ]  # fmt: skip
  job_id = _submit(
    cluster, "--tasks-per-node", "2", "--cpu-devices", "2", "--time", "10", command=train
  )
  state = cluster.wait_for_job(job_id, timeout_s=300)
  assert state == "COMPLETED", _explain(cluster, job_id, workdir)

  for task in (0, 1):
    log = open(os.path.join(workdir, "logs", f"slurm-{job_id}-task{task}.log")).read()
    assert f"joining process {task}/2 via SLURM job {job_id}" in log
    assert f"fdjax preflight: process {task}/2 | devices 2 local, 4 global (cpu)" in log
  evals = []
  for task in (0, 1):
    with open(os.path.join(workdir, "probe", f"eval_process_{task}.jsonl")) as f:
      evals.append([json.loads(line) for line in f])
  assert evals[0] == evals[1] and [r["step"] for r in evals[0]] == [3, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    assert json.load(f)["step"] == 6
  batch_log = open(os.path.join(workdir, "slurm", f"{job_id}.out")).read()
  assert "fdjax: tasks exited with status 0" in batch_log


STAND_IN = """
import json, os, sys
workdir = sys.argv[1]
first = not os.path.exists(os.path.join(workdir, "checkpointed"))
if first:
  open(os.path.join(workdir, "checkpointed"), "w").close()
  print("checkpointed at step 3 and exited 0, as the trainer does on SIGTERM")
else:
  json.dump({"step": 6}, open(os.path.join(workdir, "final_metrics.json"), "w"))
  print("resumed and finished")
"""


def test_requeue_job_is_requeued_until_the_run_finishes(cluster, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  script = tmp_path / "stand_in_trainer.py"
  script.write_text(STAND_IN)
  command = [sys.executable, str(script), str(workdir), "--workdir", str(workdir)]
  job_id = _submit(cluster, "--requeue", "--time", "10", command=command)
  state = cluster.wait_for_job(job_id, timeout_s=300)
  assert state == "COMPLETED", _explain(cluster, job_id, str(workdir))
  batch_log = open(workdir / "slurm" / f"{job_id}.out").read()
  assert f"requeueing job {job_id}" in batch_log
  assert f"fdjax: job {job_id} (restart 1)" in batch_log
  task_log = open(workdir / "logs" / f"slurm-{job_id}-task0.log").read()
  assert "resumed and finished" in task_log
  assert (workdir / "final_metrics.json").exists()
