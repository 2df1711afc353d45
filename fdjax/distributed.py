"""Joining the processes of a multi-host run and checking that they fit together.

`fdjax train` calls `initialize(timeout_s)` before it touches any device, and `preflight(config,
mesh)` once the mesh is built. Processes are joined by JAX's own multi-controller runtime
(`jax.distributed.initialize`); fdjax only decides where the join parameters come from:

- `FDJAX_COORDINATOR`, `FDJAX_NUM_PROCESSES`, `FDJAX_PROCESS_ID` (set by `launch/local.py` and by
  the Kubernetes manifests of `launch/k8s.py`): passed to JAX explicitly;
- a SLURM job step with more than one task (`srun`): JAX reads the SLURM environment itself;
- `FDJAX_DISTRIBUTED=auto` (e.g. GKE TPU slices): JAX auto-detects the cluster;
- anything else is a single process and nothing is initialised.

An uncaught exception in a joined process ends it at once (see
`_exit_promptly_on_uncaught_exception`), so launchers see failures without JAX's shutdown delay.
JAX aborts the whole process when its own join deadline passes, with a message that names no
process. So the join runs in a helper thread under fdjax's deadline, and on timeout this process
raises `JoinTimeoutError` saying who it is, where it waited and what it can tell about the
others; `launch/local.py` adds which processes never started to join.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

# JAX itself is imported inside the functions: launchers import this module's names and should
# not pay JAX's start-up for it.

ENV_COORDINATOR = "FDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "FDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FDJAX_PROCESS_ID"
ENV_DISTRIBUTED = "FDJAX_DISTRIBUTED"

# Lines this module prints; launch/local.py reads them from each process's log.
JOINING_MARKER = "fdjax.distributed: joining"
JOINED_MARKER = "fdjax.distributed: joined"
PREFLIGHT_MARKER = "fdjax preflight:"

# JAX's own deadline is set this much later than fdjax's so that fdjax's message comes first.
_JAX_DEADLINE_MARGIN_S = 60


class JoinTimeoutError(RuntimeError):
  """Not every process joined the JAX runtime within the timeout."""


class PreflightError(RuntimeError):
  """The processes, devices, mesh, batch or config of a run do not fit together."""


@dataclasses.dataclass(frozen=True)
class JoinSpec:
  """Where this process's join parameters come from, and what they are where fdjax knows."""

  source: str  # "fdjax-env" (explicit variables), "slurm" or "auto" (JAX detects the cluster).
  coordinator_address: str | None  # host:port of process 0's coordination service.
  num_processes: int | None  # Processes in the run.
  process_id: int | None  # This process's index in [0, num_processes).


def join_spec_from_env(environ: dict[str, str] | None = None) -> JoinSpec | None:
  """The join parameters this process's environment asks for; None for a single process."""
  env = os.environ if environ is None else environ
  if ENV_COORDINATOR in env or ENV_NUM_PROCESSES in env or ENV_PROCESS_ID in env:
    missing = [k for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if k not in env]
    if missing:
      raise ValueError(
        f"multi-process environment is incomplete: {', '.join(missing)} not set "
        f"(all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} are needed)"
      )
    num_processes = _env_int(env, ENV_NUM_PROCESSES)
    process_id = _env_int(env, ENV_PROCESS_ID)
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
        f"{ENV_PROCESS_ID}={process_id} is not in [0, {ENV_NUM_PROCESSES}={num_processes})"
      )
    if num_processes == 1:
      return None
    coordinator = env[ENV_COORDINATOR]
    if ":" not in coordinator:
      raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} is not of the form host:port")
    return JoinSpec("fdjax-env", coordinator, num_processes, process_id)
  if env.get(ENV_DISTRIBUTED, "").lower() == "auto":
    return JoinSpec("auto", None, None, None)
  step_tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
  if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and step_tasks and int(step_tasks) > 1:
    return JoinSpec("slurm", None, int(step_tasks), _env_int(env, "SLURM_PROCID"))
  return None


