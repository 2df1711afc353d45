"""Streaming real-time factor of the causal audio2mesh model; artifact vs in-process latency.

    PYTHONPATH=. python benchmarks/streaming.py                # FaceFormer size, CPU
    PYTHONPATH=. python benchmarks/streaming.py --chunk-frames 3,15,30 --runs 5

Prints one JSON line per measurement:

1. `stream_rtf`, per chunk size: a stream of `--chunks` chunks fed one by one (audio from the
   host, output waited for), through `stream_step` jitted in-process with the encoder layers
   unrolled (`jit`, see `fdjax.streaming.unrolled`), through the exported artifact loaded with
   `fdjax.export.load` (`artifact`), and jitted with the layers scanned as in training
   (`jit_scanned`, for reference), the three alternating chunk by chunk so that load from
   other processes falls on all alike. The real-time factor is compute
   time per second of audio: the median chunk latency divided by the chunk's duration (target
   below 0.1 on CPU); `best_*_rtf` use the fastest run's mean; `*_cpu_seconds_per_audio_second`
   counts CPU time of all threads instead of wall time. `artifact_over_jit` is the ratio of the
   median latencies (target at most 1.1).
2. `export_latency` for the audio2mesh `predict` (the non-causal config by default), from
   benchmarks/export_latency.py: artifact and `load` callable vs jit.

The model is `--config` (default: the VOCASET FaceFormer with wav2vec2-base shapes, causal,
its transformer at the 30 fps mesh frame rate; `--override=--config.model.encoder.fps=0
--override=--config.model.encoder.attention_window=50` puts it at the 50 Hz audio frame rate);
parameters are random (see `_init`): timings do not depend on their values. The machine's
load average is printed with every line, because the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import export_latency  # noqa: E402

from fdjax import config as config_lib  # noqa: E402
from fdjax import export, streaming  # noqa: E402
from fdjax.tasks import load_task  # noqa: E402

STREAM_CONFIG = "experiments/audio2mesh/vocaset.py:causal=True"
PREDICT_CONFIG = "experiments/audio2mesh/vocaset.py"


def _init(config):
  """The model and random parameters: a fresh init with every parameter perturbed.

  Unperturbed, the zero-initialised output layer of the decoder is an all-zero constant in an
  embedded-weights artifact, which XLA folds into a broadcast that it materialises at every
  decoded frame: the artifact would be timed on a case no trained model has.
  """
  import flax.linen as nn

  task = load_task(config.task)
  model = task.build_model(config)
  variables = jax.jit(model.init)(jax.random.key(config.seed), task.dummy_batch(config, 1))
  leaves, treedef = jax.tree.flatten(jax.device_get(nn.meta.unbox(variables["params"])))
  rng = np.random.default_rng(config.seed)
  leaves = [(x + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves]
  return task, model, jax.tree.unflatten(treedef, leaves)


def _machine() -> dict:
  return {**export_latency._machine(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def write_stream_artifact(config, task, model, params, chunk_frames: int, directory: str) -> None:
  """The artifact `fdjax export --batch 1` writes for a causal run with this chunk."""
  predict, input_specs = task.predict_fn(config, model)
  constraints = task.symbolic_constraints(config)
  functions = {}
  functions["predict"], weights = export.export_function(
    predict, input_specs, params, dims={"b": 1}, constraints=constraints
  )
  for name, (fn, specs) in streaming.export_functions(model, chunk_frames).items():
    functions[name], _ = export.export_function(fn, specs, params, dims={"b": 1})
  export.write_artifact(directory, functions, weights, constraints=constraints)


def stream_rtf(model, params, chunk_frames: int, chunks: int, runs: int, directory: str) -> dict:
  """Streams `chunks` chunks `runs` times through the jitted step and the loaded artifact."""
  chunk = streaming.geometry(model, chunk_frames)
  artifact_init = export.load(directory, "stream_init")
  artifact_step = export.load(directory, "stream_step")

  device_params = jax.device_put(params)
  init = jax.jit(lambda p, template, style: streaming.init(model, p, template, style))
  step = jax.jit(lambda p, state, audio: streaming.step(model, p, state, audio))
  # What an in-process server runs: the layers unrolled once, before jit (`streaming.unrolled`).
  unrolled_model, unrolled_params = streaming.unrolled(model, device_params)
  unrolled_step = jax.jit(lambda p, state, audio: streaming.step(unrolled_model, p, state, audio))
  rng = np.random.default_rng(0)
  template = rng.normal(0, 0.1, (1, model.decoder.num_vertices, 3)).astype(np.float32)
  style = np.zeros((1,), np.int32)
  audio = rng.standard_normal((16, 1, chunk.chunk_samples)).astype(np.float32)

  def jit_step(state, chunk_audio):
    return unrolled_step(unrolled_params, state, chunk_audio)

  def scanned_step(state, chunk_audio):
    return step(device_params, state, chunk_audio)

  def exported_step(state, chunk_audio):
    out = artifact_step(audio=chunk_audio, **state)
    return out["state"], out["vertices"]

  variants = {
    "jit": (jit_step, lambda: init(device_params, template, style)),
    "artifact": (exported_step, lambda: artifact_init(template=template, style=style)),
    "jit_scanned": (scanned_step, lambda: init(device_params, template, style)),
  }
  for fn, make_state in variants.values():  # compile and warm up
    state = make_state()
    for index in range(3):
      state, vertices = fn(state, audio[index])
      jax.block_until_ready(vertices)
  times = {name: [] for name in variants}
  cpu_times = {name: [] for name in variants}
  run_means = {name: [] for name in variants}
  for _ in range(runs):
    states = {name: make_state() for name, (_, make_state) in variants.items()}
    run_times = {name: [] for name in variants}
    for index in range(chunks):
      for name, (fn, _) in variants.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        states[name], vertices = fn(states[name], audio[index % len(audio)])
        jax.block_until_ready(vertices)
        run_times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - start_cpu)
    for name in variants:
      times[name] += run_times[name]
      run_means[name].append(float(np.mean(run_times[name])))
  median = {name: float(np.median(t)) for name, t in times.items()}
  # CPU seconds (all threads) per chunk: what the stream costs the machine, less sensitive to
  # other processes' load than wall time.
  cpu = {name: float(np.median(t)) for name, t in cpu_times.items()}
  return {
    "benchmark": "stream_rtf",
    "chunk_frames": chunk.chunk_frames,
    "chunk_samples": chunk.chunk_samples,
    "chunk_ms": round(chunk.seconds * 1e3, 2),
    "chunks_per_run": chunks,
    "runs": runs,
    "state_bytes": streaming.state_bytes(states["jit"]),
    "jit_ms": round(median["jit"] * 1e3, 3),
    "artifact_ms": round(median["artifact"] * 1e3, 3),
    "jit_p90_ms": round(float(np.percentile(times["jit"], 90)) * 1e3, 3),
    "artifact_p90_ms": round(float(np.percentile(times["artifact"], 90)) * 1e3, 3),
    "jit_rtf": round(median["jit"] / chunk.seconds, 4),
    "artifact_rtf": round(median["artifact"] / chunk.seconds, 4),
    "best_jit_rtf": round(min(run_means["jit"]) / chunk.seconds, 4),
    "best_artifact_rtf": round(min(run_means["artifact"]) / chunk.seconds, 4),
    "jit_cpu_seconds_per_audio_second": round(cpu["jit"] / chunk.seconds, 4),
    "artifact_cpu_seconds_per_audio_second": round(cpu["artifact"] / chunk.seconds, 4),
    "artifact_over_jit": round(median["artifact"] / median["jit"], 3),
    "jit_scanned_ms": round(median["jit_scanned"] * 1e3, 3),
    "jit_scanned_rtf": round(median["jit_scanned"] / chunk.seconds, 4),
    **_describe(model),
    **_machine(),
  }


def _describe(model) -> dict:
  encoder, decoder = model.encoder, model.decoder
  return {
    "encoder": f"wav2vec2 L{encoder.num_hidden_layers} D{encoder.hidden_size} "
    f"conv{encoder.conv_dim[0]}",
    "attention_window": encoder.attention_window,
    # Transformer frames per second: the mesh frame rate when resampled, else the audio's.
    "transformer_fps": encoder.fps or encoder.sample_rate / encoder.hop,
    "decoder": f"FaceFormer d{decoder.d_model} V{decoder.num_vertices}",
    "cache_window": decoder.cache_window,
  }


def predict_latency(spec: str, batch: int, frames: int, iters: int, directory: str) -> dict:
  config = config_lib.load_config(spec)
  task, model, params = _init(config)
  _, input_specs = task.predict_fn(config, model)
  metadata = dict(task.export_metadata(config))
  inputs = export_latency._inputs(input_specs, metadata, batch, frames)
  if "template" in inputs:
    inputs["template"] *= 0.1
  result = export_latency.measure_latency(config, task, model, params, inputs, directory, iters)
  return {**result, "config": spec, "load_average": _machine()["load_average"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=STREAM_CONFIG, help="causal audio2mesh config")
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    help="a --config.key=value override of the causal config (repeatable), e.g. "
    "--override=--config.model.encoder.fps=0 for the transformer at the audio frame rate",
  )
  parser.add_argument("--chunk-frames", default="3,15,30", help="comma-separated chunk sizes")
  parser.add_argument("--chunks", type=int, default=30, help="chunks per timed run")
  parser.add_argument("--runs", type=int, default=5, help="timed runs per chunk size")
  parser.add_argument("--predict-config", default=PREDICT_CONFIG, help="'' skips predict")
  parser.add_argument("--predict-batch", type=int, default=1, help="predict batch size")
  parser.add_argument("--predict-time", type=int, default=90, help="predict frames")
  parser.add_argument("--predict-iters", type=int, default=20, help="timed predict calls")
  args = parser.parse_args(argv)

  config = config_lib.load_config(args.config, args.override)
  task, model, params = _init(config)
  for chunk_frames in (int(x) for x in args.chunk_frames.split(",")):
    with tempfile.TemporaryDirectory() as directory:
      write_stream_artifact(config, task, model, params, chunk_frames, directory)
      result = stream_rtf(model, params, chunk_frames, args.chunks, args.runs, directory)
      print(json.dumps({**result, "config": args.config, "overrides": args.override}), flush=True)
  if args.predict_config:
    with tempfile.TemporaryDirectory() as directory:
      result = predict_latency(
        args.predict_config,
        args.predict_batch,
        args.predict_time,
        args.predict_iters,
        directory,
      )
      print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
