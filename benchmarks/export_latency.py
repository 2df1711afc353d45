"""Export latency and a load test of the reference server; one JSON line per measurement.

    PYTHONPATH=tests:. python benchmarks/export_latency.py --config tests/configs/tiny.py

1. `export_latency`: per-call latency (median over `--iters` calls, after warm-up) of a task's
   predict function jitted in-process, of the exported artifact called with jax alone
   (`jax.jit(exported.call)`), and of `fdjax.export.load`'s callable (which also checks the
   inputs); the ratios artifact / in-process are the figures to watch (target: <= 1.1).
2. `serve_load`: `fdjax serve` started in a subprocess on loopback, `--clients` concurrent
   clients (threads with keep-alive connections) sending `--requests` JSON requests in all;
   throughput, p50/p99 latency (over all answers), the count of 503 answers (queue full, by
   design when clients outnumber the queue) and of errors (anything else but 200).

Parameters come from `--workdir` (the latest checkpoint) or, without it, from a fresh init:
latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from fdjax import config as config_lib
from fdjax import export


def _params(config, workdir):
  from fdjax import trainer

  if workdir:
    task, model, params, _ = trainer.restore_params(config, workdir)
    return task, model, jax.device_get(params)
  import flax.linen as nn

  from fdjax.tasks import load_task

  task = load_task(config.task)
  model = task.build_model(config)
  rngs = {"params": jax.random.key(config.seed), "dropout": jax.random.key(config.seed + 1)}
  variables = task.init_fn(model, rngs, task.dummy_batch(config, 1))
  return task, model, jax.device_get(nn.meta.unbox(variables["params"]))


def _inputs(task, config, input_specs, batch, time_frames):
  """Random inputs, the dims the task fixes by --batch and --time (if it has them) set."""
  declared = task.export_dims(config)
  flags = {"--batch": batch, "--time": time_frames}
  sizes = {dim.symbol: flags[dim.flag] for dim in declared if dim.flag in flags}
  dims = export.concrete_dims(declared, sizes, input_specs)
  structs = export.abstract_inputs(input_specs, dims)
  rng = np.random.default_rng(0)
  inputs = {}
  for name, struct in structs.items():
    dtype = np.dtype(struct.dtype)
    if dtype.kind == "f":
      inputs[name] = rng.normal(size=struct.shape).astype(dtype)
    elif dtype.kind == "u":
      inputs[name] = rng.integers(0, 256, size=struct.shape).astype(dtype)
    else:
      inputs[name] = np.zeros(struct.shape, dtype)
  return inputs


def _interleaved_seconds(calls: dict, iters: int) -> dict[str, tuple[float, float]]:
  """Median and p90 seconds per call of each variant, timed in turn so that load from other
  processes falls on all of them alike."""
  for call in calls.values():
    jax.block_until_ready(call())
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(iters):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: (float(np.median(t)), float(np.percentile(t, 90))) for name, t in times.items()}


def _machine():
  device = jax.devices()[0]
  return {
    "machine": platform.node(),
    "cpu_count": os.cpu_count(),
    "backend": device.platform,
    "device_kind": device.device_kind,
    "jax": jax.__version__,
  }


def measure_latency(config, task, model, params, inputs, directory, iters) -> dict:
  predict, input_specs = task.predict_fn(config, model)
  constraints = list(task.symbolic_constraints(config))
  exported, weights = export.export_function(predict, input_specs, params, constraints=constraints)
  metadata = dict(task.export_metadata(config))
  export.write_artifact(
    directory, {"predict": exported}, weights, metadata=metadata, constraints=constraints
  )

  device_params = jax.device_put(params)
  in_process = jax.jit(predict)
  with open(os.path.join(directory, "model.jaxexport"), "rb") as f:
    artifact = jax.jit(jax.export.deserialize(bytearray(f.read())).call)
  loaded = export.load(directory)
  timings = _interleaved_seconds(
    {
      "jit": lambda: in_process(device_params, **inputs),
      "artifact": lambda: artifact(**inputs),
      "loader": lambda: loaded(**inputs),
    },
    iters,
  )
  (jit_s, jit_p90), (artifact_s, artifact_p90), (loaded_s, loaded_p90) = timings.values()
  return {
    "benchmark": "export_latency",
    "task": config.task,
    "inputs": {k: list(v.shape) for k, v in inputs.items()},
    "iters": iters,
    "jit_ms": round(jit_s * 1e3, 4),
    "artifact_ms": round(artifact_s * 1e3, 4),
    "loader_ms": round(loaded_s * 1e3, 4),
    "jit_p90_ms": round(jit_p90 * 1e3, 4),
    "artifact_p90_ms": round(artifact_p90 * 1e3, 4),
    "loader_p90_ms": round(loaded_p90 * 1e3, 4),
    "artifact_over_jit": round(artifact_s / jit_s, 3),
    "loader_over_jit": round(loaded_s / jit_s, 3),
    **_machine(),
  }


def _client(port, bodies, latencies, counts, lock):
  """Sends `bodies` on one keep-alive connection; counts answers: ok, busy (503), errors."""
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  for body in bodies:
    start = time.perf_counter()
    try:
      connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
      response = connection.getresponse()
      response.read()
      outcome = {200: "ok", 503: "busy"}.get(response.status, "errors")
    except (OSError, http.client.HTTPException):
      outcome = "errors"
      connection.close()
      connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    elapsed = time.perf_counter() - start
    with lock:
      latencies.append(elapsed)
      counts[outcome] += 1
  connection.close()


def load_test(directory, inputs, clients, requests, queue_size) -> dict:
  command = [sys.executable, "-m", "fdjax.cli", "serve", directory, "--port", "0"]
  command += ["--queue-size", str(queue_size)]
  server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  try:
    line = server.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
      raise RuntimeError(f"fdjax serve did not start: {line!r}")
    port = int(match.group(1))
    body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
    # Warm-up compiles the artifact for this shape inside the server.
    _client(port, [body] * 3, [], collections.Counter(), threading.Lock())
    latencies, counts, lock = [], collections.Counter(), threading.Lock()
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    threads = [
      threading.Thread(target=_client, args=(port, [body] * n, latencies, counts, lock))
      for n in shares
    ]
    start = time.perf_counter()
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    wall = time.perf_counter() - start
  finally:
    server.terminate()
    server.wait(timeout=30)
  return {
    "benchmark": "serve_load",
    "clients": clients,
    "requests": requests,
    "request_bytes": len(body),
    "queue_size": queue_size,
    "throughput_rps": round(requests / wall, 1),
    "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
    "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3),
    "busy_503": counts["busy"],
    "errors": counts["errors"],
    "wall_s": round(wall, 2),
    **_machine(),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="path/to/config.py[:args]")
  parser.add_argument("--workdir", default=None, help="restore parameters from this run")
  parser.add_argument("--batch", type=int, default=8, help="batch size of the latency inputs")
  parser.add_argument("--time", type=int, default=90, help="frames, for inputs with t or s")
  parser.add_argument("--iters", type=int, default=500, help="timed calls per variant")
  parser.add_argument("--clients", type=int, default=8, help="concurrent clients (load test)")
  parser.add_argument("--requests", type=int, default=2000, help="requests in the load test")
  parser.add_argument("--serve-batch", type=int, default=1, help="batch size per request")
  parser.add_argument("--queue-size", type=int, default=16, help="the server's queue bound")
  args = parser.parse_args(argv)

  config = config_lib.load_config(args.config)
  task, model, params = _params(config, args.workdir)
  _, input_specs = task.predict_fn(config, model)
  with tempfile.TemporaryDirectory() as directory:
    inputs = _inputs(task, config, input_specs, args.batch, args.time)
    print(json.dumps(measure_latency(config, task, model, params, inputs, directory, args.iters)))
    inputs = _inputs(task, config, input_specs, args.serve_batch, args.time)
    result = load_test(directory, inputs, args.clients, args.requests, args.queue_size)
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