def initialize(timeout_s: float = 300.0) -> JoinSpec | None:
  """Joins this process to the run's JAX runtime, or does nothing for a single process.

  Args:
    timeout_s: how long to wait for all processes to join before failing.

  Returns:
    The join parameters used, or None for a single process.

  Raises:
    JoinTimeoutError: not all processes joined within `timeout_s`; the message names this
      process, the coordinator address and whether the coordinator was reachable.
  """
  import jax

  spec = join_spec_from_env()
  if spec is None or jax.distributed.is_initialized():
    return spec
  kwargs: dict[str, Any] = {
    "initialization_timeout": int(math.ceil(timeout_s)) + _JAX_DEADLINE_MARGIN_S
  }
  if spec.source == "fdjax-env":
    kwargs |= dict(
      coordinator_address=spec.coordinator_address,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
    )
  _exit_promptly_on_uncaught_exception()
  who = _describe(spec)
  print(f"{JOINING_MARKER} {who} (timeout {timeout_s:g} s)", file=sys.stderr, flush=True)
  error: list[BaseException] = []

  def join() -> None:
    try:
      jax.distributed.initialize(**kwargs)
    except BaseException as e:  # re-raised in the calling thread
      error.append(e)

  # JAX's connect blocks in C++ (releasing the GIL) and aborts the process at its own deadline,
  # so it runs in a daemon thread that this thread can stop waiting for.
  start = time.monotonic()
  thread = threading.Thread(target=join, name="fdjax-distributed-join", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise JoinTimeoutError(_timeout_message(spec, timeout_s))
  if error:
    raise error[0]
  print(
    f"{JOINED_MARKER} process {jax.process_index()}/{jax.process_count()} "
    f"after {time.monotonic() - start:.1f} s",
    file=sys.stderr,
    flush=True,
  )
  return spec


def _exit_promptly_on_uncaught_exception() -> None:
  """Makes an uncaught exception end this process at once, after printing its traceback.

  Otherwise JAX's exit handler waits at a shutdown barrier for every other process, up to its
  shutdown timeout (minutes), while the others wait in collectives for this one: the launcher
  would only see the failure when the barrier gives up.
  """
  previous = sys.excepthook

  def hook(kind, value, traceback) -> None:
    previous(kind, value, traceback)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = hook


def _env_int(env: dict[str, str], key: str) -> int:
  try:
    return int(env[key])
  except ValueError:
    raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _describe(spec: JoinSpec) -> str:
  if spec.source == "fdjax-env":
    return (
      f"process {spec.process_id}/{spec.num_processes} via coordinator {spec.coordinator_address}"
    )
  if spec.source == "slurm":
    return (
      f"process {spec.process_id}/{spec.num_processes} via SLURM job "
      f"{os.environ.get('SLURM_JOB_ID')} (JAX reads the coordinator from SLURM)"
    )
  return "via JAX cluster auto-detection"


def _timeout_message(spec: JoinSpec, timeout_s: float) -> str:
  head = f"not all processes joined the JAX runtime within {timeout_s:g} s: this is " + _describe(
    spec
  )
  if spec.source != "fdjax-env":
    return (
      f"{head}. Check that every task of the job started: a task that never starts, or crashes "
      "before joining, leaves the others waiting."
    )
  if spec.process_id == 0:
    others = ", ".join(str(i) for i in range(1, spec.num_processes))
    return (
      f"{head}. This process hosts the coordinator and waited for processes {others}; "
      "those whose logs lack the line "
      f"'{JOINING_MARKER}' never started to join (crashed, not started, or started with a "
      "different coordinator address or process count)."
    )
  host, _, port = spec.coordinator_address.rpartition(":")
  if _reachable(host, int(port)):
    state = (
      "the coordinator is listening, so process 0 joined and another process did not; "
      f"those whose logs lack the line '{JOINING_MARKER}' never started to join"
    )
  else:
    state = (
      f"nothing listens at {spec.coordinator_address}: process 0 (the coordinator) did not "
      "join (crashed, not started, or on another address)"
    )
  return f"{head}; {state}."


def _reachable(host: str, port: int) -> bool:
  try:
    with socket.create_connection((host.strip("[]"), port), timeout=2):
      return True
  except OSError:
    return False


def preflight(config: Any, mesh: Any) -> str:
  """Checks that processes, devices, mesh, batch and config fit; prints and returns one line.

  The line names the process index and count, the local and global devices, the mesh shape,
  the global and per-process batch and the config hash, e.g.
  `fdjax preflight: process 0/2 | devices 4 local, 8 global (cpu) | mesh data=8 fsdp=1 tensor=1
  | batch 16 global, 8 per process | config 1a2b3c4d5e6f`.

  Raises:
    PreflightError: the mesh does not cover the devices, the batch does not split over the
      processes and data-parallel devices, or the processes were given different configs.
  """
  import jax

  from fdjax import config as config_lib
  from fdjax import sharding as sharding_lib

  process_index, process_count = jax.process_index(), jax.process_count()
  global_devices, local_devices = jax.device_count(), jax.local_device_count()
  mesh_shape = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  batch_size = int(config.batch_size)
  grad_accum_steps = int(config.grad_accum_steps)
  config_digest = config_lib.config_hash(config)
  line = (
    f"{PREFLIGHT_MARKER} process {process_index}/{process_count} | devices {local_devices} "
    f"local, {global_devices} global ({jax.default_backend()}) | mesh {mesh_shape} | batch "
    f"{batch_size} global, {batch_size / process_count:g} per process | config "
    f"{config_digest[:12]}"
  )
  print(line, flush=True)

  problems = []
  if mesh.devices.size != global_devices:
    problems.append(
      f"the mesh ({mesh_shape}) has {mesh.devices.size} devices but the runtime has "
      f"{global_devices} ({process_count} processes x {local_devices} local)"
    )
  axes = sharding_lib.batch_axes(sharding_lib.as_rules(config.rules))
  data_parallel = math.prod(mesh.shape[a] for a in axes)
  micro_batch = batch_size // grad_accum_steps if grad_accum_steps > 0 else batch_size
  if grad_accum_steps < 1 or batch_size % grad_accum_steps:
    problems.append(
      f"batch_size={batch_size} does not divide by grad_accum_steps={grad_accum_steps}"
    )
  elif micro_batch % math.lcm(data_parallel, process_count):
    problems.append(
      f"the global batch of {micro_batch} per micro-batch (batch_size={batch_size}, "
      f"grad_accum_steps={grad_accum_steps}) does not divide by {process_count} processes "
      f"and by the data-parallel size {data_parallel} (mesh axes {axes})"
    )
  if problems:
    raise PreflightError(f"process {process_index}/{process_count}: " + "; ".join(problems))
  if process_count > 1:
    _check_same_config(config_digest, process_index)
  return line


def _check_same_config(config_digest: str, process_index: int) -> None:
  """Exchanges config hashes between processes; every process fails if any differs."""
  from jax.experimental import multihost_utils

  # uint32 words: 64-bit integers would be narrowed unless jax_enable_x64 is on.
  words = np.frombuffer(bytes.fromhex(config_digest[:32]), dtype=np.uint32)  # [4]
  gathered = np.asarray(multihost_utils.process_allgather(words))  # [P, 4]
  digests = [row.astype(np.uint32).tobytes().hex() for row in gathered]
  if len(set(digests)) > 1:
    groups: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
      groups.setdefault(digest, []).append(i)
    described = "; ".join(f"processes {ids} have {digest[:12]}" for digest, ids in groups.items())
    raise PreflightError(
      f"process {process_index}: the processes were started with different configs "
      f"(config hash {described}); start every process with the same config file, "
      "arguments and overrides"
    )
