"""Where the audio2mesh training step spends its time: a `jax.profiler` trace, op by op.

    python benchmarks/profile_audio2mesh_step.py --frames 60
    python benchmarks/profile_audio2mesh_step.py --frames 300 --training autoregressive --depth 4

Compiles the trainer's step exactly as `audio2mesh_step.py` does (batch 1, one sequence of
`--frames` frames, random weights), runs it twice under `jax.profiler.trace`, and sums each
executed op's time by the source it came from: the op names in the trace are matched to the
compiled HLO's `op_name` metadata (`jvp(...)` is the forward, `transpose(jvp(...))` the
backward, `cond/...` the optimizer update inside the non-finite guard), with layer indices
merged and the path cut at `--depth` components. Prints the step time and the `--top` sources;
the trace itself stays in `--trace_dir` for TensorBoard or Perfetto. On XLA's CPU backend the
op times add up to about the step's wall time (ops run one after another, each on the
backend's threads).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import audio2mesh_step as bench  # noqa: E402

from fdjax import config as config_lib  # noqa: E402
from fdjax import trainer  # noqa: E402


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its `op_name` metadata (the JAX source path)."""
  pattern = re.compile(r"^\s*%([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"", re.M)
  return {m.group(1): m.group(2) for m in pattern.finditer(hlo_text)}


def source_key(op_name: str, depth: int) -> str:
  name = re.sub(r"layers_\d+", "layers_N", op_name).replace("jit(train_step)/", "")
  return "/".join(name.split("/")[:depth])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=bench.DEFAULT_CONFIG)
  parser.add_argument("--frames", type=int, default=60, help="frames of the one sequence")
  parser.add_argument("--training", default="teacher_forcing", help="the decoder's training mode")
  parser.add_argument("--depth", type=int, default=99, help="source path components kept")
  parser.add_argument("--top", type=int, default=40, help="sources printed")
  parser.add_argument("--trace_dir", default="", help="where the trace goes (default: a temp dir)")
  parser.add_argument("--override", action="append", default=[], help="--config.x=y overrides")
  args = parser.parse_args(argv)
  overrides = [
    "--config.batch_size=1",
    f"--config.data.window_frames={args.frames}",
    f"--config.model.decoder.training={args.training}",
    *args.override,
  ]
  config = config_lib.load_config(args.config, overrides)
  trainer.setup_jax(config)
  state, step, mesh, rules = bench._build_step(config)
  batch = bench.synthetic_batch(config, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def run():
      holder["state"], metrics = compiled(holder["state"], batch)
      return float(metrics["loss"])

    run()
    times = []
    for _ in range(3):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="fdjax-profile-")
    jax.profiler.start_trace(trace_dir)
    for _ in range(2):
      run()
    jax.profiler.stop_trace()
  sources = op_sources(compiled.as_text())
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  totals: collections.Counter = collections.Counter()
  for event in json.load(gzip.open(path))["traceEvents"]:
    if event.get("ph") == "X" and event.get("name") in sources:
      totals[source_key(sources[event["name"]], args.depth)] += event["dur"] / 2e6  # s per step
  print(
    f"step: {np.median(times):.3f} s (median of 3); op time per step: {sum(totals.values()):.3f} s"
  )
  for name, seconds in totals.most_common(args.top):
    print(f"{seconds:8.3f} s  {name}")
  print(f"trace: {trace_dir}")


if __name__ == "__main__":
  main()
