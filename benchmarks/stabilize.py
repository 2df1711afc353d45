"""Face stabilisation: train the stabiliser and print its held-out errors beside Procrustes.

    python benchmarks/stabilize.py                                  # the experiment as it is
    python benchmarks/stabilize.py --config experiments/stabilize/head_pairs.py:size=tiny,steps=100

Trains `--config` (default `experiments/stabilize/head_pairs.py`) in a fresh `--workdir`
(default: a temporary directory), then prints one JSON line: per system (the model, Procrustes on
all vertices, Procrustes on the rigid region) the mean rotation error (deg), translation error
(mm) and skull vertex error (mm, over the named rigid region) on the held-out pairs, the ratios
of the baselines' skull vertex errors to the model's, how far the rigid region moves non-rigidly
within a pair, the training steps and wall-clock seconds (training, which includes the final
evaluation), the machine and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import machine  # noqa: E402

from fdjax import config as config_lib  # noqa: E402
from fdjax import trainer  # noqa: E402
from fdjax.tasks import stabilize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/stabilize/head_pairs.py")
  parser.add_argument("--workdir", default=None, help="fresh run directory (default: temporary)")
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="stabilize_benchmark_")
  config = config_lib.load_config(args.config)
  start = time.monotonic()
  with contextlib.redirect_stdout(sys.stderr):  # the run's log and table: stdout is the JSON line
    trainer.train_and_evaluate(config, workdir)
  seconds = time.monotonic() - start
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    metrics = json.load(f)
  systems = {
    system: {
      metric: round(metrics[metric if system == "model" else f"{system}/{metric}"], 4)
      for metric in stabilize.METRICS
    }
    for system in stabilize.SYSTEMS
  }
  model_error = systems["model"]["skull_vertex_error_mm"]
  line = {
    "benchmark": "stabilize",
    "config": args.config,
    "steps": config.total_steps,
    "batch_size": config.batch_size,
    "held_out_pairs": int(metrics["num_pairs"]),
    "skull_region": stabilize.rigid_region(config).name,
    "systems": systems,
    "procrustes_all_over_model": round(
      systems["procrustes_all"]["skull_vertex_error_mm"] / model_error, 2
    ),
    "procrustes_rigid_over_model": round(
      systems["procrustes_rigid"]["skull_vertex_error_mm"] / model_error, 2
    ),
    "rigid_region_motion_mm": round(metrics["rigid_region_motion_mm"], 4),
    "train_and_eval_s": round(seconds, 1),
    "machine": machine(),
    "date": datetime.date.today().isoformat(),
  }
  print(json.dumps(line), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
