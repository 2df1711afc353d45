"""A stand-in stage-1 run for the audio2motion tests, with the `face_motion_ae` model API
(`encode_appearance`, `encode_motion`, `decode`) and the task's `load(workdir)`: a tiny random
network written as a workdir (`write_run`), so stage 2 is tested without training stage 1."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


class StandInMotionAE(nn.Module):
  image_size: int = 128  # H = W of the frames
  code_width: int = 5  # D
  features: int = 4  # appearance channels

  def setup(self):
    self.appearance = nn.Conv(self.features, (3, 3), name="appearance")
    self.motion = nn.Dense(self.code_width, name="motion")
    self.lift = nn.Dense(self.features, name="lift")
    self.out = nn.Conv(3, (3, 3), name="out")

  def __call__(self, frames):
    return self.decode(self.encode_appearance(frames), self.encode_motion(frames))

  def encode_appearance(self, image):
    return self.appearance(image)  # [B, H, W, F]

  def encode_motion(self, frames):
    pooled = nn.avg_pool(frames, (8, 8), (8, 8))  # [B, H/8, W/8, 3]
    return jnp.tanh(self.motion(pooled.reshape(frames.shape[0], -1)))  # [B, D]

  def decode(self, appearance, code):
    return nn.sigmoid(self.out(appearance + self.lift(code)[:, None, None]))


def build_model(config):
  return StandInMotionAE(**config.model)


def dummy_batch(config, batch_size):
  size = config.model.image_size
  return {"video": np.zeros((batch_size, 2, size, size, 3), np.uint8)}


def write_run(workdir: str, *, image_size: int = 128, code_width: int = 5, seed: int = 0) -> str:
  """A stage-1 "run": config.json naming this module as its task, and random parameters."""
  os.makedirs(workdir, exist_ok=True)
  model_fields = {"image_size": image_size, "code_width": code_width}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"task": "motion_ae_standin", "model": model_fields}, f)
  model = StandInMotionAE(**model_fields)
  frames = jnp.zeros((1, image_size, image_size, 3))
  params = model.init(jax.random.key(seed), frames)["params"]
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  np.savez(os.path.join(workdir, "params.npz"), **flat)
  return workdir


def load(workdir: str):
  """`(model, params, config)` as `fdjax.tasks.face_motion_ae.load` returns them."""
  from fdjax import config as config_lib

  config = config_lib.load_json_config(os.path.join(workdir, "config.json"))
  flat = dict(np.load(os.path.join(workdir, "params.npz")))
  return build_model(config), traverse_util.unflatten_dict(flat, sep="/"), config
