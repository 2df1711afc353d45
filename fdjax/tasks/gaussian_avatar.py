"""Gaussian head avatars (GaussianAvatars style) trained on multi-view video of one subject.

The task contract of `fdjax/tasks/__init__.py` (docs/design.md sections 8 and 20):

- model: `fdjax.models.gaussian_avatar.GaussianAvatar`, Gaussians bound to the triangles of the
  subject's FLAME mesh, `config.model.capacity` slots with an active mask; initialised by
  `init_fn` (one Gaussian per triangle), the avatar's state in the `avatar` collection;
- data: NeRSemble as GaussianAvatars uses it (`data_pipelines/builders/nersemble.py`, its twin
  when no data is given); each example is one image with its camera and its frame's FLAME mesh
  (`vertices`, posed on the host when the split is loaded);
- loss: `(1 - w) L1 + w (1 - SSIM)` of the rendered views, plus GaussianAvatars' position and
  scale regularisers; in training the loss also collects the screen-space gradients and, on the
  `config.densify` schedule, densifies and prunes (a custom VJP hands the gradient of the image
  loss with respect to the screen positions out of the same backward pass: no second one);
- evaluation: PSNR and SSIM (`fdjax/metrics/image.py`) on the held-out camera (`val`, novel
  views) and the held-out sequence (`test`, novel expressions), and the rasteriser's overflow.

Rasteriser overflow (pairs dropped for want of bucket room) is logged with every training
metric (`bucket_overflow`, `pair_overflow`) and returned by the evaluation, never hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import pipeline, prepare
from data_pipelines.builders import nersemble
from fdjax.metrics import image as image_metrics
from fdjax.models import flame
from fdjax.models import gaussian_avatar as avatar_lib
from fdjax.render import gaussians as gs

COLLECTION = "avatar"
Array = jax.Array


# --- The head model and the data ---------------------------------------------------------------


def flame_model_path(config: Any) -> str:
  """`config.model.flame_model`, or the stand-in model the synthetic twin was posed with."""
  if config.model.flame_model:
    return os.path.expanduser(config.model.flame_model)
  raw_dir, _ = prepare.resolve_dirs(config.data)
  return os.path.join(raw_dir, "head_model", "generic_model.pkl")


@functools.lru_cache(maxsize=4)
def _load_flame(path: str) -> flame.FlameModel:
  return flame.load_flame(path)


def head_model(config: Any) -> flame.FlameModel:
  """The FLAME model of `config` (the twin is written first if it is the one named)."""
  path = flame_model_path(config)
  if not os.path.isfile(path) and not config.model.flame_model:
    prepare.ensure_dataset(config.data)
  return _load_flame(path)


def subject_model(config: Any, data_dir: str) -> tuple[flame.FlameModel, np.ndarray]:
  """The head model with the subject's static offset in its template, and the identity."""
  model = head_model(config)
  subject = nersemble.load_subject(data_dir)
  offset = subject["static_offset"]
  num = model.num_vertices
  if len(offset) and len(offset) < num:
    raise ValueError(
      f"{data_dir}: the static offset has {len(offset)} vertices, the head model {num}"
    )
  if len(offset):  # VHAP's FLAME adds teeth vertices after the head's: those are dropped
    model = dataclasses.replace(model, template=model.template + jnp.asarray(offset[:num]))
  return model, subject["shape"]


@functools.lru_cache(maxsize=8)
def _split_examples(data_json: str, flame_model: str, split: str) -> dict[str, np.ndarray]:
  """A built split with every frame's posed mesh (`vertices [N, V, 3]`), cached per config."""
  config = ml_collections.ConfigDict(
    {"data": json.loads(data_json), "model": {"flame_model": flame_model}}
  )
  _, data_dir = prepare.ensure_dataset(config.data)
  arrays = nersemble.load_split(data_dir, split)
  model, shape = subject_model(config, data_dir)
  size = tuple(arrays["image"].shape[1:3])
  if size != (config.data.image_size, config.data.image_size):
    raise ValueError(
      f"{data_dir}: the {split} images are {size}, config.data.image_size is "
      f"{config.data.image_size}"
    )
  pose = jax.jit(lambda m, e, p, t: flame.flame_forward(m, shape, e, p, t).vertices)
  arrays["vertices"] = np.asarray(
    pose(model, arrays["expression"], arrays["pose"], arrays["translation"])
  )
  return arrays


