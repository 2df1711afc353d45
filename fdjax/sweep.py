"""Ablation sweeps: many runs of one config that differ in a few overrides, and their report.

A config file defines the points with `get_sweep()`, a list of override dicts, built with
`product` and `zip_`:

    def get_sweep():
      schedules = sweep.zip_(**{"optim.lr": [1e-3, 3e-4], "optim.warmup_steps": [0, 100]})
      return sweep.product(schedules, seed=[0, 1])  # 4 points

`fdjax sweep --config C --workdir DIR [--launcher local|slurm] [--parallel K]` writes
`DIR/sweep.json` (the points and the metric that ranks them) and runs each point as
`fdjax train ... --workdir DIR/<point>`: locally, K at a time, or as one SLURM job array.
Points that already have `final_metrics.json` are skipped, so re-running a sweep finishes it.
`fdjax sweep report DIR` writes `report.md` and `report.csv` (final metrics per point, best
first by `config.sweep_metric` and `config.sweep_mode`) and `plots/`: the metric against each
swept hyper-parameter and the loss curves of all points overlaid (from `metrics.jsonl`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fdjax import config as config_lib

SWEEP_FILE = "sweep.json"
FINISHED_MARKER = "final_metrics.json"


def product(*sweeps: Sequence[Mapping[str, Any]], **axes: Sequence[Any]) -> list[dict]:
  """Every combination of the given axes.

  `product(**{"optim.lr": [1e-3, 1e-2]}, seed=[0, 1])` gives 4 points, the last axis varying
  fastest. A positional argument is an axis whose values are whole override dicts (e.g. a
  `zip_`), so sweeps compose.
  """
  choices = [list(s) for s in sweeps] + [[{key: v} for v in values] for key, values in axes.items()]
  for choice in choices:
    if not choice:
      raise ValueError("a sweep axis has no values")
  points = []
  for combination in itertools.product(*choices):
    point: dict[str, Any] = {}
    for part in combination:
      _merge(point, part)
    points.append(point)
  return points


def zip_(*sweeps: Sequence[Mapping[str, Any]], **axes: Sequence[Any]) -> list[dict]:
  """Axes varied together: the i-th point takes the i-th value of every axis.

  `zip_(**{"optim.lr": [1e-3, 1e-2], "optim.warmup_steps": [0, 100]})` gives 2 points. All axes
  must have the same length.
  """
  columns = [list(s) for s in sweeps] + [[{key: v} for v in values] for key, values in axes.items()]
  lengths = {len(c) for c in columns}
  if len(lengths) > 1:
    names = [f"#{i}" for i in range(len(sweeps))] + list(axes)
    raise ValueError(
      f"zip_ needs axes of one length; got {dict(zip(names, (len(c) for c in columns)))}"
    )
  points = []
  for row in zip(*columns):
    point: dict[str, Any] = {}
    for part in row:
      _merge(point, part)
    points.append(point)
  return points


def _merge(point: dict[str, Any], part: Mapping[str, Any]) -> None:
  for key, value in part.items():
    if key in point:
      raise ValueError(f"sweep key {key!r} is set by two axes")
    point[key] = value


@dataclasses.dataclass
class SweepPoint:
  """One run of a sweep."""

  index: int  # Position in `get_sweep()`.
  name: str  # Directory name under the sweep directory, e.g. `003-lr=0.001-seed=1`.
  overrides: dict[str, Any]  # Dotted config key -> value.


@dataclasses.dataclass
class Sweep:
  """A planned sweep: what `sweep.json` holds."""

  config: str  # Config spec `path.py[:arg]`, as given.
  overrides: list[str]  # `--config.x=v` overrides shared by every point.
  points: list[SweepPoint]  # The runs.
  metric: str  # Final metric that ranks the points.
  mode: str  # "min" or "max": which end of `metric` is best.

  def to_json(self) -> dict:
    return {
      "config": self.config,
      "overrides": self.overrides,
      "metric": self.metric,
      "mode": self.mode,
      "points": [dataclasses.asdict(p) for p in self.points],
    }

  @classmethod
  def from_json(cls, data: Mapping) -> Sweep:
    points = [SweepPoint(**p) for p in data["points"]]
    return cls(data["config"], list(data["overrides"]), points, data["metric"], data["mode"])


def format_value(value: Any) -> str:
  """A value as `fdjax train --config.key=<text>` parses it back (see `config._coerce`)."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def point_name(index: int, overrides: Mapping[str, Any]) -> str:
  """`003-lr=0.001-seed=1`: the index, then each override by its last key part."""
  short = [key.rsplit(".", 1)[-1] for key in overrides]
  parts = [f"{index:03d}"]
  for key, label in zip(overrides, short):
    label = key if short.count(label) > 1 else label
    parts.append(f"{label}={format_value(overrides[key])}")
  name = re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))
  return name[:120]


