"""N processes of one run on this host, joined by `jax.distributed` (`fdjax launch local`).

`fdjax launch local -n 2 --cpu-devices 4 -- fdjax train --config C --workdir W` starts the
command twice. Each process gets `FDJAX_COORDINATOR` / `FDJAX_NUM_PROCESSES` /
`FDJAX_PROCESS_ID` (read by `fdjax.distributed.initialize`) and its own devices: fake CPU
devices (`--cpu-devices K`, collectives over gloo) or a slice of the GPUs
(`--gpus-per-process G`). Output goes to `<log-dir>/process_<i>.log` (default `W/logs`) and,
prefixed with `[i]`, to this terminal. When any process exits non-zero the others are stopped
(SIGTERM, then SIGKILL after a grace period) and a report says which process failed, how, and
which processes never started to join the JAX runtime. SIGTERM or Ctrl-C to the launcher is
passed on to every process, so the trainer can checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from fdjax.distributed import (
  ENV_COORDINATOR,
  ENV_NUM_PROCESSES,
  ENV_PROCESS_ID,
  JOINED_MARKER,
  JOINING_MARKER,
)

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


@dataclasses.dataclass
class ProcessOutcome:
  """What became of one process of a local run."""

  process_id: int  # Index of the process in the run.
  returncode: int | None  # Exit status (negative: killed by that signal); None: still running.
  log_path: str  # Where its stdout and stderr went.
  started_join: bool = False  # Printed that it is joining the JAX runtime.
  joined: bool = False  # Printed that it joined.
  stopped_by: str | None = None  # Signal the launcher sent it after another process failed.


@dataclasses.dataclass
class LocalRunResult:
  """Outcome of `run_local`: overall exit status, each process, and a readable report."""

  returncode: int  # 0 when every process exited 0, else the failing process's status.
  processes: list[ProcessOutcome]  # One per process, by index.
  failed_process: int | None  # Index of the first process that failed, if any.
  report: str  # Multi-line summary, also printed by `main`.


def free_port() -> int:
  """A TCP port nothing listens on right now (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def resolve_command(command: Sequence[str]) -> list[str]:
  """`fdjax ...` -> `python -m fdjax.cli ...` when the console script is not installed."""
  command = list(command)
  if not command:
    raise ValueError("no command given: put it after `--`, e.g. `-- fdjax train ...`")
  if command[0] == "fdjax" and shutil.which("fdjax") is None:
    return [sys.executable, "-m", "fdjax.cli", *command[1:]]
  return command


def workdir_of(command: Sequence[str]) -> str | None:
  """The value of `--workdir` in a command line, if it has one."""
  for i, arg in enumerate(command):
    if arg == "--workdir" and i + 1 < len(command):
      return command[i + 1]
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  return None


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `[options...] -- command...` at the first `--` (no `--`: all options)."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  cut = argv.index("--")
  return argv[:cut], argv[cut + 1 :]


def require_command(parser: argparse.ArgumentParser, command: Sequence[str]) -> None:
  """Fails through `parser` when nothing follows `--`."""
  if not command:
    parser.error("no command: put it after `--`, e.g. `-- fdjax train --config C --workdir W`")


def process_env(
  process_id: int,
  num_processes: int,
  coordinator: str,
  *,
  cpu_devices: int | None = None,
  gpus_per_process: int | None = None,
  base_env: dict[str, str] | None = None,
) -> dict[str, str]:
  """The environment of process `process_id`: join parameters and its own devices."""
  env = dict(os.environ if base_env is None else base_env)
  env[ENV_COORDINATOR] = coordinator
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  if cpu_devices is not None:
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  if gpus_per_process is not None:
    first = process_id * gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(gpus_per_process))
  return env


