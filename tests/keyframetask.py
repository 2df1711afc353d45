"""A test task with its own export dims: `k` keyframes fixed by `--keyframes`, and `g` gains
derived from it (two per keyframe). It trains like tests/tinytask.py; only its predict function
differs: `predict(params, x [b, k, 8], gains [b, g]) -> [b, k, 4]`, tinytask's model applied to
each keyframe and scaled by the mean gain.
"""

from __future__ import annotations

import jax.numpy as jnp
import tinytask

from fdjax.tasks import BATCH_DIM, ExportDim

build_model = tinytask.build_model
dummy_batch = tinytask.dummy_batch
loss_fn = tinytask.loss_fn
train_data = tinytask.train_data


def predict_fn(config, model):
  def predict(params, x, gains):
    b, k, _ = x.shape
    y = model.apply({"params": params}, {"x": x.reshape(b * k, tinytask.IN)})[0]  # [b*k, 4]
    return y.reshape(b, k, tinytask.OUT) * jnp.mean(gains, axis=1)[:, None, None]

  return predict, {"x": (f"b, k, {tinytask.IN}", "float32"), "gains": ("b, g", "float32")}


def export_dims(config):
  return [
    BATCH_DIM,
    ExportDim("k", "--keyframes", "keyframes per sequence, or a dim name (default: symbolic)"),
    ExportDim(
      "g", help="gains, two per keyframe", derive=lambda sizes: 2 * sizes["k"], needs=("k",)
    ),
  ]


def symbolic_constraints(config):
  return ["g >= k"]