def load_points(config_spec: str) -> list[dict[str, Any]]:
  """The override dicts of the config file's `get_sweep()` (given `arg` if it takes one)."""
  path, _, arg = config_spec.partition(":")
  module = config_lib.load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise AttributeError(f"config file {path!r} defines no get_sweep(): nothing to sweep")
  takes_arg = bool(inspect.signature(module.get_sweep).parameters)
  points = module.get_sweep(arg or None) if takes_arg else module.get_sweep()
  if not isinstance(points, list | tuple) or not points:
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of override dicts")
  for i, point in enumerate(points):
    if not isinstance(point, Mapping):
      raise TypeError(f"{path}: get_sweep() point {i} is {type(point).__name__}, not a dict")
  return [dict(p) for p in points]


def plan(config_spec: str, overrides: Sequence[str] = ()) -> Sweep:
  """Loads the sweep and checks every point's overrides against the config before any runs."""
  points = load_points(config_spec)
  config = config_lib.load_config(config_spec, list(overrides))
  for i, point in enumerate(points):
    try:
      config_lib.load_config(config_spec, [*overrides, *_override_args(point)])
    except (KeyError, ValueError, TypeError) as e:
      reason = e.args[0] if e.args else e
      raise type(e)(f"sweep point {i} {point}: {reason}") from None
  if config.sweep_mode not in ("min", "max"):
    raise ValueError(f"config.sweep_mode must be 'min' or 'max', got {config.sweep_mode!r}")
  return Sweep(
    config=config_spec,
    overrides=list(overrides),
    points=[SweepPoint(i, point_name(i, p), p) for i, p in enumerate(points)],
    metric=config.sweep_metric,
    mode=config.sweep_mode,
  )


def _override_args(point: Mapping[str, Any]) -> list[str]:
  return [f"--config.{key}={format_value(value)}" for key, value in point.items()]


def train_command(sweep: Sweep, point: SweepPoint, workdir: str) -> list[str]:
  """`python -m fdjax.cli train --config C <shared overrides> <point overrides> --workdir W`."""
  return [
    sys.executable,
    "-m",
    "fdjax.cli",
    "train",
    "--config",
    sweep.config,
    *sweep.overrides,
    *_override_args(point.overrides),
    "--workdir",
    workdir,
  ]


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, FINISHED_MARKER))


