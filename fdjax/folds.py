"""Cross-validation: run the k folds of an experiment and summarise them (mean +/- std).

`fdjax train --config C --workdir W --folds all` (or `--folds 1,3`) lands here. Fold k runs
as an ordinary training run in `W/fold<k>` with `config.data.fold = k` (so each fold resumes,
checkpoints and evaluates on its own); a fold whose `final_metrics.json` exists is finished
and skipped. When every requested fold is finished, `W/folds_summary.json` and
`W/folds_summary.md` give each evaluation metric per fold and its mean and standard deviation
over folds (`fdjax.metrics.classification.fold_summary`, population std); for single-label
tasks the confusion matrices of the folds are summed into `W/folds_confusion_matrix.png`.

DFEW and MAFW have 5 folds, BP4D and DISFA 3 (`config.data.num_folds`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from fdjax.metrics import classification

SUMMARY_JSON = "folds_summary.json"
SUMMARY_MD = "folds_summary.md"
FINAL_METRICS = "final_metrics.json"


def parse_folds(spec: str | Sequence[int], num_folds: int) -> list[int]:
  """Fold numbers (1-based) from `"all"`, `"1,2,3"` or a sequence, checked against `num_folds`."""
  if num_folds < 1:
    raise ValueError(
      "this experiment has no cross-validation folds (config.data.num_folds is "
      f"{num_folds}); train it without --folds"
    )
  if isinstance(spec, str):
    if spec.strip() == "all":
      return list(range(1, num_folds + 1))
    try:
      folds = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
      raise ValueError(
        f"--folds {spec!r}: expected 'all' or fold numbers such as '1,2,3'"
      ) from None
  else:
    folds = [int(k) for k in spec]
  if not folds:
    raise ValueError(f"--folds {spec!r} names no fold")
  bad = [k for k in folds if not 1 <= k <= num_folds]
  if bad:
    raise ValueError(f"--folds: fold(s) {bad} outside 1..{num_folds}")
  return sorted(set(folds))


def fold_workdir(workdir: str, fold: int) -> str:
  return os.path.join(workdir, f"fold{fold}")


def fold_config(config: Any, workdir: str, fold: int) -> ml_collections.FrozenConfigDict:
  """`config` for one fold: `data.fold` set and its own workdir."""
  if "fold" not in config.data:
    raise ValueError("config.data has no `fold`: this experiment is not cross-validated")
  unfrozen = ml_collections.ConfigDict(
    config.as_configdict() if hasattr(config, "as_configdict") else config
  )
  unfrozen.data.fold = fold
  unfrozen.workdir = fold_workdir(workdir, fold)
  return ml_collections.FrozenConfigDict(unfrozen)


def read_final_metrics(workdir: str) -> dict | None:
  path = os.path.join(workdir, FINAL_METRICS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _evaluation_metrics(final: dict) -> dict:
  """The evaluation part of a run's final metrics (training logs and the step left out)."""
  return {k: v for k, v in final.items() if k != "step" and not k.startswith("train_")}


def summarize(workdir: str, folds: Sequence[int], class_names: Sequence[str] | None = None) -> dict:
  """Writes `folds_summary.json`/`.md` (and the summed confusion PNG) for finished `folds`.

  Returns the summary: `{"folds": [...], "per_fold": {k: metrics}, "metrics": {name: {"mean",
  "std", "per_fold"}}}`.
  """
  per_fold = {}
  for k in folds:
    final = read_final_metrics(fold_workdir(workdir, k))
    if final is None:
      raise FileNotFoundError(
        f"fold {k} is not finished: no {FINAL_METRICS} in {fold_workdir(workdir, k)}"
      )
    per_fold[k] = _evaluation_metrics(final)
  stats = classification.fold_summary([per_fold[k] for k in folds])
  summary = {
    "folds": list(folds),
    "per_fold": {str(k): {n: v for n, v in m.items() if n in stats} for k, m in per_fold.items()},
    "metrics": stats,
  }
  matrices = [per_fold[k].get("confusion_matrix") for k in folds]
  if class_names and all(m is not None for m in matrices):
    total = np.sum([np.asarray(m, np.int64) for m in matrices], axis=0)
    summary["confusion_matrix"] = total.tolist()
    classification.save_confusion_png(
      total,
      list(class_names),
      os.path.join(workdir, "folds_confusion_matrix.png"),
      title=f"folds {','.join(map(str, folds))} summed",
    )
  with open(os.path.join(workdir, SUMMARY_JSON), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, SUMMARY_MD), "w") as f:
    f.write(summary_markdown(summary))
  return summary


def _number(value: float) -> str:
  if isinstance(value, float) and math.isnan(value):
    return "nan"
  if float(value).is_integer() and abs(value) >= 1:
    return str(int(value))
  return f"{value:.4f}"


def summary_markdown(summary: dict) -> str:
  """A Markdown table: one row per metric, one column per fold, then mean +/- std."""
  folds = summary["folds"]
  lines = [
    f"# Cross-validation summary ({len(folds)} folds)",
    "",
    "| metric | " + " | ".join(f"fold {k}" for k in folds) + " | mean ± std |",
    "|---|" + "---|" * len(folds) + "---|",
  ]
  for name, stats in summary["metrics"].items():
    cells = [_number(v) for v in stats["per_fold"]]
    lines.append(
      f"| {name} | " + " | ".join(cells) + f" | {stats['mean']:.4f} ± {stats['std']:.4f} |"
    )
  lines += ["", "Standard deviation over folds with ddof=0 (population)."]
  return "\n".join(lines) + "\n"


def run_folds(config: Any, workdir: str, folds: str | Sequence[int]) -> int:
  """Trains the requested folds one after another, then writes the summary.

  Returns the process exit status: 0 when done (or preempted: rerun the same command to
  resume), 1 when a fold failed with a non-finite or restore error, 2 for a bad `--folds`.
  """
  from fdjax import trainer
  from fdjax.checkpoint import CheckpointRestoreError
  from fdjax.tasks import load_task

  try:
    selected = parse_folds(folds, int(config.data.get("num_folds", 0)))
  except ValueError as e:
    print(f"fdjax train: {e}", file=sys.stderr)
    return 2
  for k in selected:
    directory = fold_workdir(workdir, k)
    if read_final_metrics(directory) is not None:
      print(f"fold {k}: finished earlier ({directory}), skipped", flush=True)
      continue
    print(f"fold {k} of {selected}: training in {directory}", flush=True)
    try:
      result = trainer.train_and_evaluate(fold_config(config, workdir, k), directory)
    except (trainer.NonFiniteError, CheckpointRestoreError) as e:
      print(f"fdjax train: fold {k}: {e}", file=sys.stderr)
      return 1
    if result.preempted:
      print(f"fdjax train: preempted in fold {k} at step {result.step}; rerun to resume")
      return 0
  import jax

  if jax.process_index() == 0:
    task = load_task(config.task)
    names = task.export_metadata(config).get("class_names")
    summary = summarize(workdir, selected, names)
    print(summary_markdown(summary), flush=True)
    print(f"wrote {os.path.join(workdir, SUMMARY_MD)} and {SUMMARY_JSON}", flush=True)
  return 0
