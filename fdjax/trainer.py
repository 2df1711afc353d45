"""The training loop: data -> step -> log -> eval -> checkpoint, with preemption and resume.

`train_and_evaluate(config, workdir)` is the whole job behind `fdjax train`. It builds the mesh,
the task's model and the sharded state, resumes from the latest checkpoint in the workdir if
there is one (state and data-iterator position), and runs the jitted step until
`config.total_steps`. Every `log_every` steps it logs loss, gradient/parameter/update norms,
learning rate, step time, host wait for data, examples/s and MFU (when the task counts FLOPs);
every `eval_every` it runs the task's evaluation; checkpoints follow `config.checkpoint`.

Evaluation sees the EMA of the parameters when the run keeps one (`config.ema.decay > 0`), and
the model's mutable collections (BatchNorm statistics, ...) when it has them: a task's
`evaluate(config, model, params, *, mesh, rules, workdir, step)` then also gets
`collections={name: tree}`.

SIGTERM (preemption) finishes the current step, saves, and returns normally, so the process
exits 0 and the scheduler can restart it on the same workdir. Non-finite steps are skipped by
the step itself; `max_consecutive_nonfinite` of them in a row save the (unchanged) state and
stop with `NonFiniteError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from fdjax import checkpoint as checkpoint_lib
from fdjax import config as config_lib
from fdjax import distributed, pretrained
from fdjax import optim as optim_lib
from fdjax import sharding as sharding_lib
from fdjax import state as state_lib
from fdjax import step as step_lib
from fdjax.metric_writer import MetricWriter
from fdjax.tasks import load_task, task_loss_fn

# Peak dense bf16 FLOP/s per device, for MFU. Devices not listed get no MFU.
PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
}


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


@dataclasses.dataclass
class TrainResult:
  """What a finished (or preempted) run reports."""

  step: int
  preempted: bool
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  state: Any = None


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks after each step (single process)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: finishing this step, then saving and exiting")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _to_global(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This process's numpy batch -> global arrays sharded over the batch mesh axes."""
  arrays = {
    k: v for k, v in batch.items() if isinstance(v, dict) or np.asarray(v).dtype.kind not in "OSUV"
  }  # nested dicts of arrays (e.g. `flame`) go too
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), arrays)


def setup_jax(config: Any) -> None:
  """Process-wide JAX settings the config asks for.

  `compilation_cache_dir` turns the persistent compilation cache on at that directory, or off
  when empty, also after an earlier run in this process turned it on (JAX keeps its first answer
  to "is the cache used" until `reset_cache`)."""
  cache_dir = os.path.expanduser(config.compilation_cache_dir) or None
  wanted = (cache_dir, cache_dir is not None)
  current = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  if wanted != current:
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_enable_compilation_cache", cache_dir is not None)
  if config.precision.matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", config.precision.matmul_precision)


