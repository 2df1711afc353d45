"""`fdjax.sweep`: building points, running a sweep of the tiny task, and ranking it in a report."""

import csv
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, subprocess_env
from PIL import Image

from fdjax import config as config_lib
from fdjax import sweep

SWEEP_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch", "sweep_tiny.py")


def test_product_and_zip_build_override_dicts():
  assert sweep.product(**{"optim.lr": [1, 2]}, seed=[0, 1]) == [
    {"optim.lr": 1, "seed": 0},
    {"optim.lr": 1, "seed": 1},
    {"optim.lr": 2, "seed": 0},
    {"optim.lr": 2, "seed": 1},
  ]
  assert sweep.zip_(**{"optim.lr": [1, 2], "optim.warmup_steps": [0, 10]}) == [
    {"optim.lr": 1, "optim.warmup_steps": 0},
    {"optim.lr": 2, "optim.warmup_steps": 10},
  ]
  nested = sweep.product(sweep.zip_(a=[1, 2], b=[3, 4]), seed=[0, 1])
  assert nested[1] == {"a": 1, "b": 3, "seed": 1} and len(nested) == 4
  with pytest.raises(ValueError, match="needs axes of one length"):
    sweep.zip_(a=[1, 2], b=[1])
  with pytest.raises(ValueError, match="'a' is set by two axes"):
    sweep.product(sweep.zip_(a=[1]), a=[2])


def test_point_values_survive_the_command_line():
  config = config_lib.load_config(TINY)
  values = {
    "optim.lr": 3e-4,
    "seed": 3,
    "optim.optimizer": "sgd",
    "data.shuffle": False,
    "optim.freeze": ["^encoder/"],
  }
  args = [f"--config.{k}={sweep.format_value(v)}" for k, v in values.items()]
  parsed = config_lib.load_config(TINY, args)
  assert parsed.optim.lr == 3e-4 and parsed.seed == 3 and parsed.optim.optimizer == "sgd"
  assert parsed.data.shuffle is False and parsed.optim.freeze == ("^encoder/",)
  assert config.optim.lr != parsed.optim.lr
  assert sweep.point_name(3, {"optim.lr": 0.001, "seed": 1}) == "003-lr=0.001-seed=1"
  assert sweep.point_name(0, {"a.x": 1, "b.x": 2}) == "000-a.x=1-b.x=2"
  assert sweep.point_name(1, {"optim.freeze": ("a/b",)}) == "001-freeze=__a_b___"


def test_plan_rejects_a_point_with_an_unknown_key(tmp_path):
  bad = tmp_path / "bad_sweep.py"
  bad.write_text(
    f"from fdjax.config import load_config_module\n"
    f"get_config = load_config_module({TINY!r}).get_config\n"
    "def get_sweep():\n  return [{'optim.lr': 0.1}, {'optim.lrr': 0.1}]\n"
  )
  with pytest.raises(KeyError, match="sweep point 1 .*did you mean 'optim.lr'"):
    sweep.plan(str(bad))


