"""A tiny regression task with BatchNorm, for testing mutable collections and EMA in the trainer.

The data and evaluation set are tinytask's (`x` [B, 8] -> `y` [B, 4]); the model puts a
BatchNorm between the encoder and the head, so its `batch_stats` collection lives in the train
state. The loss follows the contract for a state with collections: it takes `collections=`,
and in training returns the updated collections in `aux["collections"]`; `evaluate` takes
`collections=` beside `params`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tinytask


class BatchNormModel(nn.Module):
  hidden: int = 16  # Hidden width.
  dropout: float = 0.0  # Dropout rate on the hidden layer.
  momentum: float = 0.9  # BatchNorm running-statistics momentum.

  @nn.compact
  def __call__(self, batch, train: bool = False):
    h = tinytask.Encoder(hidden=self.hidden, name="encoder")(batch["x"])  # [B, hidden]
    h = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.momentum,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      name="norm",
    )(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    y = nn.Dense(tinytask.OUT, kernel_init=kernel_init, bias_init=bias_init, name="head")(h)
    return y, {"hidden": h}


def build_model(config):
  return BatchNormModel(**config.model)


dummy_batch = tinytask.dummy_batch
train_data = tinytask.train_data


def loss_fn(model, params, batch, rng, train, collections):
  variables = {"params": params, **collections}
  if train:
    (pred, _), updated = model.apply(
      variables, batch, train=True, rngs={"dropout": rng}, mutable=list(collections)
    )
  else:
    pred, _ = model.apply(variables, batch, train=False)
  aux = {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}
  if train:
    aux["collections"] = updated
  return jnp.mean(jnp.square(pred - batch["y"])), aux


def evaluate(config, model, params, *, mesh, rules, workdir, step, collections):
  examples = tinytask.make_examples(64, seed=1)
  batch = {k: np.stack([e[k] for e in examples]) for k in ("x", "y")}
  pred, _ = jax.jit(lambda v, b: model.apply(v, b))({"params": params, **collections}, batch)
  return {"loss": float(jnp.mean(jnp.square(pred - batch["y"])))}
