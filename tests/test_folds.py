"""Cross-validation runner: fold parsing, per-fold runs and skipping, the mean +/- std summary."""

import json
import os

import numpy as np
import pytest
from helpers import TINY

from fdjax import cli, folds
from fdjax import config as config_lib

FOLD_CONFIG = f"""
import importlib.util

spec = importlib.util.spec_from_file_location("tiny_config", {TINY!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def get_config(arg=None):
  c = tiny.get_config("steps=4")
  c.eval_every = 0
  c.checkpoint.every = 0
  c.data.fold = 1
  c.data.num_folds = 3
  return c
"""


def test_parse_folds_all_lists_and_errors():
  assert folds.parse_folds("all", 5) == [1, 2, 3, 4, 5]
  assert folds.parse_folds("3,1", 3) == [1, 3]
  assert folds.parse_folds([2], 3) == [2]
  with pytest.raises(ValueError, match=r"outside 1..3"):
    folds.parse_folds("1,4", 3)
  with pytest.raises(ValueError, match="no cross-validation folds"):
    folds.parse_folds("all", 0)
  with pytest.raises(ValueError, match="expected 'all'"):
    folds.parse_folds("first", 3)


def _write_final(workdir, fold, metrics):
  directory = folds.fold_workdir(workdir, fold)
  os.makedirs(directory)
  with open(os.path.join(directory, "final_metrics.json"), "w") as f:
    json.dump({"step": 10, "train_loss": 0.5, **metrics}, f)


def test_summary_has_per_fold_values_and_mean_std(tmp_path):
  workdir = str(tmp_path)
  uar, war = [0.5, 0.7, 0.9], [0.6, 0.6, 0.9]
  matrices = [[[3, 1], [0, 2]], [[2, 2], [1, 1]], [[4, 0], [0, 2]]]
  for k in range(3):
    _write_final(
      workdir,
      k + 1,
      {"uar": uar[k], "war": war[k], "num_examples": 6, "confusion_matrix": matrices[k]},
    )
  summary = folds.summarize(workdir, [1, 2, 3], class_names=["a", "b"])
  stats = summary["metrics"]
  assert set(stats) == {"uar", "war", "num_examples"}  # training logs and the matrix left out
  assert stats["uar"]["per_fold"] == uar
  assert stats["uar"]["mean"] == pytest.approx(np.mean(uar))
  assert stats["uar"]["std"] == pytest.approx(np.std(uar))
  assert stats["war"]["std"] == pytest.approx(np.std(war))
  assert summary["confusion_matrix"] == [[9, 3], [1, 5]]
  with open(tmp_path / "folds_summary.json") as f:
    assert json.load(f)["metrics"]["uar"]["mean"] == pytest.approx(0.7)
  markdown = (tmp_path / "folds_summary.md").read_text()
  assert "| metric | fold 1 | fold 2 | fold 3 | mean ± std |" in markdown
  assert f"| uar | 0.5000 | 0.7000 | 0.9000 | 0.7000 ± {np.std(uar):.4f} |" in markdown
  assert (tmp_path / "folds_confusion_matrix.png").stat().st_size > 0


def test_summary_refuses_an_unfinished_fold(tmp_path):
  _write_final(str(tmp_path), 1, {"uar": 0.5})
  with pytest.raises(FileNotFoundError, match="fold 2 is not finished"):
    folds.summarize(str(tmp_path), [1, 2])


def test_train_folds_runs_each_fold_in_its_workdir_and_skips_finished_ones(tmp_path, capsys):
  config_path = tmp_path / "fold_config.py"
  config_path.write_text(FOLD_CONFIG)
  workdir = str(tmp_path / "run")
  argv = ["train", "--config", str(config_path), "--workdir", workdir, "--folds", "1,2"]
  assert cli.main(argv) == 0
  for k in (1, 2):
    saved = config_lib.load_json_config(os.path.join(workdir, f"fold{k}", "config.json"))
    assert saved.data.fold == k
    assert saved.workdir == os.path.join(workdir, f"fold{k}")
    assert os.path.exists(os.path.join(workdir, f"fold{k}", "final_metrics.json"))
  assert not os.path.exists(os.path.join(workdir, "fold3"))
  with open(os.path.join(workdir, "folds_summary.json")) as f:
    summary = json.load(f)
  assert summary["folds"] == [1, 2]
  assert len(summary["metrics"]["loss"]["per_fold"]) == 2
  assert os.path.exists(os.path.join(workdir, "folds_summary.md"))

  before = os.path.getmtime(os.path.join(workdir, "fold1", "final_metrics.json"))
  capsys.readouterr()
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "fold 1: finished earlier" in out and "fold 2: finished earlier" in out
  assert os.path.getmtime(os.path.join(workdir, "fold1", "final_metrics.json")) == before


def test_train_folds_rejects_folds_the_experiment_lacks(tmp_path, capsys):
  config_path = tmp_path / "fold_config.py"
  config_path.write_text(FOLD_CONFIG)
  argv = ["train", "--config", str(config_path), "--workdir", str(tmp_path / "w"), "--folds", "4"]
  assert cli.main(argv) == 2
  assert "outside 1..3" in capsys.readouterr().err
