"""The timing loop and the common JSON fields of the video training-step benchmarks.

`benchmarks/video_step.py` (expression models) and `benchmarks/mae_step.py` (masked video
pretraining) time the framework's own jitted train step the same way: build it from a config
with `fdjax.trainer.build_train_step`, feed one random batch already on the devices (so the
input pipeline is not measured), and take the median over the timed steps after the untimed
(compiling) ones. Each benchmark adds its own model fields to `common_fields`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from hostinfo import cpu_model


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags both benchmarks share: frames, batch, timed and untimed steps, compute dtype."""
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
  parser.add_argument(
    "--compute_dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU/TPU)"
  )


def time_train_step(
  config: Any,
  steps: int,
  warmup: int,
  fill: Callable[[dict, np.random.Generator], None],
  count: Callable[[Any], dict],
) -> tuple[Any, dict, list[float], dict]:
  """(model, counts, timed step seconds, last metrics) of `config`'s train step.

  `fill(host_batch, rng)` replaces the dummy batch's zeros with random content in place;
  `count(params)` returns the parameter counts to report.
  """
  from fdjax import sharding as sharding_lib
  from fdjax import trainer
  from fdjax.tasks import load_task

  task = load_task(config.task)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  sharding_lib.check_batch_size(config.batch_size, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model, state, _, train_step = trainer.build_train_step(config, task, mesh, rules)
    counts = count(state.params)
    host = task.dummy_batch(config, config.batch_size)
    fill(host, np.random.default_rng(0))
    sharding = sharding_lib.batch_sharding(mesh, rules)
    device_batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
    times = []
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = train_step(state, device_batch)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - start)
  return model, counts, times, metrics


def common_fields(config: Any, times: list[float], flops: float, metrics: dict) -> dict:
  """Device, precision, step time, clips/s, achieved TFLOP/s, MFU, loss, host and date."""
  from fdjax import step as step_lib
  from fdjax import trainer

  batch = config.batch_size
  step_time = float(np.median(times))
  achieved = flops * batch / step_time
  peak = trainer.peak_flops_per_device()
  return {
    "batch": batch,
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "compute_dtype": str(np.dtype(step_lib.resolve_compute_dtype(config.precision.compute_dtype))),
    "remat": bool(config.model.remat),
    "steps_timed": len(times),
    "step_time_s": round(step_time, 4),
    "step_time_min_s": round(float(np.min(times)), 4),
    "clips_per_s": round(batch / step_time, 3),
    "flops_per_clip": flops,
    "achieved_tflops_per_s": round(achieved / 1e12, 4),
    "mfu": None if peak is None else round(achieved / (peak * jax.device_count()), 4),
    "loss": float(metrics["loss"]),
    "host": cpu_model(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
  }