def _fake_point(sweep_dir, point, loss, steps=4):
  workdir = os.path.join(sweep_dir, point.name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(1, steps + 1):
      f.write(json.dumps({"step": step, "split": "train", "loss": loss + 1 / step}) + "\n")
    f.write(json.dumps({"step": steps, "split": "eval", "loss": loss}) + "\n")
  if loss is not None:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": steps, "loss": loss, "accuracy": 1 - loss}, f)


def test_report_ranks_by_the_configured_metric_and_mode(tmp_path):
  points = [
    sweep.SweepPoint(i, sweep.point_name(i, o), o)
    for i, o in enumerate(sweep.product(**{"optim.lr": [0.1, 0.01]}, seed=[0, 1]))
  ]
  planned = sweep.Sweep(TINY, [], points, metric="loss", mode="min")
  sweep.write_sweep(planned, str(tmp_path))
  for point, loss in zip(points[:3], (0.5, 0.2, 0.9)):
    _fake_point(str(tmp_path), point, loss)
  result = sweep.report(str(tmp_path))
  assert result.ranking == [points[1].name, points[0].name, points[2].name]
  with open(result.csv_path) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == [*result.ranking, points[3].name]
  assert [r["rank"] for r in rows] == ["1", "2", "3", ""]
  assert rows[0]["optim.lr"] == "0.1" and rows[0]["seed"] == "1" and rows[0]["loss"] == "0.2"
  assert rows[3]["status"] == "not started"
  markdown = open(result.markdown_path).read()
  assert f"| 1 | {points[1].name} | 0.1 | 1 | 0.2 |" in markdown
  assert "3 of 4 points finished; ranked by final `loss`, lowest first." in markdown

  by_accuracy = sweep.report(str(tmp_path), metric="accuracy", mode="max")
  assert by_accuracy.ranking == result.ranking  # accuracy = 1 - loss


def test_four_point_sweep_runs_two_at_a_time_and_reports_the_ranking(tmp_path):
  sweep_dir = tmp_path / "sweep"
  command = [
    sys.executable, "-m", "fdjax.cli", "sweep", "--config", f"{SWEEP_CONFIG}:steps=6",
    "--workdir", str(sweep_dir), "--parallel", "2",
    "--config.log_every=1", "--config.eval_every=3", "--config.checkpoint.every=0",
    f"--config.compilation_cache_dir={tmp_path / 'xla_cache'}",
  ]  # fmt: skip
  env = subprocess_env()
  result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr

  planned = sweep.read_sweep(str(sweep_dir))
  assert len(planned.points) == 4 and planned.metric == "loss" and planned.mode == "min"
  # At most two points ran at once: the third started only after one of the first two ended.
  events = [line.split(": ", 2)[1:] for line in result.stdout.splitlines() if line.count(": ") >= 2]
  order = [(name, what.split()[0]) for name, what in events if name.startswith("00")]
  running, most = set(), 0
  for name, what in order:
    running = running | {name} if what == "started" else running - {name}
    most = max(most, len(running))
  assert most == 2, result.stdout

  final = {}
  for point in planned.points:
    with open(sweep_dir / point.name / "final_metrics.json") as f:
      final[point.name] = json.load(f)["loss"]
  expected = sorted(final, key=final.get)
  report = sweep.report(str(sweep_dir))
  assert report.ranking == expected
  # Without learning (lr 0) the loss stays at its start: those points rank last.
  assert {p.name for p in planned.points if p.overrides["optim.lr"] == 0.0} == set(expected[2:])
  with open(report.csv_path) as f:
    assert [r["point"] for r in csv.DictReader(f)] == expected
  assert open(report.markdown_path).read().count("| finished |") == 4
  names = sorted(os.path.basename(p) for p in report.plot_paths)
  assert names == ["loss_curves.png", "loss_vs_model.hidden.png", "loss_vs_optim.lr.png"]
  for path in report.plot_paths:
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size[0] > 300

  # Running the sweep again skips every finished point.
  again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count("finished before, skipped") == 4
  assert "started" not in again.stdout


def test_slurm_sweep_writes_one_job_array_of_the_unfinished_points(tmp_path):
  sweep_dir = tmp_path / "sweep"
  planned = sweep.plan(f"{SWEEP_CONFIG}:steps=6")
  sweep.write_sweep(planned, str(sweep_dir))
  _fake_point(str(sweep_dir), planned.points[1], 0.3)
  path, job_id = sweep.submit_slurm(
    planned, str(sweep_dir), parallel=2, dry_run=True, partition="cpu", time="0:10:00"
  )
  assert job_id is None
  script = open(path).read()
  assert "#SBATCH --array=0,2,3%2" in script
  for point in (planned.points[0], planned.points[2], planned.points[3]):
    assert f"--workdir {sweep_dir / point.name}" in script
  assert "--config.optim.lr=0.03 --config.model.hidden=16" in script
