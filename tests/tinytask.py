"""A tiny regression task built on the task contract, for testing the framework itself.

Inputs `x` [B, 8] come from a fixed random dataset; targets `y` [B, 4] are a fixed linear map of
`x` plus noise, so the loss can go down. The model has an `encoder` and a `head`, so tests can
freeze one of them, and its parameters carry logical axis names, so tests can check shardings.
`data.nan_indices` turns chosen examples into NaNs to test the non-finite guard, and
`data.delay_s` slows each example down so tests can interrupt a run between checkpoints.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline
from fdjax.tasks import BATCH_DIM

IN, OUT = 8, 4


class Encoder(nn.Module):
  hidden: int  # Hidden width.

  @nn.compact
  def __call__(self, x):
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
    h = nn.Dense(self.hidden, kernel_init=kernel_init, bias_init=bias_init, name="dense")(x)
    return nn.gelu(h)


class TinyModel(nn.Module):
  hidden: int = 16  # Hidden width.
  dropout: float = 0.0  # Dropout rate on the hidden layer.

  @nn.compact
  def __call__(self, batch, train: bool = False):
    h = Encoder(self.hidden, name="encoder")(batch["x"])
    h = nn.with_logical_constraint(h, ("batch", "mlp"))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    y = nn.Dense(OUT, kernel_init=kernel_init, bias_init=bias_init, name="head")(h)
    return y, {"hidden": h}


def make_examples(num: int, seed: int, nan_indices=()) -> list[dict]:
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(1234).normal(size=(IN, OUT)).astype(np.float32)
  x = rng.normal(size=(num, IN)).astype(np.float32)
  y = (np.tanh(x) @ w + 0.01 * rng.normal(size=(num, OUT))).astype(np.float32)
  x[list(nan_indices)] = np.nan
  return [{"x": x[i], "y": y[i], "index": np.int32(i)} for i in range(num)]


def build_model(config):
  return TinyModel(**config.model)


def dummy_batch(config, batch_size):
  return {"x": np.zeros((batch_size, IN), np.float32), "y": np.zeros((batch_size, OUT), np.float32)}


def loss_fn(model, params, batch, rng, train):
  pred, _ = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  loss = jnp.mean(jnp.square(pred - batch["y"]))
  return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


def _slow(delay_s):
  def transform(example, rng):
    time.sleep(delay_s)
    return example

  return transform


def train_data(config, *, process_index, process_count):
  examples = make_examples(config.data.num_examples, seed=0, nan_indices=config.data.nan_indices)
  return pipeline.train_dataset(
    examples,
    _slow(config.data.delay_s) if config.data.delay_s else None,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    shuffle=config.data.shuffle,
  )


def evaluate(config, model, params, *, mesh, rules, workdir, step):
  examples = make_examples(64, seed=1)
  batch = {k: np.stack([e[k] for e in examples]) for k in ("x", "y")}
  pred, _ = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  return {"loss": float(jnp.mean(jnp.square(pred - batch["y"])))}


def predict_fn(config, model):
  def predict(params, x):
    return model.apply({"params": params}, {"x": x})[0]

  return predict, {"x": (f"b, {IN}", "float32")}


def export_dims(config):
  return [BATCH_DIM]


def flops_per_example(config):
  return 6.0 * (IN * config.model.hidden + config.model.hidden * OUT)
