"""The tests' tiny task (tests/tinytask.py) plus a record of what each process did.

Multi-process tests need to see every process, but only process 0 writes metrics. This task
trains exactly like `tinytask` and also appends, per process, the example indices of every
batch it reads to `<workdir>/probe/data_process_<i>.jsonl` and the evaluation losses it
computes to `<workdir>/probe/eval_process_<i>.jsonl`. Select it with `--config.task=probetask`
and `tests/launch` on PYTHONPATH.
"""

from __future__ import annotations

import json
import os

import jax
import tinytask

build_model = tinytask.build_model
dummy_batch = tinytask.dummy_batch
loss_fn = tinytask.loss_fn
predict_fn = tinytask.predict_fn
flops_per_example = tinytask.flops_per_example


def _append(workdir: str, name: str, record: dict) -> None:
  directory = os.path.join(workdir, "probe")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{name}_process_{jax.process_index()}.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


def train_data(config, *, process_index, process_count):
  dataset = tinytask.train_data(config, process_index=process_index, process_count=process_count)

  def record(batch):
    _append(config.workdir, "data", {"index": [int(i) for i in batch["index"]]})
    return batch

  return dataset.map(record)


def evaluate(config, model, params, *, mesh, rules, workdir, step):
  metrics = tinytask.evaluate(
    config, model, params, mesh=mesh, rules=rules, workdir=workdir, step=step
  )
  _append(workdir, "eval", {"step": int(step), **metrics})
  return metrics
