"""Where training metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files.

Only process 0 writes. The JSONL file has one object per event, `{"step", "split", ...}`;
TensorBoard files (written by tensorboardX, readable by `tensorboard --logdir` with no
TensorFlow installed) get one scalar per metric, tagged `<split>/<name>`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricWriter:
  """Appends scalar metrics to JSONL and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: _to_scalar(v) for k, v in metrics.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    for name, value in scalars.items():
      if isinstance(value, int | float):
        self._tb.add_scalar(f"{split}/{name}", value, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_scalar(value: Any) -> Any:
  if hasattr(value, "item") and getattr(value, "size", 2) == 1:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value
