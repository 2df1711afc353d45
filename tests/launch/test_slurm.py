"""`launch/slurm.py`: the sbatch scripts it writes (the real SLURM run is test_slurm_cluster.py)."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

from launch import slurm


def _directives(script):
  return [
    line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")
  ]


def _gpu_job(tmp_path, **options):
  command = ["python", "-m", "fdjax.cli", "train", "--config", "c.py", "--workdir", "runs/x"]
  return slurm.job_from_command(
    command, workdir=str(tmp_path / "run"), partition="gpu", time="4:00:00", **options
  )


def test_gpu_job_runs_one_task_per_gpu_with_logs_under_the_workdir(tmp_path):
  job = _gpu_job(tmp_path, nodes=2, gpus_per_node=8, account="lab", cpus_per_task=12)
  script = slurm.sbatch_script(job)
  workdir = str(tmp_path / "run")
  assert _directives(script) == [
    "--job-name=fdjax",
    "--nodes=2",
    "--ntasks-per-node=8",
    "--gpus-per-node=8",
    "--cpus-per-task=12",
    "--time=4:00:00",
    "--partition=gpu",
    "--account=lab",
    f"--chdir={os.getcwd()}",
    f"--output={workdir}/slurm/%j.out",
    "--open-mode=append",
    "--signal=TERM@120",
    "--no-requeue",
  ]
  assert (
    f"srun --kill-on-bad-exit=1 --ntasks-per-node=8 --output={workdir}/logs/slurm-%j-task%t.log "
    "python -m fdjax.cli train --config c.py --workdir runs/x &"
  ) in script
  assert "scontrol requeue" not in script
  assert "JAX_LOCAL_DEVICE_IDS" not in script


def test_requeue_job_requeues_itself_when_the_run_checkpointed_before_finishing(tmp_path):
  script = slurm.sbatch_script(_gpu_job(tmp_path, gpus_per_node=8, requeue=True))
  assert "--requeue" in _directives(script)
  final_metrics = tmp_path / "run" / "final_metrics.json"
  assert f'if [ "${{status}}" -eq 0 ] && [ ! -e {final_metrics} ]; then' in script
  assert 'scontrol requeue "${SLURM_JOB_ID}"' in script


def test_one_task_per_node_shows_each_process_all_gpus_of_its_node(tmp_path):
  job = _gpu_job(tmp_path, nodes=4, gpus_per_node=4, one_task_per_node=True)
  script = slurm.sbatch_script(job)
  assert "--ntasks-per-node=1" in _directives(script)
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script


def test_cpu_devices_and_env_are_exported(tmp_path):
  job = _gpu_job(tmp_path, tasks_per_node=2, cpu_devices=4, env={"WANDB_MODE": "off line"})
  script = slurm.sbatch_script(job)
  assert "--ntasks-per-node=2" in _directives(script)
  assert "export XLA_FLAGS=--xla_force_host_platform_device_count=4" in script
  assert "export JAX_PLATFORMS=cpu" in script
  assert "export WANDB_MODE='off line'" in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_array_job_runs_each_index_in_its_own_workdir(tmp_path):
  job = slurm.SlurmJob(
    commands={0: ["echo", "point 0"], 2: ["echo", "point 2"]},
    workdirs={0: str(tmp_path / "p0"), 2: str(tmp_path / "p2")},
    script_dir=str(tmp_path / "slurm"),
    array_parallel=2,
    requeue=True,
  )
  script = slurm.sbatch_script(job)
  assert "--array=0,2%2" in _directives(script)
  assert f"--output={tmp_path}/slurm/%A_%a.out" in _directives(script)
  path = slurm.write_script(job)
  assert subprocess.run(["bash", "-n", path]).returncode == 0
  # Run index 2 the way SLURM would, with `srun` and `scontrol` stand-ins.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n"$@"\n')
  (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*"\n')
  for tool in ("srun", "scontrol"):
    os.chmod(bin_dir / tool, 0o755)
  env = {
    **os.environ,
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    "SLURM_ARRAY_TASK_ID": "2",
    "SLURM_JOB_ID": "42",
    "SLURM_JOB_NODELIST": "node1",
    "SLURM_NTASKS": "1",
  }
  result = subprocess.run(["bash", path], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert "point 2" in result.stdout and "point 0" not in result.stdout
  # The run left no final_metrics.json: the script asks SLURM to requeue the job.
  assert "scontrol requeue 42" in result.stdout
  assert os.path.isdir(tmp_path / "p2" / "logs")


def test_bad_options_are_named(tmp_path):
  with pytest.raises(ValueError, match="has no --workdir"):
    slurm.job_from_command(["fdjax", "train", "--config", "c.py"])
  with pytest.raises(ValueError, match="--nodes must be at least 1"):
    _gpu_job(tmp_path, nodes=0)
  with pytest.raises(ValueError, match="contradicts --tasks-per-node"):
    _gpu_job(tmp_path, one_task_per_node=True, tasks_per_node=4)


def test_dry_run_cli_writes_and_prints_the_script_without_sbatch(tmp_path):
  workdir = tmp_path / "run"
  command = [
    sys.executable, "-m", "fdjax.cli", "launch", "slurm", "--dry-run", "--nodes", "2",
    "--gpus-per-node", "8", "--time", "1:00:00", "--partition", "gpu", "--requeue", "--",
    "fdjax", "train", "--config", "c.py", "--workdir", str(workdir),
  ]  # fmt: skip
  env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no sbatch on PATH
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  written = os.listdir(workdir / "slurm")
  assert len(written) == 1 and written[0].endswith(".sbatch")
  assert result.stdout.startswith(f"# {workdir / 'slurm' / written[0]}\n#!/bin/bash\n")
  assert "#SBATCH --gpus-per-node=8" in result.stdout