def train_and_evaluate(config: Any, workdir: str) -> TrainResult:
  """Trains `config` in `workdir`, resuming if it holds checkpoints. See the module docstring."""
  setup_jax(config)
  task = load_task(config.task)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  sharding_lib.check_batch_size(config.batch_size, mesh, rules, config.grad_accum_steps)
  if jax.process_index() == 0:
    config_lib.save_config(config, workdir)
  distributed.preflight(config, mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return _run(config, workdir, task, mesh, rules)


def _model_and_optimizer(config, task):
  model = task.build_model(config)
  tx, schedule = optim_lib.make_optimizer(config.optim, config.total_steps)
  return model, tx, schedule


PARAMS_CHOICES = ("raw", "ema")


def has_ema(config: Any) -> bool:
  """Whether the run keeps an EMA of its parameters."""
  return config.ema.decay > 0


def select_params(config: Any, choice: str | None) -> str:
  """`raw` or `ema` for `--params` (None: `ema` when the run keeps an EMA, else `raw`)."""
  if choice is None:
    return "ema" if has_ema(config) else "raw"
  if choice not in PARAMS_CHOICES:
    raise ValueError(f"--params {choice!r}: expected one of {', '.join(PARAMS_CHOICES)}")
  if choice == "ema" and not has_ema(config):
    raise ValueError(
      "--params ema: this run keeps no EMA of its parameters (config.ema.decay = "
      f"{config.ema.decay}); use --params raw"
    )
  return choice


def eval_params(state: state_lib.TrainState) -> Any:
  """The parameters evaluation uses: the EMA when the state keeps one, else the raw ones."""
  return state.params if state.ema is None else state.ema


def restore_variables(
  config: Any, workdir: str, step: int | None = None, mesh=None, *, params: str | None = None
):
  """Restores a run's parameters and mutable collections (latest checkpoint, or `step`).

  `params`: `raw`, `ema`, or None for the run's default (`select_params`). Returns
  `(task, model, params, collections, step)`, sharded on `mesh` (default: from config);
  `collections` is None for a model without mutable collections.
  """
  choice = select_params(config, params)
  setup_jax(config)
  task = load_task(config.task)
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model, tx, _ = _model_and_optimizer(config, task)
    abstract, _ = state_lib.state_shardings(
      mesh, rules, model, tx, task.dummy_batch(config, 1), task.init_fn, ema=has_ema(config)
    )
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    try:
      step, state = checkpointer.restore(abstract, None, step=step)
    finally:
      checkpointer.close()
  chosen = state.ema if choice == "ema" else state.params
  return task, model, chosen, state.collections, step


def restore_params(
  config: Any, workdir: str, step: int | None = None, mesh=None, *, params: str | None = None
):
  """Restores the parameters saved in `workdir` (latest, or `step`).

  `params`: `raw`, `ema`, or None for the run's default (`select_params`). Returns
  `(task, model, params, step)`; `params` are sharded on `mesh` (default: from config).
  """
  task, model, chosen, _, step = restore_variables(config, workdir, step, mesh, params=params)
  return task, model, chosen, step


def evaluate_checkpoint(
  config: Any, workdir: str, step: int | None = None, *, params: str | None = None
) -> dict[str, float]:
  """Restores the parameters saved in `workdir` (latest, or `step`) and runs the evaluation.

  `params`: `raw`, `ema`, or None for the run's default (`select_params`).
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  task, model, chosen, collections, step = restore_variables(
    config, workdir, step, mesh, params=params
  )
  writer = MetricWriter(workdir)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return _evaluate(task, config, model, chosen, mesh, rules, workdir, step, writer, collections)
  finally:
    writer.close()


def build_train_step(config: Any, task: Any, mesh, rules) -> tuple[Any, Any, Any, Callable]:
  """`(model, state, shardings, train_step)`: the model, a fresh train state (seed
  `config.seed`) and the jitted step of `config`, as training builds them; benchmarks time the
  same step. Call it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
  model, tx, schedule = _model_and_optimizer(config, task)
  dummy = task.dummy_batch(config, 1)
  init_fn = task.init_fn
  state, shardings = state_lib.create_train_state(
    jax.random.key(config.seed), mesh, rules, model, tx, dummy, init_fn, ema=has_ema(config)
  )
  train_step = step_lib.jit_train_step(
    mesh,
    rules,
    shardings,
    model=model,
    loss_fn=task_loss_fn(task, config),
    tx=tx,
    schedule=schedule,
    trainable=optim_lib.trainable_mask(state.params, config.optim.freeze),
    grad_accum_steps=config.grad_accum_steps,
    compute_dtype=step_lib.resolve_compute_dtype(config.precision.compute_dtype),
    ema_decay=config.ema.decay,
    ema_start_step=config.ema.start_step,
    norms_every=config.log_every,
    last_step=config.total_steps,
  )
  return model, state, shardings, train_step


def _run(config, workdir, task, mesh, rules) -> TrainResult:
  model, state, shardings, train_step = build_train_step(config, task, mesh, rules)
  trainable, total = optim_lib.count_params(state.params, config.optim.freeze)
  logging.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)
  data = task.train_data(
    config, process_index=jax.process_index(), process_count=jax.process_count()
  )
  data_iter = iter(data)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  reuses_weights = task.has("load_pretrained") or config.model.get("init_from", "")
  if checkpointer.latest_step() is None and reuses_weights:
    # The task's own weight keys first, then `config.model.init_from` (fdjax.pretrained).
    loaded = task.load_pretrained(config, jax.device_get(state.params))
    loaded = pretrained.apply_init_from(config, loaded)
    params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), loaded, state.params)
    # The EMA starts from the loaded weights too (a copy: the step donates both).
    ema = None if state.ema is None else jax.tree.map(lambda p: p.copy(), params)
    state = state.replace(params=params, ema=ema)
  if checkpointer.latest_step() is not None:
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    del state  # Free the fresh parameters before restoring.
    restored_step, state = checkpointer.restore(abstract, data_iter)
    logging.info("resumed from step %d (%s)", restored_step, checkpointer.path(restored_step))
    print(f"resumed from checkpoint at step {restored_step}", flush=True)

  writer = MetricWriter(workdir)
  writer.write(0, "params", {"trainable": trainable, "total": total})
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  flops = task.flops_per_example(config) if task.has("flops_per_example") else None
  peak = peak_flops_per_device()
  step = int(jax.device_get(state.step))
  start_step = step
  train_metrics: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  window_start, window_steps, host_wait = time.perf_counter(), 0, 0.0
  run_start = time.perf_counter()
  preempted = False

  with _SigtermFlag() as sigterm:
    while step < config.total_steps:
      t0 = time.perf_counter()
      batch = _to_global(next(data_iter), batch_sharding)
      host_wait += time.perf_counter() - t0
      with jax.transfer_guard(config.transfer_guard):
        state, metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      # One scalar read per step: the non-finite policy must act on the very step it fires.
      consecutive = int(jax.device_get(metrics["nonfinite_consecutive"]))
      stop = consecutive >= config.max_consecutive_nonfinite
      if stop or step % config.log_every == 0 or step == config.total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / window_steps
        metrics.update(
          step_time_s=step_time,
          host_wait_s=host_wait / window_steps,
          examples_per_s=config.batch_size / step_time,
          nonfinite_total=int(jax.device_get(state.nonfinite_total)),
        )
        if flops and peak:
          metrics["mfu"] = flops * config.batch_size / step_time / (peak * jax.device_count())
        writer.write(step, "train", metrics)
        train_metrics = metrics
        rate = (step - start_step) / (time.perf_counter() - run_start)
        eta = (config.total_steps - step) / max(rate, 1e-9)
        if jax.process_index() == 0:
          print(
            f"step {step}/{config.total_steps} | {1 / step_time:.2f} step/s | "
            f"ETA {_duration(eta)} | loss {metrics['loss']:.5g}",
            flush=True,
          )
        window_start, window_steps, host_wait = time.perf_counter(), 0, 0.0

      if stop:
        checkpointer.save(step, state, data_iter, force=True)
        checkpointer.close()
        writer.close()
        raise NonFiniteError(
          f"stopping at step {step}: {consecutive} non-finite losses or gradients in a row "
          f"(steps {step - consecutive + 1}-{step}); their updates were skipped, and the state "
          f"before them is saved in {checkpointer.path(step)}"
        )

      if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
        eval_metrics = _evaluate(
          task,
          config,
          model,
          eval_params(state),
          mesh,
          rules,
          workdir,
          step,
          writer,
          state.collections,
        )

      preempted = (
        checkpointer.reached_preemption(step) if jax.process_count() > 1 else sigterm.received
      )
      if preempted:
        checkpointer.save(step, state, data_iter, force=True)
        print(f"preempted: saved checkpoint at step {step}", flush=True)
        break
      if config.checkpoint.every and step % config.checkpoint.every == 0:
        checkpointer.save(step, state, data_iter)

  if not preempted:
    if checkpointer.latest_step() != step:
      checkpointer.save(step, state, data_iter, force=True)
    eval_metrics = _evaluate(
      task, config, model, eval_params(state), mesh, rules, workdir, step, writer, state.collections
    )
    if jax.process_index() == 0:
      final = {"step": step, **{f"train_{k}": v for k, v in train_metrics.items()}}
      final.update(eval_metrics)
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(final, f, indent=2, sort_keys=True)
  checkpointer.close()
  writer.close()
  return TrainResult(step, preempted, train_metrics, eval_metrics, state)


def _evaluate(
  task, config, model, params, mesh, rules, workdir, step, writer, collections=None
) -> dict:
  if not task.has("evaluate"):
    return {}
  t0 = time.perf_counter()
  # `collections=` only for a model that has them, so tasks without them keep their signature.
  extra = {} if collections is None else {"collections": collections}
  metrics = task.evaluate(
    config, model, params, mesh=mesh, rules=rules, workdir=workdir, step=step, **extra
  )
  metrics = {k: (float(v) if np.ndim(v) == 0 else v) for k, v in metrics.items()}
  writer.write(step, "eval", {**metrics, "eval_time_s": time.perf_counter() - t0})
  writer.flush()
  if jax.process_index() == 0:
    shown = ", ".join(f"{k} {v:.5g}" for k, v in metrics.items() if isinstance(v, float))
    print(f"eval at step {step}: {shown}", flush=True)
  return metrics


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"