def write_sweep(sweep: Sweep, sweep_dir: str) -> str:
  os.makedirs(sweep_dir, exist_ok=True)
  path = os.path.join(sweep_dir, SWEEP_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(sweep.to_json(), f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def read_sweep(sweep_dir: str) -> Sweep:
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {sweep_dir!r} is not a sweep directory")
  with open(path) as f:
    return Sweep.from_json(json.load(f))


def run_local(
  sweep: Sweep,
  sweep_dir: str,
  *,
  parallel: int = 1,
  launcher_prefix: Sequence[str] = (),
  env: dict[str, str] | None = None,
  poll_s: float = 0.2,
) -> dict[str, int | None]:
  """Runs the unfinished points on this host, `parallel` at a time.

  Args:
    sweep: the planned sweep.
    sweep_dir: its directory; point i runs in `sweep_dir/<name>` and logs to `train.log` there.
    parallel: how many points run at once.
    launcher_prefix: put before each train command, e.g. `python -m launch.local -n 2 --`.
    env: the runs' environment (default: this process's).
    poll_s: how often to check on running points.

  Returns:
    Point name -> exit status (None for points skipped because they had finished).
  """
  if parallel < 1:
    raise ValueError(f"--parallel must be at least 1, got {parallel}")
  statuses: dict[str, int | None] = {}
  pending = []
  for point in sweep.points:
    if is_finished(os.path.join(sweep_dir, point.name)):
      statuses[point.name] = None
      print(f"fdjax sweep: {point.name}: finished before, skipped", flush=True)
    else:
      pending.append(point)
  running: dict[str, tuple[subprocess.Popen, Any]] = {}
  while pending or running:
    while pending and len(running) < parallel:
      point = pending.pop(0)
      workdir = os.path.join(sweep_dir, point.name)
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, "train.log"), "a")
      command = [*launcher_prefix, *train_command(sweep, point, workdir)]
      proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
      )
      running[point.name] = (proc, log)
      print(f"fdjax sweep: {point.name}: started (pid {proc.pid})", flush=True)
    for name, (proc, log) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        del running[name]
        statuses[name] = proc.returncode
        outcome = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"fdjax sweep: {name}: {outcome}", flush=True)
    time.sleep(poll_s)
  return statuses


def submit_slurm(
  sweep: Sweep, sweep_dir: str, *, parallel: int | None, dry_run: bool, **options
) -> tuple[str | None, str | None]:
  """Submits the unfinished points as one SLURM job array.

  `options` are `launch.slurm.SlurmJob` fields (nodes, time, partition, ...). Returns the
  script's path and the job id; (path, None) for a dry run, (None, None) when all finished.
  """
  from launch import slurm

  todo = [p for p in sweep.points if not is_finished(os.path.join(sweep_dir, p.name))]
  if not todo:
    return None, None
  workdirs = {p.index: os.path.abspath(os.path.join(sweep_dir, p.name)) for p in todo}
  job = slurm.SlurmJob(
    commands={p.index: train_command(sweep, p, workdirs[p.index]) for p in todo},
    workdirs=workdirs,
    script_dir=os.path.abspath(os.path.join(sweep_dir, "slurm")),
    array_parallel=parallel,
    **options,
  )
  path = slurm.write_script(job)
  if dry_run:
    return path, None
  return path, slurm.submit(path)


@dataclasses.dataclass
class Report:
  """What `report` wrote and the ranking it found."""

  markdown_path: str  # report.md
  csv_path: str  # report.csv
  plot_paths: list[str]  # PNG files under plots/
  ranking: list[str]  # Names of the finished points, best first.


