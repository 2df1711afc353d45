"""The training loop end to end: resume after SIGKILL, resharding, SIGTERM, non-finite stop."""

import os
import signal
import time

import jax
import numpy as np
import pytest
from helpers import TINY, read_metrics, run_fdjax, start_fdjax

from fdjax import checkpoint as checkpoint_lib
from fdjax import config as config_lib
from fdjax import trainer


def _config(*overrides, spec=TINY):
  return config_lib.load_config(spec, list(overrides))


def _wait_for(predicate, timeout=120, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process exited early with {proc.returncode}")
    time.sleep(0.05)
  raise AssertionError("timed out")


def _committed_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _restore_params(workdir, like_state, step=None):
  config = _config()
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state
  )
  restored_step, state = checkpointer.restore(abstract, None, step=step)
  checkpointer.close()
  return restored_step, state


def test_sigkill_then_restart_is_bit_identical_to_uninterrupted(tmp_path):
  args = ["steps=24", "--config.data.delay_s=0.004", "--config.checkpoint.every=6"]
  spec, overrides = TINY + ":" + args[0], args[1:]
  reference = trainer.train_and_evaluate(_config(*overrides, spec=spec), str(tmp_path / "ref"))

  workdir = str(tmp_path / "killed")
  log = str(tmp_path / "killed.log")
  proc = start_fdjax("train", "--config", spec, "--workdir", workdir, *overrides, log_path=log)
  _wait_for(lambda: any(s >= 6 for s in _committed_steps(workdir)), proc=proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(_committed_steps(workdir)) < 24, "the run finished before it was killed"

  result = run_fdjax("train", "--config", spec, "--workdir", workdir, *overrides)
  assert result.returncode == 0, result.stderr
  assert "resumed from checkpoint at step" in result.stdout
  step, resumed = _restore_params(workdir, reference.state)
  assert step == 24
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(reference.state.params),
    jax.device_get(resumed.params),
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(reference.state.opt_state),
    jax.device_get(resumed.opt_state),
  )


def test_checkpoint_from_8_device_mesh_resumes_on_2x4_mesh(tmp_path):
  common = [
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.log_every=1",
    "--config.eval_every=0",
  ]
  reference_dir = str(tmp_path / "reference")
  trainer.train_and_evaluate(_config(*common, spec=TINY + ":steps=12"), reference_dir)

  workdir = str(tmp_path / "resharded")
  trainer.train_and_evaluate(
    _config(*common, "--config.mesh.data=8", spec=TINY + ":steps=6"), workdir
  )
  result = trainer.train_and_evaluate(
    _config(*common, "--config.mesh.data=2", "--config.mesh.fsdp=4", spec=TINY + ":steps=12"),
    workdir,
  )
  kernel = result.state.params["encoder"]["dense"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  expected = {r["step"]: r["loss"] for r in read_metrics(reference_dir)}
  resumed = {r["step"]: r["loss"] for r in read_metrics(workdir) if r["step"] > 6}
  assert sorted(resumed) == list(range(7, 13))
  for step, loss in resumed.items():
    assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])


def test_sigterm_saves_exits_zero_and_restart_continues(tmp_path):
  spec = TINY + ":steps=400"
  overrides = ["--config.data.delay_s=0.004", "--config.checkpoint.every=0", "--config.log_every=1"]
  workdir = str(tmp_path / "run")
  log = str(tmp_path / "run.log")
  proc = start_fdjax("train", "--config", spec, "--workdir", workdir, *overrides, log_path=log)
  _wait_for(lambda: os.path.exists(log) and "step 3/400" in open(log).read(), proc=proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(log).read()
  output = open(log).read()
  assert "preempted: saved checkpoint at step" in output
  stopped = int(output.split("preempted: saved checkpoint at step ")[1].split()[0])
  assert 3 <= stopped < 400
  assert _committed_steps(workdir) == [stopped]

  result = run_fdjax(
    "train", "--config", TINY + ":steps=" + str(stopped + 3), "--workdir", workdir, *overrides
  )
  assert result.returncode == 0, result.stderr
  assert f"resumed from checkpoint at step {stopped}" in result.stdout
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == list(range(1, stopped + 4))


def test_consecutive_nan_batches_stop_the_run_naming_the_step(tmp_path):
  # Without shuffling, batch k holds examples 16k..16k+15: steps 3 onwards see NaNs.
  config = _config(
    "--config.data.shuffle=False",
    ("data.nan_indices", tuple(range(32, 256))),
    "--config.max_consecutive_nonfinite=3",
    "--config.log_every=1",
    spec=TINY + ":steps=40",
  )
  with pytest.raises(trainer.NonFiniteError, match="stopping at step 5: 3 non-finite") as e:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert "steps 3-5" in str(e.value)
  rows = read_metrics(str(tmp_path))
  assert [r["nonfinite"] for r in rows] == [0, 0, 1, 1, 1]
  assert rows[-1]["nonfinite_total"] == 3
  assert _committed_steps(str(tmp_path))[-1] == 5