def split_examples(config: Any, split: str) -> dict[str, np.ndarray]:
  """`_split_examples` of `config` (hashable through its JSON)."""
  return _split_examples(config.data.to_json(), config.model.flame_model, split)


_EXAMPLE_KEYS = ("image", "world_to_camera", "intrinsics", "vertices")


class _Examples:
  """Random access over a split's arrays, one example dict per index."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = {k: arrays[k] for k in _EXAMPLE_KEYS}

  def __len__(self) -> int:
    return len(self.arrays["image"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}


def cameras(batch: dict) -> gs.Camera:
  """Batched cameras from `world_to_camera [B, 4, 4]` and `intrinsics [B, 4]`."""
  matrix, intrinsics = batch["world_to_camera"], batch["intrinsics"]
  return gs.Camera(matrix[:, :3, :3], matrix[:, :3, 3], intrinsics[:, :2], intrinsics[:, 2:])


# --- Contract hooks ------------------------------------------------------------------------------


def build_model(config: Any) -> avatar_lib.GaussianAvatar:
  m = config.model
  return avatar_lib.GaussianAvatar(
    faces=np.asarray(head_model(config).faces),
    capacity=m.capacity,
    sh_degree=m.sh_degree,
    init_opacity=m.init_opacity,
    init_scale=m.init_scale,
  )


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  size, num_vertices = config.data.image_size, head_model(config).num_vertices
  intrinsics = np.array([size, size, size / 2, size / 2], np.float32)
  return {
    "image": np.zeros((batch_size, size, size, 3), np.uint8),
    "world_to_camera": np.tile(np.eye(4, dtype=np.float32), (batch_size, 1, 1)),
    "intrinsics": np.tile(intrinsics, (batch_size, 1)),
    "vertices": np.zeros((batch_size, num_vertices, 3), np.float32),
  }


def init_fn(model: avatar_lib.GaussianAvatar, rngs: dict, batch: dict) -> dict:
  """`{"params": ..., "avatar": state}`: one Gaussian per triangle (rng and batch unused)."""
  params, state = model.init()
  return {"params": params, COLLECTION: state}


def train_data(config: Any, *, process_index: int, process_count: int):
  return pipeline.train_dataset(
    _Examples(split_examples(config, "train")),
    None,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    shuffle=config.data.shuffle,
  )


def render_settings(config: Any) -> dict:
  m = config.model
  return {
    "height": config.data.image_size,
    "width": config.data.image_size,
    "tile_size": m.tile_size,
    "capacity": m.bucket_capacity,
    "pair_capacity": m.pair_capacity or None,
    "chunk": m.chunk,
  }


def make_loss_fn(config: Any):
  """The photometric loss, regularisers and densification of the module docstring."""
  d = config.densify
  return functools.partial(
    _loss,
    render=render_settings(config),
    background=float(config.data.background),
    ssim_weight=config.loss.ssim_weight,
    position_weight=config.loss.position_weight,
    position_threshold=config.loss.position_threshold,
    scale_weight=config.loss.scale_weight,
    scale_threshold=config.loss.scale_threshold,
    schedule=(d.start, d.stop, d.every, d.opacity_reset_every),
    settings=avatar_lib.DensifySettings(d.grad_threshold, d.split_scale, d.prune_opacity),
  )


def render_views(model, effective, state, batch, *, render, background, screen_offset=None):
  """Renders every view of a batch (vmap over views): `gs.Rendered` with a leading [B]."""
  frames = avatar_lib.face_frames(batch["vertices"], model.faces)
  colour = jnp.full((3,), background, jnp.float32)

  def one(frames_b, camera_b, offset_b):
    g = model.gaussians(effective, state, frames_b)
    return gs.render(
      g,
      camera_b,
      background=colour,
      sh_degree=model.sh_degree,
      screen_offset=offset_b,
      **render,
    )

  if screen_offset is None:
    return jax.vmap(lambda f, c: one(f, c, None))(frames, cameras(batch))
  return jax.vmap(one)(frames, cameras(batch), screen_offset)


def _image_loss(model, render, background, ssim_weight, effective, screen_offset, context):
  """`(loss, aux)` of the rendered batch against its images."""
  state, batch = context
  out = render_views(
    model,
    effective,
    state,
    batch,
    render=render,
    background=background,
    screen_offset=screen_offset,
  )
  truth = batch["image"].astype(jnp.float32) / 255.0
  l1 = jnp.mean(jnp.abs(out.colour - truth))
  ssim = jnp.mean(image_metrics.ssim(out.colour, truth))
  loss = (1.0 - ssim_weight) * l1 + ssim_weight * (1.0 - ssim)
  aux = {
    "l1": l1,
    "ssim": ssim,
    "psnr": jnp.mean(image_metrics.psnr(out.colour, truth)),
    **{k: jnp.sum(v) for k, v in out.aux.items() if k != "max_bucket"},
    "max_bucket": jnp.max(out.aux["max_bucket"]),
  }
  return loss, aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def loss_and_probe_gradient(fn, params, probe, context):
  """`fn(params, probe, context) -> (loss, aux)` as `(loss, d loss / d probe, aux)`.

  Differentiated (training), one forward and one backward pass of `fn` give both the gradient
  for `params` (stored for the outer backward pass, which only scales it) and the gradient
  with respect to `probe` (the screen-space offsets densification reads). Not differentiated
  (evaluation), the probe gradient is zeros and `fn` runs forward only. `context` gets no
  gradient.
  """
  loss, aux = fn(params, probe, context)
  return loss, jnp.zeros_like(probe), aux


def _loss_fwd(fn, params, probe, context):
  (loss, aux), (grad_params, grad_probe) = jax.value_and_grad(fn, (0, 1), has_aux=True)(
    params, probe, context
  )
  return (loss, grad_probe, aux), grad_params


def _loss_bwd(fn, grad_params, cotangents):
  scale = cotangents[0]
  return jax.tree.map(lambda g: scale * g, grad_params), None, None


loss_and_probe_gradient.defvjp(_loss_fwd, _loss_bwd)


def _loss(
  model,
  params,
  batch,
  rng,
  train,
  *,
  collections=None,
  step=None,
  render,
  background,
  ssim_weight,
  position_weight,
  position_threshold,
  scale_weight,
  scale_threshold,
  schedule,
  settings,
):
  state = collections[COLLECTION]
  effective = avatar_lib.effective_params(params, state)
  num_views, num = batch["image"].shape[0], state["active"].shape[0]
  fn = functools.partial(_image_loss, model, render, background, ssim_weight)
  probe = jnp.zeros((num_views, num, 2), jnp.float32)
  loss, screen_gradient, aux = loss_and_probe_gradient(fn, effective, probe, (state, batch))

  # GaussianAvatars' regularisers, over active Gaussians, in triangle units.
  active = state["active"].astype(jnp.float32)
  count = jnp.maximum(jnp.sum(active), 1.0)
  distance = _norm(effective["position"])
  position_loss = jnp.sum(jax.nn.relu(distance - position_threshold) * active) / count
  excess = jax.nn.relu(jnp.exp(effective["scale"]) - scale_threshold)
  scale_loss = jnp.sum(_norm(excess) * active) / count
  total = loss + position_weight * position_loss + scale_weight * scale_loss
  aux.update(
    photometric=loss,
    position_loss=position_loss,
    scale_loss=scale_loss,
    num_gaussians=jnp.sum(state["active"]),
  )
  if not train:
    return total, aux

  # Screen-space gradients in NDC units of each view's own loss (3DGS's statistic).
  size = jnp.array([render["width"] / 2, render["height"] / 2])
  norms = jnp.linalg.norm(screen_gradient * size, axis=-1) * num_views  # [B, N]
  state = avatar_lib.accumulate_statistics(state, norms, norms > 0)
  start, stop, every, reset_every = schedule
  # This update's number (1-based), so update k densifies and its log line (step k) shows it.
  update = jnp.asarray(0 if step is None else step) + 1
  grow = (every > 0) & (update >= start) & (update <= stop) & (update % max(every, 1) == 0)
  grown, counts = avatar_lib.densify_and_prune(params, state, rng, settings)
  state = jax.tree.map(lambda new, old: jnp.where(grow, new, old), grown, state)
  if reset_every:
    reset = (update % reset_every == 0) & (update <= stop)
    state = jax.tree.map(
      lambda new, old: jnp.where(reset, new, old), avatar_lib.reset_opacity(params, state), state
    )
  aux.update({k: jnp.where(grow, v, 0) for k, v in counts.items()})
  aux["collections"] = {COLLECTION: state}
  return total, aux


_VIEW_KEYS = ("world_to_camera", "intrinsics", "vertices")  # what rendering a view reads


def rendered_batches(draw, views: dict[str, np.ndarray], size: int):
  """`(rendered, first, count)` for consecutive batches of `size` views drawn by `draw`.

  The last batch is padded by repeating its final view, so `draw` compiles once; `rendered`
  is cut back to the `count` real views.
  """
  total = len(views["vertices"])
  for first in range(0, total, size):
    index = np.minimum(np.arange(first, first + size), total - 1)
    out = draw({k: v[index] for k, v in views.items()})
    count = min(size, total - first)
    yield jax.tree.map(lambda x, count=count: x[:count], out), first, count


def _norm(x: Array) -> Array:
  """Euclidean norm over the last axis with a zero (not NaN) gradient at 0."""
  squared = jnp.sum(x * x, -1)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def evaluate(
  config, model, params, *, mesh, rules, workdir: str, step: int, collections=None
) -> dict[str, float]:
  """PSNR and SSIM on the held-out camera (`val_*`) and held-out sequence (`test_*`)."""
  state = collections[COLLECTION]
  effective = avatar_lib.effective_params(params, state)
  render = render_settings(config)
  draw = jax.jit(
    lambda batch: render_views(
      model, effective, state, batch, render=render, background=float(config.data.background)
    )
  )
  metrics: dict[str, float] = {"num_gaussians": float(jnp.sum(state["active"]))}
  overflow = 0
  for split in ("val", "test"):
    examples = split_examples(config, split)
    psnrs, ssims = [], []
    size = config.data.eval_batch_size
    views = {k: examples[k] for k in _VIEW_KEYS}
    for out, first, count in rendered_batches(draw, views, size):
      truth = jnp.asarray(examples["image"][first : first + count], jnp.float32) / 255.0
      psnrs.append(np.asarray(image_metrics.psnr(out.colour, truth)))
      ssims.append(np.asarray(image_metrics.ssim(out.colour, truth)))
      overflow += int(jnp.sum(out.aux["bucket_overflow"]) + jnp.sum(out.aux["pair_overflow"]))
    metrics[f"{split}_psnr"] = float(np.mean(np.concatenate(psnrs)))
    metrics[f"{split}_ssim"] = float(np.mean(np.concatenate(ssims)))
  metrics["eval_overflow"] = float(overflow)
  return metrics