def run_local(
  command: Sequence[str],
  num_processes: int,
  *,
  cpu_devices: int | None = None,
  gpus_per_process: int | None = None,
  log_dir: str | None = None,
  port: int | None = None,
  grace_s: float = 10.0,
  stream: bool = True,
  env: dict[str, str] | None = None,
) -> LocalRunResult:
  """Runs `command` as `num_processes` joined processes and waits for all of them.

  Args:
    command: the program and its arguments, the same for every process.
    num_processes: how many processes to start.
    cpu_devices: fake CPU devices per process (sets XLA_FLAGS and JAX_PLATFORMS=cpu).
    gpus_per_process: GPUs per process; process i sees GPUs [i*G, (i+1)*G).
    log_dir: where `process_<i>.log` go; default `<workdir>/logs` for a command with
      `--workdir`, else `./launch_logs/<time>`.
    port: coordinator port on 127.0.0.1 (default: a free one).
    grace_s: after a failure, how long the other processes get between SIGTERM and SIGKILL.
    stream: also copy every process's output, prefixed `[i]`, to this process's stdout.
    env: base environment (default: this process's).

  Returns:
    A `LocalRunResult`; its `report` says which process failed and which never joined.
  """
  if num_processes < 1:
    raise ValueError(f"-n must be at least 1, got {num_processes}")
  if cpu_devices is not None and gpus_per_process is not None:
    raise ValueError("give either --cpu-devices or --gpus-per-process, not both")
  command = resolve_command(command)
  if log_dir is None:
    workdir = workdir_of(command)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = os.path.join(workdir, "logs") if workdir else os.path.join("launch_logs", stamp)
  os.makedirs(log_dir, exist_ok=True)
  coordinator = f"127.0.0.1:{port or free_port()}"

  outcomes = [
    ProcessOutcome(i, None, os.path.join(log_dir, f"process_{i}.log")) for i in range(num_processes)
  ]
  procs: list[subprocess.Popen] = []
  readers: list[threading.Thread] = []
  lock = threading.Lock()
  for outcome in outcomes:
    child_env = process_env(
      outcome.process_id,
      num_processes,
      coordinator,
      cpu_devices=cpu_devices,
      gpus_per_process=gpus_per_process,
      base_env=env,
    )
    # Own session: a signal reaches the process's whole group (Grain workers included).
    proc = subprocess.Popen(
      command,
      env=child_env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      start_new_session=True,
    )
    procs.append(proc)
    print(
      f"fdjax launch local: process {outcome.process_id} pid {proc.pid}, log {outcome.log_path}",
      flush=True,
    )
    reader = threading.Thread(
      target=_copy_output, args=(proc, outcome, stream, lock, command), daemon=True
    )
    reader.start()
    readers.append(reader)

  failed = _supervise(procs, outcomes, grace_s)
  for reader in readers:
    reader.join(timeout=30)
  for proc, outcome in zip(procs, outcomes):
    outcome.returncode = proc.returncode
  if failed is None:
    returncode = 0
  else:
    code = outcomes[failed].returncode
    returncode = code if code and code > 0 else 128 + abs(code or 1)
  report = _report(outcomes, failed, coordinator)
  return LocalRunResult(returncode, outcomes, failed, report)


def _copy_output(proc, outcome: ProcessOutcome, stream: bool, lock: threading.Lock, command):
  """Copies one process's output to its log (and the terminal), noting its join progress."""
  with open(outcome.log_path, "a", encoding="utf-8", errors="replace") as log:
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    log.write(f"=== fdjax launch local {stamp}: process {outcome.process_id}: {command}\n")
    for raw in proc.stdout:
      line = raw.decode("utf-8", errors="replace")
      if JOINING_MARKER in line:
        outcome.started_join = True
      if JOINED_MARKER in line:
        outcome.joined = True
      log.write(line)
      log.flush()
      if stream:
        with lock:
          sys.stdout.write(f"[{outcome.process_id}] {line}")
          sys.stdout.flush()


class _ExitOrder:
  """Records the order in which processes exit, as it happens (one waiting thread each).

  Polling would see processes that die close together in the same round, and could blame a
  process that only failed because another died first.
  """

  def __init__(self, procs: list[subprocess.Popen]):
    self.order: list[int] = []
    self.changed = threading.Event()
    self._lock = threading.Lock()
    for i, proc in enumerate(procs):
      threading.Thread(target=self._wait, args=(i, proc), daemon=True).start()

  def _wait(self, index: int, proc: subprocess.Popen) -> None:
    proc.wait()
    with self._lock:
      self.order.append(index)
    self.changed.set()

  def exited(self) -> list[int]:
    with self._lock:
      return list(self.order)

  def wait(self, timeout_s: float) -> None:
    self.changed.wait(timeout_s)
    self.changed.clear()