def report(sweep_dir: str, metric: str | None = None, mode: str | None = None) -> Report:
  """Writes the sweep's tables and plots (see the module docstring); returns where and the order.

  Args:
    sweep_dir: a directory written by `fdjax sweep`.
    metric, mode: rank by this final metric, "min" or "max" (default: the config's).
  """
  sweep = read_sweep(sweep_dir)
  metric = metric or sweep.metric
  mode = mode or sweep.mode
  if mode not in ("min", "max"):
    raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
  keys = list(dict.fromkeys(k for p in sweep.points for k in p.overrides))
  rows = [_row(sweep_dir, p) for p in sweep.points]
  ranked = [r for r in rows if _finite(r["metrics"].get(metric))]
  finished = [r for r in rows if r["status"] == "finished"]
  if finished and not ranked:
    names = sorted({k for r in finished for k in r["metrics"]})
    raise KeyError(f"no finished point has the final metric {metric!r}; they have {names}")
  ranked.sort(key=lambda r: r["metrics"][metric], reverse=(mode == "max"))
  unranked = [r for r in rows if r not in ranked]
  for rank, row in enumerate(ranked, start=1):
    row["rank"] = rank
  metric_names = sorted({k for r in rows for k in r["metrics"]} - {metric, "step"})
  metric_names = [metric, *(m for m in metric_names if not m.startswith("train_"))]
  header = ["rank", "point", *keys, *metric_names, "step", "status"]
  table = [
    [
      row.get("rank", ""),
      row["point"].name,
      *(
        format_value(row["point"].overrides[k]) if k in row["point"].overrides else "" for k in keys
      ),
      *(_cell(row["metrics"].get(m)) for m in metric_names),
      row["metrics"].get("step", row["last_step"] or ""),
      row["status"],
    ]
    for row in ranked + unranked
  ]

  csv_path = os.path.join(sweep_dir, "report.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(table)

  plot_paths = _plots(sweep_dir, sweep, rows, keys, metric, mode)
  markdown_path = os.path.join(sweep_dir, "report.md")
  best = "lowest" if mode == "min" else "highest"
  lines = [
    f"# Sweep report: {sweep.config}",
    "",
    f"{len(ranked)} of {len(rows)} points finished; ranked by final `{metric}`, {best} first.",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "|".join("---" for _ in header) + "|",
    *("| " + " | ".join(str(c) for c in row) + " |" for row in table),
    "",
    "## Plots",
    "",
    *(f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plot_paths),
    "",
  ]
  with open(markdown_path, "w") as f:
    f.write("\n".join(lines))
  return Report(markdown_path, csv_path, plot_paths, [r["point"].name for r in ranked])


def _row(sweep_dir: str, point: SweepPoint) -> dict:
  workdir = os.path.join(sweep_dir, point.name)
  final = os.path.join(workdir, FINISHED_MARKER)
  metrics: dict[str, Any] = {}
  if os.path.exists(final):
    with open(final) as f:
      metrics = json.load(f)
    status = "finished"
  elif os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    status = "unfinished"
  else:
    status = "not started"
  history = _history(workdir)
  last_step = max((r["step"] for r in history), default=None)
  return {
    "point": point,
    "metrics": metrics,
    "status": status,
    "history": history,
    "last_step": last_step,
  }


def _history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # A run killed mid-write leaves a partial last line.
  return rows


def _finite(value: Any) -> bool:
  return isinstance(value, int | float) and math.isfinite(value)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def _plots(sweep_dir, sweep, rows, keys, metric, mode) -> list[str]:
  # Figure without pyplot: no global backend state, renders with Agg wherever it runs.
  from matplotlib.figure import Figure

  plot_dir = os.path.join(sweep_dir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  paths = []
  finished = [r for r in rows if _finite(r["metrics"].get(metric))]
  best = None
  if finished:
    pick = min if mode == "min" else max
    best = pick(finished, key=lambda r: r["metrics"][metric])
  for key in keys:
    with_key = [r for r in finished if key in r["point"].overrides]
    if not with_key:
      continue
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    values = [r["point"].overrides[key] for r in with_key]
    ys = [r["metrics"][metric] for r in with_key]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric:
      xs = values
      positive = all(v > 0 for v in values)
      if positive and max(values) / min(values) >= 100:
        ax.set_xscale("log")
    else:
      labels = list(dict.fromkeys(format_value(v) for v in values))
      xs = [labels.index(format_value(v)) for v in values]
      ax.set_xticks(range(len(labels)), labels)
    ax.scatter(xs, ys, color="tab:blue")
    if best is not None and best in with_key:
      ax.scatter(
        [xs[with_key.index(best)]],
        [best["metrics"][metric]],
        color="tab:red",
        marker="*",
        s=150,
        label=f"best ({best['point'].name})",
        zorder=3,
      )
      ax.legend(fontsize=7)
    ax.set_xlabel(key)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{metric} vs {key}")
    path = os.path.join(plot_dir, f"{_file_safe(metric)}_vs_{_file_safe(key)}.png")
    fig.savefig(path, dpi=100)
    paths.append(path)

  curves = [(r["point"].name, r["history"]) for r in rows if r["history"]]
  if curves:
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for split, ax in zip(("train", "eval"), axes):
      for name, history in curves:
        points = [
          (h["step"], h["loss"])
          for h in history
          if h.get("split") == split and _finite(h.get("loss"))
        ]
        if points:
          ax.plot(*zip(*points), label=name, marker="." if split == "eval" else None)
      ax.set_xlabel("step")
      ax.set_ylabel(f"{split} loss")
      ax.set_title(f"{split} loss")
      if ax.has_data():
        ax.legend(fontsize=6)
    path = os.path.join(plot_dir, "loss_curves.png")
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths


def _file_safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _run_parser() -> argparse.ArgumentParser:
  from launch import slurm

  parser = argparse.ArgumentParser(
    prog="fdjax sweep",
    description="Run every point of a config's get_sweep(); `fdjax sweep report DIR` ranks them.",
  )
  parser.add_argument("--config", required=True, help="path/to/config.py[:key=value,...]")
  parser.add_argument("--workdir", required=True, help="sweep directory; one subdirectory a point")
  parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
  parser.add_argument("--parallel", type=int, help="points at once (local default 1)")
  parser.add_argument(
    "--processes-per-point", type=int, default=1, help="local: joined processes per point"
  )
  parser.add_argument("--dry-run", action="store_true", help="slurm: write the script only")
  slurm.add_resource_arguments(parser)
  return parser


def _report_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="fdjax sweep report", description="Rank a sweep's points.")
  parser.add_argument("sweep_dir", help="directory written by `fdjax sweep`")
  parser.add_argument("--metric", help="final metric to rank by (default: config.sweep_metric)")
  parser.add_argument("--mode", choices=("min", "max"), help="default: config.sweep_mode")
  return parser


def sweep_main(argv: Sequence[str]) -> int:
  """`fdjax sweep --config C --workdir DIR [...]` or `fdjax sweep report DIR`."""
  argv = list(argv)
  if argv[:1] == ["report"]:
    args = _report_parser().parse_args(argv[1:])
    result = report(args.sweep_dir, args.metric, args.mode)
    print(f"fdjax sweep report: {result.markdown_path}, {result.csv_path}")
    if result.ranking:
      print(f"best: {result.ranking[0]}")
    return 0

  parser = _run_parser()
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)}")
  sweep = plan(args.config, rest)
  sweep_dir = args.workdir
  write_sweep(sweep, sweep_dir)
  print(
    f"fdjax sweep: {len(sweep.points)} points in {sweep_dir}, ranked by {sweep.metric} "
    f"({sweep.mode})",
    flush=True,
  )

  if args.launcher == "slurm":
    from launch import slurm

    path, job_id = submit_slurm(
      sweep,
      sweep_dir,
      parallel=args.parallel,
      dry_run=args.dry_run,
      job_name="fdjax-sweep",
      **slurm.resource_options(args),
    )
    if path is None:
      print("fdjax sweep: every point has finished; nothing to submit")
    elif job_id is None:
      print(f"fdjax sweep: wrote {path} (dry run, not submitted)")
    else:
      print(job_id)
      print(f"fdjax sweep: submitted job array {job_id} ({path})", file=sys.stderr)
    return 0

  prefix: list[str] = []
  if args.processes_per_point > 1:
    prefix = [sys.executable, "-m", "launch.local", "-n", str(args.processes_per_point)]
    if args.cpu_devices:
      prefix += ["--cpu-devices", str(args.cpu_devices)]
    prefix += ["--quiet", "--"]
  statuses = run_local(sweep, sweep_dir, parallel=args.parallel or 1, launcher_prefix=prefix)
  failed = [name for name, status in statuses.items() if status not in (None, 0)]
  result = report(sweep_dir)
  print(f"fdjax sweep: report in {result.markdown_path}")
  if failed:
    print(
      f"fdjax sweep: {len(failed)} points failed: {', '.join(failed)} (see their train.log)",
      file=sys.stderr,
    )
    return 1
  return 0
