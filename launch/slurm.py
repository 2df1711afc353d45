"""SLURM batch jobs for multi-host runs and sweeps (`fdjax launch slurm`).

`fdjax launch slurm --nodes 2 --gpus-per-node 8 --time 4:00:00 --partition gpu -- fdjax train
--config C --workdir W` writes `W/slurm/<job-name>-<time>.sbatch` and submits it with `sbatch`
(or only writes and prints it with `--dry-run`), then prints the job id. The script starts one
task per GPU (or `--tasks-per-node`, or `--one-task-per-node` with every GPU of the node) with
`srun --kill-on-bad-exit`, so one failing task ends the step; JAX reads the SLURM environment
itself (`fdjax.distributed.initialize`). Output: the batch log `W/slurm/<job id>.out` and one
log per task `W/logs/slurm-<job id>-task<rank>.log`.

Time limits and preemption: SLURM sends the tasks SIGTERM `--signal-grace-s` before the time
limit, and the trainer checkpoints and exits 0. With `--requeue` the job is also requeued when
the scheduler preempts it, and when the tasks exited 0 but the run has no `final_metrics.json`
yet, the batch script requeues it itself; the requeued run resumes from its checkpoint.

Sweeps use the same script with a job array (`--array`): `fdjax.sweep` passes one command per
array index.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

from launch.local import require_command, resolve_command, split_command, workdir_of

# The file a finished `fdjax train` run leaves in its workdir (see fdjax/trainer.py).
FINISHED_MARKER = "final_metrics.json"


@dataclasses.dataclass
class SlurmJob:
  """Everything an sbatch script for an fdjax run needs.

  `commands` maps an array index to the command it runs (the sweeps' job arrays), or holds one
  command under index None for a plain job; `workdirs` maps the same keys to the run's workdir.
  """

  commands: dict[int | None, list[str]]  # Command per array index (None: not an array).
  workdirs: dict[int | None, str]  # Run workdir per array index; logs and requeue check.
  script_dir: str  # Where the script and the batch log go.
  job_name: str = "fdjax"  # --job-name.
  nodes: int = 1  # --nodes.
  gpus_per_node: int = 0  # --gpus-per-node (0: no GPUs requested).
  tasks_per_node: int | None = None  # Processes per node (default: one per GPU, else 1).
  one_task_per_node: bool = False  # One process per node that sees all its GPUs.
  cpus_per_task: int | None = None  # --cpus-per-task.
  cpu_devices: int | None = None  # Fake CPU devices per task (CPU-only clusters, tests).
  time: str = "01:00:00"  # --time.
  partition: str | None = None  # --partition.
  account: str | None = None  # --account.
  qos: str | None = None  # --qos.
  mem: str | None = None  # --mem per node, e.g. 64G.
  requeue: bool = False  # Requeue on preemption and after a pre-time-limit checkpoint.
  signal_grace_s: int = 120  # SIGTERM this long before the time limit.
  array_parallel: int | None = None  # At most this many array tasks at once (%K).
  env: dict[str, str] = dataclasses.field(default_factory=dict)  # Exported in the script.
  sbatch_args: list[str] = dataclasses.field(default_factory=list)  # Extra #SBATCH options.
  chdir: str = dataclasses.field(default_factory=os.getcwd)  # The job's working directory.

  def __post_init__(self):
    if not self.commands:
      raise ValueError("a SLURM job needs at least one command")
    if set(self.commands) != set(self.workdirs):
      raise ValueError("commands and workdirs must have the same keys")
    if self.nodes < 1:
      raise ValueError(f"--nodes must be at least 1, got {self.nodes}")
    if self.gpus_per_node < 0:
      raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
    if self.one_task_per_node and self.tasks_per_node not in (None, 1):
      raise ValueError("--one-task-per-node contradicts --tasks-per-node > 1")
    if not re.fullmatch(r"[\w.+-]+", self.job_name):
      raise ValueError(f"job name {self.job_name!r}: use letters, digits, '.', '_', '+', '-'")

  @property
  def is_array(self) -> bool:
    return None not in self.commands

  @property
  def ntasks_per_node(self) -> int:
    if self.one_task_per_node:
      return 1
    if self.tasks_per_node is not None:
      return self.tasks_per_node
    return self.gpus_per_node or 1


def sbatch_script(job: SlurmJob) -> str:
  """The text of the sbatch script for `job` (see the module docstring for what it does)."""
  stamp = datetime.datetime.now().isoformat(timespec="seconds")
  if job.is_array:
    log = os.path.join(job.script_dir, "%A_%a.out")
  else:
    log = os.path.join(job.script_dir, "%j.out")
  directives = [
    f"--job-name={job.job_name}",
    f"--nodes={job.nodes}",
    f"--ntasks-per-node={job.ntasks_per_node}",
  ]
  if job.gpus_per_node:
    directives.append(f"--gpus-per-node={job.gpus_per_node}")
  for flag, value in (
    ("cpus-per-task", job.cpus_per_task),
    ("mem", job.mem),
    ("time", job.time),
    ("partition", job.partition),
    ("account", job.account),
    ("qos", job.qos),
  ):
    if value is not None:
      directives.append(f"--{flag}={value}")
  directives += [f"--chdir={job.chdir}", f"--output={log}", "--open-mode=append"]
  directives.append(f"--signal=TERM@{job.signal_grace_s}")
  directives.append("--requeue" if job.requeue else "--no-requeue")
  if job.is_array:
    indices = ",".join(str(i) for i in sorted(job.commands))
    limit = f"%{job.array_parallel}" if job.array_parallel else ""
    directives.append(f"--array={indices}{limit}")
  directives += job.sbatch_args

  env = {"PYTHONUNBUFFERED": "1"}
  if job.cpu_devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={job.cpu_devices}"
    env["JAX_PLATFORMS"] = "cpu"
  if job.one_task_per_node and job.gpus_per_node:
    # JAX under SLURM shows each task one GPU (its local rank) unless told otherwise.
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(g) for g in range(job.gpus_per_node))
  env |= job.env

  lines = [
    "#!/bin/bash",
    f"# Written by `fdjax launch slurm` on {stamp}; submit it with `sbatch`.",
    *(f"#SBATCH {d}" for d in directives),
    "",
    "set -uo pipefail",
    *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
    "",
  ]
  if job.is_array:
    lines.append('case "${SLURM_ARRAY_TASK_ID}" in')
    for index in sorted(job.commands):
      lines.append(f"  {index})")
      lines += [f"    {line}" for line in _run_block(job, index)]
      lines.append("    ;;")
    lines += [
      "  *)",
      '    echo "fdjax: no command for array index ${SLURM_ARRAY_TASK_ID}" >&2',
      "    exit 2",
      "    ;;",
      "esac",
    ]
  else:
    lines += _run_block(job, None)
  return "\n".join(lines) + "\n"


def _run_block(job: SlurmJob, index: int | None) -> list[str]:
  """Shell lines that run one command under srun and decide whether to requeue."""
  workdir = job.workdirs[index]
  command = shlex.join(job.commands[index])
  task_log = os.path.join(workdir, "logs", "slurm-%j-task%t.log")
  finished = os.path.join(workdir, FINISHED_MARKER)
  srun = shlex.join(
    [
      "srun",
      "--kill-on-bad-exit=1",
      f"--ntasks-per-node={job.ntasks_per_node}",
      f"--output={task_log}",
    ]
  )
  lines = [
    f"mkdir -p {shlex.quote(os.path.join(workdir, 'logs'))}",
    'echo "fdjax: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on '
    '${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} tasks"',
    f"echo {shlex.quote('fdjax: ' + command)}",
    # The batch shell outlives a SIGTERM (preemption) so that it can wait for the tasks.
    "trap 'echo \"fdjax: SIGTERM: waiting for the tasks to checkpoint\"' TERM",
    f"{srun} {command} &",
    "srun_pid=$!",
    'while true; do wait "${srun_pid}"; status=$?; kill -0 "${srun_pid}" 2>/dev/null || break;'
    " done",
    'echo "fdjax: tasks exited with status ${status}"',
  ]
  if job.requeue:
    lines += [
      f'if [ "${{status}}" -eq 0 ] && [ ! -e {shlex.quote(finished)} ]; then',
      '  echo "fdjax: the run checkpointed before finishing; requeueing job ${SLURM_JOB_ID}"',
      '  scontrol requeue "${SLURM_JOB_ID}"',
      "fi",
    ]
  lines.append('exit "${status}"')
  return lines


def write_script(job: SlurmJob, path: str | None = None) -> str:
  """Writes the sbatch script (default `<script_dir>/<job_name>-<time>.sbatch`); returns it."""
  if path is None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = os.path.join(job.script_dir, f"{job.job_name}-{stamp}.sbatch")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(sbatch_script(job))
  os.chmod(path, 0o755)
  return path


def submit(script_path: str, env: dict[str, str] | None = None) -> str:
  """Submits a script with `sbatch` and returns the job id."""
  sbatch = shutil.which("sbatch", path=(env or os.environ).get("PATH"))
  if sbatch is None:
    raise FileNotFoundError("sbatch is not installed here; use --dry-run to only write the script")
  result = subprocess.run(
    [sbatch, "--parsable", script_path], env=env, capture_output=True, text=True
  )
  if result.returncode != 0:
    raise RuntimeError(f"sbatch {script_path} failed: {result.stderr.strip()}")
  return result.stdout.strip().split(";")[0]


def job_from_command(command: Sequence[str], **options) -> SlurmJob:
  """A plain (non-array) job for one command; its workdir comes from the command's --workdir."""
  command = resolve_command(command)
  workdir = options.pop("workdir", None) or workdir_of(command)
  if workdir is None:
    raise ValueError("the command has no --workdir; pass --workdir to place scripts and logs")
  workdir = os.path.abspath(workdir)
  return SlurmJob(
    commands={None: command},
    workdirs={None: workdir},
    script_dir=os.path.join(workdir, "slurm"),
    **options,
  )


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
  """The options that say what each job needs (shared with `fdjax sweep --launcher slurm`)."""
  parser.add_argument("--nodes", type=int, default=1, help="nodes per run")
  parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node")
  parser.add_argument("--tasks-per-node", type=int, help="processes per node (default: per GPU)")
  parser.add_argument(
    "--one-task-per-node", action="store_true", help="one process per node with all its GPUs"
  )
  parser.add_argument("--cpus-per-task", type=int, help="CPUs per process")
  parser.add_argument("--cpu-devices", type=int, help="fake CPU devices per process (tests)")
  parser.add_argument("--time", default="01:00:00", help="time limit, e.g. 4:00:00")
  parser.add_argument("--partition", help="partition")
  parser.add_argument("--account", help="account to charge")
  parser.add_argument("--qos", help="quality of service")
  parser.add_argument("--mem", help="memory per node, e.g. 64G")
  parser.add_argument("--requeue", action="store_true", help="requeue after preemption")
  parser.add_argument("--signal-grace-s", type=int, default=120, help="SIGTERM before time limit")
  parser.add_argument(
    "--env", action="append", default=[], metavar="K=V", help="export in the job (repeatable)"
  )
  parser.add_argument(
    "--sbatch-arg", action="append", default=[], help="extra #SBATCH option (repeatable)"
  )


def resource_options(args: argparse.Namespace) -> dict:
  """`SlurmJob` keyword arguments from the options of `add_resource_arguments`."""
  env = {}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--env {item!r} is not of the form KEY=VALUE")
    env[key] = value
  return dict(
    nodes=args.nodes,
    gpus_per_node=args.gpus_per_node,
    tasks_per_node=args.tasks_per_node,
    one_task_per_node=args.one_task_per_node,
    cpus_per_task=args.cpus_per_task,
    cpu_devices=args.cpu_devices,
    time=args.time,
    partition=args.partition,
    account=args.account,
    qos=args.qos,
    mem=args.mem,
    requeue=args.requeue,
    signal_grace_s=args.signal_grace_s,
    env=env,
    sbatch_args=list(args.sbatch_arg),
  )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="fdjax launch slurm",
    description="Write and submit an sbatch script that runs `-- command ...`.",
  )
  add_resource_arguments(parser)
  parser.add_argument("--job-name", default="fdjax", help="SLURM job name")
  parser.add_argument("--workdir", help="run workdir (default: the command's --workdir)")
  parser.add_argument("--script", help="where to write the script (default: <workdir>/slurm/)")
  parser.add_argument("--dry-run", action="store_true", help="write and print; do not submit")
  return parser


def main(argv: Sequence[str]) -> int:
  """`fdjax launch slurm [options] -- command ...`; prints the job id (or, dry, the script)."""
  options, command = split_command(argv)
  parser = build_parser()
  args = parser.parse_args(options)
  require_command(parser, command)
  job = job_from_command(
    command, workdir=args.workdir, job_name=args.job_name, **resource_options(args)
  )
  path = write_script(job, args.script)
  if args.dry_run:
    with open(path) as f:
      print(f"# {path}\n{f.read()}", end="")
    return 0
  job_id = submit(path)
  # The job id alone on stdout, for scripts; the where-to-look on stderr.
  print(job_id, flush=True)
  log = os.path.join(job.script_dir, f"{job_id}.out")
  print(f"fdjax launch slurm: submitted job {job_id} ({path}); log {log}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
