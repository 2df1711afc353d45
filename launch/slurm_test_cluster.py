"""A throw-away single-node SLURM cluster on this host, for testing `launch/slurm.py` for real.

`LocalSlurmCluster(root)` writes a munge key and a `slurm.conf` under `root` and starts
`munged`, `slurmctld` and `slurmd` with their own sockets, ports, state and log directories, so
it touches nothing of a system SLURM installation. Clients (`sbatch`, `squeue`, `scontrol`) find
it through the `SLURM_CONF` variable of `cluster.env()`. The daemons run as the current user
(root in CI, which `slurmd` needs to start jobs). `.ci/install_slurm.sh` installs the packages.

    with LocalSlurmCluster("/tmp/cluster") as cluster:
      subprocess.run(["sbatch", "job.sh"], env=cluster.env())
      cluster.wait_for_job(job_id)

Run as a script (`python -m launch.slurm_test_cluster ROOT`) it starts the cluster and keeps
it up until interrupted, printing the `SLURM_CONF` to export in another shell.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
NODE_NAME = "localhost"
PARTITION = "debug"


def missing_binaries() -> list[str]:
  """The SLURM and munge programs this cluster needs that are not installed."""
  search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
  return [b for b in DAEMONS if shutil.which(b, path=search) is None]


def _which(binary: str) -> str:
  path = shutil.which(binary, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
  if path is None:
    raise FileNotFoundError(f"{binary} is not installed (run .ci/install_slurm.sh)")
  return path


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LocalSlurmCluster:
  """munged + slurmctld + slurmd on localhost, configured and kept under one directory."""

  def __init__(self, root: str, cpus: int = 4, partition: str = PARTITION):
    self.root = os.path.abspath(root)
    # More CPUs than the host may have: jobs of the tests are small and may share cores.
    self.cpus = cpus
    self.partition = partition
    self.conf_path = os.path.join(self.root, "etc", "slurm.conf")
    self.munge_dir = os.path.join(self.root, "munge")
    if len(self.munge_dir) > 80:
      # A Unix socket path must fit in 108 bytes; deep temporary directories do not.
      self.munge_dir = tempfile.mkdtemp(prefix="fdjax-munge-")
    self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
    self._procs: dict[str, subprocess.Popen] = {}

  def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose SLURM clients talk to this cluster."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = self.conf_path
    env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return env

  def __enter__(self) -> LocalSlurmCluster:
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self, timeout_s: float = 60.0) -> None:
    """Writes the configuration, starts the daemons and waits until the node is idle."""
    for sub in ("etc", "state", "spool", "log", "run"):
      os.makedirs(os.path.join(self.root, sub), exist_ok=True)
    os.makedirs(self.munge_dir, exist_ok=True)
    # munged refuses directories that others may write to.
    os.chmod(self.munge_dir, 0o700)
    key = os.path.join(self.munge_dir, "munge.key")
    if not os.path.exists(key):
      with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    with open(self.conf_path, "w") as f:
      f.write(self._slurm_conf())
    # No SPANK plugins: the system's plugstack.conf may name some this cluster does not have.
    open(os.path.join(self.root, "etc", "plugstack.conf"), "w").close()
    log = os.path.join(self.root, "log")
    self._spawn(
      "munged",
      [
        _which("munged"),
        "--foreground",
        "--force",
        f"--socket={self.munge_socket}",
        f"--key-file={key}",
        f"--pid-file={os.path.join(self.root, 'run', 'munged.pid')}",
        f"--log-file={os.path.join(log, 'munged.log')}",
        f"--seed-file={os.path.join(self.munge_dir, 'munged.seed')}",
      ],
    )
    self._wait_for(lambda: os.path.exists(self.munge_socket), timeout_s, "munged socket")
    self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf_path])
    self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf_path, "-N", NODE_NAME])
    self._wait_for(self._node_ready, timeout_s, "the node to become idle")

  def stop(self) -> None:
    """Cancels any jobs and stops the daemons (slurmd first, munged last)."""
    if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
      subprocess.run(
        [_which("scancel"), "--full", f"--partition={self.partition}"],
        env=self.env(),
        capture_output=True,
        timeout=30,
      )
    for name in ("slurmd", "slurmctld", "munged"):
      proc = self._procs.pop(name, None)
      if proc is None or proc.poll() is not None:
        continue
      proc.terminate()
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not self.munge_dir.startswith(self.root + os.sep):
      shutil.rmtree(self.munge_dir, ignore_errors=True)

  def _spawn(self, name: str, argv: list[str]) -> None:
    out = open(os.path.join(self.root, "log", f"{name}.stdout"), "ab")
    self._procs[name] = subprocess.Popen(
      argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env()
    )
    out.close()

  def _node_ready(self) -> bool:
    for name, proc in self._procs.items():
      if proc.poll() is not None:
        raise RuntimeError(
          f"{name} exited with code {proc.returncode} while the test cluster started; "
          f"see {os.path.join(self.root, 'log')}"
        )
    result = subprocess.run(
      [_which("sinfo"), "--noheader", "--Node", "--format=%t"],
      env=self.env(),
      capture_output=True,
      text=True,
    )
    return result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc")

  def _wait_for(self, ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if ready():
        return
      time.sleep(0.5)
    logs = self.read_logs()
    raise TimeoutError(f"test cluster: timed out after {timeout_s:g} s waiting for {what}\n{logs}")

  def read_logs(self, tail_lines: int = 20) -> str:
    """The last lines of every daemon log, for error messages."""
    parts = []
    log_dir = os.path.join(self.root, "log")
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
      with open(os.path.join(log_dir, name), errors="replace") as f:
        lines = f.read().splitlines()[-tail_lines:]
      parts.append(f"--- {name}\n" + "\n".join(lines))
    return "\n".join(parts)

  def job_state(self, job_id: str) -> str:
    """The job's state (PENDING, RUNNING, COMPLETED, FAILED, ...), from `scontrol show job`."""
    result = subprocess.run(
      [_which("scontrol"), "show", "job", "--oneliner", job_id],
      env=self.env(),
      capture_output=True,
      text=True,
    )
    for field in result.stdout.split():
      if field.startswith("JobState="):
        return field.split("=", 1)[1]
    return "UNKNOWN"

  def wait_for_job(self, job_id: str, timeout_s: float = 300.0) -> str:
    """Waits until the job has ended and returns its final state."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      state = self.job_state(job_id)
      if state.split()[0] in ended:
        return state
      time.sleep(1.0)
    raise TimeoutError(
      f"job {job_id} did not end within {timeout_s:g} s ({self.job_state(job_id)})"
    )

  def _slurm_conf(self) -> str:
    r = self.root
    return f"""\
# Single-node test cluster written by launch/slurm_test_cluster.py; everything under {r}.
ClusterName=fdjaxtest
SlurmctldHost={NODE_NAME}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={_user_name()}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look for runnable jobs every 2 s (default 60 s): requeued jobs restart promptly.
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=10
NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName={self.partition} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP
"""


def _user_name() -> str:
  import pwd

  return pwd.getpwuid(os.getuid()).pw_name


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print("usage: python -m launch.slurm_test_cluster ROOT", file=sys.stderr)
    return 2
  with LocalSlurmCluster(argv[0]) as cluster:
    print(f"test cluster up: export SLURM_CONF={cluster.conf_path}  (Ctrl-C stops it)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
      while True:
        time.sleep(3600)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
