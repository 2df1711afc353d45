"""Test family `inbetween`: a task added as new files only (this module, its model, a config).

It uses what the core offers a new family without editing it: BatchNorm statistics kept in the
train state (the loss takes `collections=` and returns the updated ones in
`aux["collections"]`), an EMA of the parameters (`config.ema.decay`), and a custom export dim:
the number of keyframes `k`, fixed by `fdjax export --keyframes N` or left symbolic.

Data: keyframes `[K, E]` drawn at random; the frames between two keyframes ease in and out
(a cubic ease-in), so linear interpolation is the baseline the model must beat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from newfamily.inbetween_model import InbetweenNet, interpolate_keyframes

from data_pipelines import pipeline
from fdjax.tasks import BATCH_DIM, ExportDim

FEATURES = 4  # expression coefficients per frame (E)


def make_examples(num: int, seed: int, num_keyframes: int, stride: int) -> list[dict]:
  """`{"keyframes": [K, E], "frames": [T, E]}` with eased in-between frames."""
  rng = np.random.default_rng(seed)
  keyframes = rng.normal(size=(num, num_keyframes, FEATURES)).astype(np.float32)
  views = jax.device_get(interpolate_keyframes(jnp.asarray(keyframes), stride))
  eased = views["phase"] ** 3  # ease-in: slow out of the first keyframe, fast into the next
  frames = views["start"] + (views["end"] - views["start"]) * eased
  frames = frames.astype(np.float32)
  return [{"keyframes": keyframes[i], "frames": frames[i]} for i in range(num)]


def build_model(config):
  return InbetweenNet(**config.model)


def dummy_batch(config, batch_size):
  frames = (config.data.num_keyframes - 1) * config.model.stride + 1
  return {
    "keyframes": np.zeros((batch_size, config.data.num_keyframes, FEATURES), np.float32),
    "frames": np.zeros((batch_size, frames, FEATURES), np.float32),
  }


def init_fn(model, rngs, batch):
  return model.init(rngs, batch["keyframes"])


def loss_fn(model, params, batch, rng, train, *, collections):
  variables = {"params": params, **collections}
  if train:
    (frames, _), updated = model.apply(
      variables, batch["keyframes"], train=True, mutable=list(collections)
    )
  else:
    frames, _ = model.apply(variables, batch["keyframes"])
  aux = {"collections": updated} if train else {}
  return jnp.mean(jnp.square(frames - batch["frames"])), aux


def train_data(config, *, process_index, process_count):
  examples = make_examples(
    config.data.num_examples,
    seed=0,
    num_keyframes=config.data.num_keyframes,
    stride=config.model.stride,
  )
  return pipeline.train_dataset(
    examples,
    None,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=0,
  )


def evaluate(config, model, params, *, mesh, rules, workdir, step, collections):
  examples = make_examples(
    64, seed=1, num_keyframes=config.data.num_keyframes, stride=config.model.stride
  )
  batch = {k: np.stack([e[k] for e in examples]) for k in ("keyframes", "frames")}
  frames, aux = jax.jit(lambda v, k: model.apply(v, k))(
    {"params": params, **collections}, batch["keyframes"]
  )
  return {
    "loss": float(jnp.mean(jnp.square(frames - batch["frames"]))),
    "interpolation_loss": float(jnp.mean(jnp.square(aux["interpolated"] - batch["frames"]))),
  }


def predict_fn(config, model):
  def predict(variables, keyframes):
    return model.apply(variables, keyframes)[0]

  return predict, {"keyframes": (f"b, k, {FEATURES}", "float32")}


def export_dims(config):
  return [BATCH_DIM, ExportDim("k", "--keyframes", "keyframes per sequence (default: symbolic)")]


def export_metadata(config):
  return {"stride": config.model.stride, "features": FEATURES}
