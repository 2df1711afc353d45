"""`fdjax train` as two joined processes through `launch/local.py` (4 fake CPU devices each).

The run uses `probetask` (tinytask plus a per-process record of the data read and the losses
computed), so the tests can see every process, not only process 0's metrics. All runs share one
XLA compilation cache: after the first, they skip compiling the same programs again.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, TESTS, TINY, read_metrics, subprocess_env

from fdjax import config as config_lib
from fdjax import trainer

LAUNCH_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (LAUNCH_TESTS, TESTS) if p not in sys.path]

STEPS = 30
SPEC = f"{TINY}:steps={STEPS}"
OVERRIDES = [
  "--config.task=probetask",
  "--config.data.delay_s=0.004",
  "--config.checkpoint.every=0",
  "--config.log_every=1",
  "--config.eval_every=10",
]


def _env():
  env = subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([LAUNCH_TESTS, env["PYTHONPATH"]])
  return env


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
  return [*OVERRIDES, f"--config.compilation_cache_dir={tmp_path_factory.mktemp('xla_cache')}"]


def _start(workdir, log_path, overrides):
  """Starts `fdjax launch local -n 2 -- fdjax train ...`; its own output goes to `log_path`."""
  command = [
    sys.executable, "-m", "launch.local", "-n", "2", "--cpu-devices", "4", "--grace-s", "2",
    "--",
    sys.executable, "-m", "fdjax.cli", "train", "--config", SPEC, *overrides,
    "--workdir", workdir,
  ]  # fmt: skip
  log = open(log_path, "a")
  return subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _run(workdir, log_path, overrides, timeout=240):
  proc = _start(workdir, log_path, overrides)
  returncode = proc.wait(timeout=timeout)
  return returncode, open(log_path).read()


def _wait_for_step(workdir, step, proc, timeout=180):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(workdir)):
      return
    assert proc.poll() is None, f"the launcher exited early with {proc.returncode}"
    time.sleep(0.05)
  raise AssertionError(f"no training step {step} within {timeout} s")


def _probe(workdir, name, process):
  with open(os.path.join(workdir, "probe", f"{name}_process_{process}.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(workdir):
  config = config_lib.load_config(SPEC, OVERRIDES)
  _, _, params, step = trainer.restore_params(config, workdir)
  return step, jax.device_get(params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, overrides):
  workdir = str(tmp_path_factory.mktemp("two_process") / "run")
  returncode, output = _run(workdir, workdir + ".launch.log", overrides)
  assert returncode == 0, output
  return workdir


def test_two_processes_train_one_run_on_disjoint_data(uninterrupted):
  workdir = uninterrupted
  for process in (0, 1):
    log = open(os.path.join(workdir, "logs", f"process_{process}.log")).read()
    assert f"fdjax preflight: process {process}/2 | devices 4 local, 8 global (cpu)" in log
    assert "batch 16 global, 8 per process" in log

  # Each process computed the evaluation losses itself: they agree with each other and with
  # what process 0 logged.
  eval_0, eval_1 = _probe(workdir, "eval", 0), _probe(workdir, "eval", 1)
  assert [r["step"] for r in eval_0] == [10, 20, 30]
  assert eval_0 == eval_1
  logged = [r["loss"] for r in read_metrics(workdir, "eval")]
  assert logged == [r["loss"] for r in eval_0]
  train_losses = [r["loss"] for r in read_metrics(workdir)]
  assert len(train_losses) == STEPS and train_losses[-1] < train_losses[0]

  # Every step each process read its own 8 examples. Each epoch (256 examples, 16 steps) is
  # split between the processes: no example read by both, every example read once.
  batches = [_probe(workdir, "data", process)[:STEPS] for process in (0, 1)]
  assert all(len(b) == STEPS and all(len(x["index"]) == 8 for x in b) for b in batches)
  for epoch in (slice(0, 16), slice(16, STEPS)):
    seen = [[i for x in b[epoch] for i in x["index"]] for b in batches]
    assert len(set(seen[0])) == len(seen[0]) and len(set(seen[1])) == len(seen[1])
    assert not set(seen[0]) & set(seen[1])
  first_epoch = [i for b in batches for x in b[:16] for i in x["index"]]
  assert sorted(first_epoch) == list(range(256))

  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(STEPS)]
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    assert json.load(f)["step"] == STEPS


def test_killing_one_process_stops_the_other_with_a_report(tmp_path, overrides):
  workdir = str(tmp_path / "run")
  log_path = str(tmp_path / "launch.log")
  proc = _start(workdir, log_path, overrides)
  try:
    _wait_for_step(workdir, 2, proc)
    pids = {}
    for line in open(log_path):
      if line.startswith("fdjax launch local: process ") and " pid " in line:
        fields = line.split()
        pids[int(fields[4])] = int(fields[6].rstrip(","))
    os.kill(pids[1], signal.SIGKILL)
    returncode = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  output = open(log_path).read()
  assert returncode == 128 + signal.SIGKILL, output
  assert "process 1 of 2 failed first (killed by SIGKILL); the others were stopped" in output
  assert "process 0: stopped by the launcher (SIGTERM" in output
  with pytest.raises(ProcessLookupError):
    os.kill(pids[0], 0)
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))


def test_preempted_two_process_run_resumes_bit_identical(uninterrupted, tmp_path, overrides):
  workdir = str(tmp_path / "run")
  log_path = str(tmp_path / "launch.log")
  proc = _start(workdir, log_path, overrides)
  try:
    _wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)  # The launcher passes it on to both processes.
    returncode = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  output = open(log_path).read()
  assert returncode == 0, output
  assert "preempted: saved checkpoint at step" in output
  stopped = int(output.split("preempted: saved checkpoint at step ")[1].split()[0])
  assert 3 <= stopped < STEPS
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(stopped)]

  returncode, output = _run(workdir, log_path, overrides)
  assert returncode == 0, output
  assert f"resumed from checkpoint at step {stopped}" in output
  step, resumed = _params(workdir)
  reference_step, reference = _params(uninterrupted)
  assert step == reference_step == STEPS
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)