def _supervise(procs, outcomes, grace_s: float) -> int | None:
  """Waits for all processes; on the first failure stops the rest. Returns the failed index."""
  exits = _ExitOrder(procs)
  forwarded = []

  def forward(signum, frame):
    # First signal: let every process checkpoint and exit; second: kill.
    sig = signal.SIGTERM if not forwarded else signal.SIGKILL
    forwarded.append(signum)
    for proc in procs:
      _signal_group(proc, sig)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGTERM, signal.SIGINT):
      previous[signum] = signal.signal(signum, forward)
  try:
    while True:
      exited = exits.exited()
      failed = next((i for i in exited if procs[i].returncode != 0), None)
      if failed is not None and not forwarded:
        _stop_others(procs, outcomes, failed, grace_s, exits)
        return failed
      if len(exited) == len(procs):
        return failed
      exits.wait(0.1)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _stop_others(procs, outcomes, failed: int, grace_s: float, exits: _ExitOrder) -> None:
  running = [i for i in range(len(procs)) if i not in exits.exited()]
  for i in running:
    _signal_group(procs[i], signal.SIGTERM)
    outcomes[i].stopped_by = "SIGTERM"
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and len(exits.exited()) < len(procs):
    exits.wait(0.1)
  for i in running:
    if i not in exits.exited():
      _signal_group(procs[i], signal.SIGKILL)
      outcomes[i].stopped_by = "SIGTERM, then SIGKILL"
  while len(exits.exited()) < len(procs):
    exits.wait(0.1)
  # The failed process's own children (e.g. data workers) must not outlive it.
  _signal_group(procs[failed], signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  # The group may be gone already (or, after a pid reuse, not ours to signal).
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, sig)


def _describe_exit(code: int | None) -> str:
  if code is None:
    return "still running"
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  return f"exited with code {code}"


def _report(outcomes: list[ProcessOutcome], failed: int | None, coordinator: str) -> str:
  n = len(outcomes)
  if failed is None:
    return f"fdjax launch local: all {n} processes finished (coordinator {coordinator})"
  lines = [
    f"fdjax launch local: process {failed} of {n} failed first "
    f"({_describe_exit(outcomes[failed].returncode)}); the others were stopped"
  ]
  never_joined = [o.process_id for o in outcomes if not o.started_join]
  if any(o.started_join for o in outcomes) and not all(o.joined for o in outcomes):
    lines.append(
      f"  processes that never started to join the JAX runtime at {coordinator}: "
      f"{never_joined or 'none'}"
    )
  for o in outcomes:
    state = _describe_exit(o.returncode)
    if o.stopped_by:
      state = f"stopped by the launcher ({o.stopped_by}), {state}"
    joined = "joined" if o.joined else ("joining" if o.started_join else "not joined")
    lines.append(f"  process {o.process_id}: {state}; {joined}; log {o.log_path}")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="fdjax launch local",
    description="Run `-- command ...` as N joined JAX processes on this host.",
  )
  parser.add_argument("-n", "--num-processes", type=int, required=True, help="processes")
  devices = parser.add_mutually_exclusive_group()
  devices.add_argument("--cpu-devices", type=int, help="fake CPU devices per process")
  devices.add_argument("--gpus-per-process", type=int, help="GPUs per process")
  parser.add_argument("--log-dir", help="per-process logs (default: <workdir>/logs)")
  parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
  parser.add_argument("--grace-s", type=float, default=10.0, help="SIGTERM-to-SIGKILL delay")
  parser.add_argument("--quiet", action="store_true", help="only write logs, do not echo them")
  return parser


def main(argv: Sequence[str]) -> int:
  """`fdjax launch local -n N [options] -- command ...`; returns the run's exit status."""
  options, command = split_command(argv)
  parser = build_parser()
  args = parser.parse_args(options)
  require_command(parser, command)
  result = run_local(
    command,
    args.num_processes,
    cpu_devices=args.cpu_devices,
    gpus_per_process=args.gpus_per_process,
    log_dir=args.log_dir,
    port=args.port,
    grace_s=args.grace_s,
    stream=not args.quiet,
  )
  print(result.report, file=sys.stderr if result.returncode else sys.stdout, flush=True)
  return result.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
