"""Face motion autoencoder (stage 1 of the talking-head line): appearance apart from motion.

`fdjax.models.face_motion.FaceMotionAE` reconstructs a driving frame from a source frame of the
same clip: the source's appearance, the driving frame's motion code (D ~ 20, LIA-style), a
generator that warps appearance features by flows decoded from the code and refines them.
Stage 2 (`fdjax.tasks.audio2motion`) models sequences of these codes; `load(workdir)` gives it
the trained model. Task contract: `fdjax/tasks/__init__.py`; docs/design.md section 22.

- data (`config.data`): a TFDS talking-face video builder (`hdtf`, or `voxceleb2`) whose
  examples carry `video` [T, S, S, 3]; each training example is one random (source, driving)
  pair of distinct frames of a clip, resized to `model.image_size`, mirrored together with
  `data.flip_prob`;
- loss (`config.loss`): `l1_weight` x the mean L1 over `scales` image scales (full, 1/2, ...,
  average-pooled), `ssim_weight` x (1 - SSIM) (`fdjax.metrics.image.ssim`), and with
  `adversarial_weight` > 0 a PatchGAN trained in the same step (the one-step adversarial
  pattern of docs/design.md section 7: non-saturating terms, each network's loss stopping the
  other's gradient);
- evaluation on `data.eval_split`: reconstruction PSNR / SSIM of `data.eval_frames` driving
  frames of each clip from its first frame, against the "repeat the source frame" baseline;
  cross-identity reenactment (each clip drives the first clip of another identity, relative
  motion) judged by `fdjax.metrics.talking_face`'s probes: the identity probe (fitted on the
  evaluation clips' real frames) should find the portrait's identity, and the mouth-opening
  probe (fitted on training clips with ground truth, `talking_face.fit_twin_probes`) should
  follow the driver's `mouth_open`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import pipeline
from data_pipelines.ops import video as video_ops
from fdjax import sharding as sharding_lib
from fdjax import step as step_lib
from fdjax.metrics import image as image_metrics
from fdjax.models.face_motion import FaceMotionAE, relative_codes
from fdjax.tasks.dfer import open_split, split_name

Array = jax.Array

# Keys of `config.model` that configure the task rather than the module's fields.
TASK_MODEL_KEYS = ("init_from",)


# ----------------------------------------------------------------------------------------------
# Model.


def build_model(config: Any) -> FaceMotionAE:
  """`FaceMotionAE` with `config.model`'s keys as fields (no discriminator without the
  adversarial term)."""
  fields = {k: v for k, v in dict(config.model).items() if k not in TASK_MODEL_KEYS}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if config.loss.adversarial_weight <= 0:
    fields["discriminator_widths"] = ()
  elif not fields.get("discriminator_widths"):
    raise ValueError(
      "config.loss.adversarial_weight > 0 needs a discriminator: set "
      "config.model.discriminator_widths"
    )
  fields["dtype"] = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  return FaceMotionAE(**fields)


def init_fn(model: FaceMotionAE, rngs: dict, batch: dict) -> dict:
  return model.init(rngs, to_float(batch["source"]), to_float(batch["driving"]))


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  size = config.model.image_size
  frame = np.zeros((batch_size, size, size, 3), np.uint8)  # [B, S, S, 3]
  return {"source": frame, "driving": frame.copy()}


def to_float(frames: Array) -> Array:
  """uint8 frames -> float32 in [0, 1]."""
  return frames.astype(jnp.float32) / 255.0


def load(workdir: str) -> tuple[FaceMotionAE, Any, Any]:
  """`(model, params, config)` of a trained `face_motion_ae` run in `workdir`: its latest
  checkpoint's parameters (the EMA when the run keeps one), as host numpy arrays."""
  from fdjax import pretrained

  config = pretrained.run_config(workdir)
  if config is None:
    raise FileNotFoundError(
      f"{workdir}: not an fdjax workdir with checkpoints (config.json and checkpoints/)"
    )
  if config.task != "face_motion_ae":
    raise ValueError(f"{workdir}: a run of task {config.task!r}, not 'face_motion_ae'")
  return build_model(config), pretrained.read_checkpoint_params(workdir), config


# ----------------------------------------------------------------------------------------------
# Loss.


def downsample(images: Array, factor: int) -> Array:
  """Average pooling by `factor`: [B, H, W, C] -> [B, H/f, W/f, C]."""
  if factor == 1:
    return images
  return nn.avg_pool(images, (factor, factor), (factor, factor))


def multiscale_l1(prediction: Array, truth: Array, scales: int) -> Array:
  """Mean absolute error averaged over `scales` scales (full, 1/2, 1/4, ...)."""
  errors = [
    jnp.mean(jnp.abs(downsample(prediction, 2**s) - downsample(truth, 2**s))) for s in range(scales)
  ]
  return sum(errors) / scales


def adversarial_losses(model, params, fake: Array, real: Array) -> tuple[Array, Array]:
  """`(generator_loss, discriminator_loss)` (non-saturating, mean over patches), each stopping
  the other network's gradient: the generator's sees the discriminator's parameters frozen, the
  discriminator's sees `fake` [B, S, S, 3] frozen; `real` [B, S, S, 3] are the driving frames."""
  score = lambda p, x: model.apply({"params": p}, x, method=FaceMotionAE.discriminate)
  frozen = {**params, "discriminator": jax.lax.stop_gradient(params["discriminator"])}
  generator = jnp.mean(jax.nn.softplus(-score(frozen, fake)))
  discriminator = jnp.mean(jax.nn.softplus(-score(params, real)))
  discriminator += jnp.mean(jax.nn.softplus(score(params, jax.lax.stop_gradient(fake))))
  return generator, discriminator


def make_loss_fn(config: Any):
  """The reconstruction loss of `config.loss` (module docstring)."""
  if config.loss.scales < 1 or config.model.image_size % 2 ** (config.loss.scales - 1):
    raise ValueError(
      f"config.loss.scales={config.loss.scales} must be >= 1 and 2^(scales - 1) must divide "
      f"model.image_size={config.model.image_size}"
    )
  return functools.partial(_loss, config=config)


def _loss(model, params, batch, rng, train, *, config):
  del rng, train
  source, driving = to_float(batch["source"]), to_float(batch["driving"])
  prediction, _ = model.apply({"params": params}, source, driving)  # [B, S, S, 3]
  l1 = multiscale_l1(prediction, driving, config.loss.scales)
  ssim = jnp.mean(image_metrics.ssim(prediction, driving))
  loss = config.loss.l1_weight * l1 + config.loss.ssim_weight * (1.0 - ssim)
  metrics = {
    "l1_loss": l1,
    "ssim": ssim,
    "psnr": jnp.mean(image_metrics.psnr(jnp.clip(prediction, 0, 1), driving)),
  }
  if config.loss.adversarial_weight > 0:
    generator, discriminator = adversarial_losses(model, params, prediction, driving)
    metrics.update(generator_loss=generator, discriminator_loss=discriminator)
    loss = loss + config.loss.adversarial_weight * generator + discriminator
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# FLOPs.


@functools.lru_cache(maxsize=8)
def _forward_flops(model: FaceMotionAE, adversarial: bool) -> float:
  size = model.image_size
  frame = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), frame, frame)

  def forward(variables, source, driving):
    prediction, _ = model.apply(variables, source, driving)
    if not adversarial:
      return prediction
    score = lambda x: model.apply(variables, x, method=FaceMotionAE.discriminate)
    return prediction, score(prediction), score(prediction), score(driving)

  cost = jax.jit(forward).lower(variables, frame, frame).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def flops_per_example(config: Any) -> float:
  """Training FLOPs of one (source, driving) pair: 3x XLA's count of the forward pass (the
  appearance and motion encoders, the generator, and the discriminator on the reconstruction
  twice and the driving frame once when the adversarial term is on)."""
  return 3.0 * _forward_flops(build_model(config), config.loss.adversarial_weight > 0)


# ----------------------------------------------------------------------------------------------
# Data.


def resize_frames(frames: np.ndarray, size: int, flip: bool = False) -> np.ndarray:
  """uint8 frames [N, H, W, 3] -> their centred square resized to [N, size, size, 3]."""
  box = video_ops.center_square_box(*frames.shape[1:3])
  return video_ops.crop_and_resize(frames, box, size, flip=flip)


def pair_transform(
  example: dict, rng: np.random.Generator, *, image_size: int, flip_prob: float
) -> dict[str, np.ndarray]:
  """One training pair of a clip: `source` and `driving` uint8 [S, S, 3], two distinct random
  frames (the same frame only in a one-frame clip), mirrored together with `flip_prob`."""
  video = np.asarray(example["video"])  # [T, H, W, 3]
  if len(video) == 0:
    raise ValueError(f"example {example.get('key', '?')!r} has no frames")
  count = len(video)
  source = int(rng.integers(count))
  driving = (source + 1 + int(rng.integers(count - 1))) % count if count > 1 else source
  flip = bool(rng.random() < flip_prob)
  pair = resize_frames(video[[source, driving]], image_size, flip)
  return {"source": pair[0], "driving": pair[1]}


def train_data(config: Any, *, process_index: int, process_count: int):
  """The endless stream of (source, driving) pairs, one random pair per clip visit."""
  source = open_split(config, split_name(config, "train"))
  transform = functools.partial(
    pair_transform, image_size=config.model.image_size, flip_prob=config.data.flip_prob
  )
  return pipeline.train_dataset(
    source,
    transform,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    shuffle=config.data.shuffle,
  )


def eval_frame_indices(count: int, frames: int) -> np.ndarray:
  """Driving frames of a clip of `count` frames: `frames` indices spread evenly over 1..T-1."""
  if count < 2:
    return np.zeros(1, np.int64)
  return np.unique(np.linspace(1, count - 1, frames).round().astype(np.int64))


def eval_clips(config: Any, split: str, limit: int) -> list[dict]:
  """The first `limit` clips of `split` (0: all): `source` [S, S, 3] (frame 0), `driving`
  [F, S, S, 3] (`eval_frame_indices`), `identity`, and `mouth_open` [F] where the example has
  ground truth."""
  source = open_split(config, split)
  size = config.model.image_size
  clips = []
  for i in range(min(limit or len(source), len(source))):
    example = source[i]
    video = np.asarray(example["video"])
    if len(video) == 0:
      raise ValueError(f"{split} example {example.get('key', i)!r} has no frames")
    indices = eval_frame_indices(len(video), config.data.eval_frames)
    frames = resize_frames(video[np.concatenate([[0], indices])], size)
    clip = {"source": frames[0], "driving": frames[1:], "identity": _text(example["identity"])}
    if bool(example.get("has_ground_truth", False)):
      clip["mouth_open"] = np.asarray(example["mouth_open"], np.float32)[indices]
    clips.append(clip)
  if not clips:
    raise ValueError(f"evaluation split {split!r} has no clips")
  return clips


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def reenactment_pairs(identities: list[str]) -> list[tuple[int, int]]:
  """`(driver, portrait)` clip pairs: every clip drives the next clip (cyclically) of another
  identity. Needs at least two identities."""
  if len(set(identities)) < 2:
    raise ValueError(
      f"cross-identity reenactment needs clips of at least two identities in the evaluation "
      f"split, found {sorted(set(identities))}; use a split with more identities or set "
      "config.data.reenactment=False"
    )
  pairs = []
  n = len(identities)
  for i in range(n):
    j = next((i + k) % n for k in range(1, n) if identities[(i + k) % n] != identities[i])
    pairs.append((i, j))
  return pairs


# ----------------------------------------------------------------------------------------------
# Evaluation.


@functools.lru_cache(maxsize=8)
def _render_fn(model: FaceMotionAE, mesh: jax.sharding.Mesh):
  """Jitted `(params, portrait [B, S, S, 3] u8, driving [B, S, S, 3] u8, reference [B, S, S, 3]
  u8 or None) -> image [B, S, S, 3] f32`: the portrait's appearance with the driving frame's code,
  relative to `reference`'s code (`code_portrait + code_driving - code_reference`) when given."""

  def run(params, portrait, driving, reference):
    variables = {"params": params}
    portrait_f = to_float(portrait)
    appearance = model.apply(variables, portrait_f, method=FaceMotionAE.encode_appearance)
    code = model.apply(variables, to_float(driving), method=FaceMotionAE.encode_motion)
    if reference is not None:
      reference_code = model.apply(
        variables, to_float(reference), method=FaceMotionAE.encode_motion
      )
      portrait_code = model.apply(variables, portrait_f, method=FaceMotionAE.encode_motion)
      code = relative_codes(portrait_code, jnp.stack([reference_code, code], axis=1))[:, 1]
    image = model.apply(variables, appearance, code, method=FaceMotionAE.decode)
    return jnp.clip(image, 0.0, 1.0)

  return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def render(config, model, params, portrait, driving, reference=None, *, mesh, rules) -> np.ndarray:
  """`_render_fn` over any number of frames [N, S, S, 3] u8 (batched, sharded, padded) ->
  float32 [N, S, S, 3]."""
  sharding = sharding_lib.batch_sharding(mesh, rules)
  multiple = sharding_lib.data_parallel_size(mesh, rules)
  size = -(-config.data.eval_batch_size // multiple) * multiple
  run = _render_fn(model, mesh)
  outputs = []
  for start in range(0, len(driving), size):
    parts = [portrait, driving] + ([reference] if reference is not None else [])
    parts = [p[start : start + size] for p in parts]
    count = len(parts[0])
    parts = [np.concatenate([p, np.zeros((size - count, *p.shape[1:]), p.dtype)]) for p in parts]
    device = [jax.make_array_from_callback(p.shape, sharding, lambda i, p=p: p[i]) for p in parts]
    if reference is None:
      device.append(None)
    outputs.append(np.asarray(jax.device_get(run(params, *device)))[:count])
  return np.concatenate(outputs)


def _mean_image_metrics(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
  """Mean PSNR and SSIM over frames [N, S, S, 3] (float in [0, 1])."""
  p, t = jnp.asarray(prediction, jnp.float32), jnp.asarray(truth, jnp.float32)
  psnr = np.asarray(image_metrics.psnr(p, t), np.float64)
  ssim = np.asarray(image_metrics.ssim(p, t), np.float64)
  return float(np.mean(np.minimum(psnr, 100.0))), float(np.mean(ssim))


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict:
  """Reconstruction against repeating the source frame, and cross-identity reenactment judged
  by the twin probes (module docstring). Every process computes the same numbers."""
  del workdir, step
  split = split_name(config, "eval")
  clips = eval_clips(config, split, config.data.eval_max_examples)
  portraits = np.concatenate([np.repeat(c["source"][None], len(c["driving"]), 0) for c in clips])
  driving = np.concatenate([c["driving"] for c in clips])  # [N, S, S, 3] u8
  truth = driving.astype(np.float32) / 255.0
  reconstruction = render(config, model, params, portraits, driving, mesh=mesh, rules=rules)
  psnr, ssim = _mean_image_metrics(reconstruction, truth)
  baseline_psnr, baseline_ssim = _mean_image_metrics(portraits.astype(np.float32) / 255.0, truth)
  metrics = {
    "psnr": psnr,
    "ssim": ssim,
    "repeat_source_psnr": baseline_psnr,
    "repeat_source_ssim": baseline_ssim,
    "psnr_gain": psnr - baseline_psnr,
    "num_clips": len(clips),
    "num_frames": len(driving),
  }
  if config.data.reenactment:
    metrics.update(
      reenactment_metrics(config, model, params, clips, reconstruction, mesh=mesh, rules=rules)
    )
  return metrics


def reenactment_metrics(
  config, model, params, clips: list[dict], reconstruction: np.ndarray, *, mesh, rules
) -> dict:
  """Each clip drives another identity's portrait (its first frame) with relative motion; the
  identity probe's share of reenacted frames given the portrait's identity (and the driver's),
  and the Pearson correlation of the mouth probe on them with the driver's `mouth_open` (and on
  the same-clip `reconstruction` [N, S, S, 3] of every clip's driving frames, and on the real
  driving frames: the probe's ceiling)."""
  from fdjax.metrics import talking_face

  identities = [c["identity"] for c in clips]
  pairs = reenactment_pairs(identities)
  names = sorted(set(identities))
  label = {name: i for i, name in enumerate(names)}
  portrait = np.concatenate(
    [np.repeat(clips[p]["source"][None], len(clips[d]["driving"]), 0) for d, p in pairs]
  )
  reference = np.concatenate(
    [np.repeat(clips[d]["source"][None], len(clips[d]["driving"]), 0) for d, _ in pairs]
  )
  driving = np.concatenate([clips[d]["driving"] for d, _ in pairs])
  reenacted = render(config, model, params, portrait, driving, reference, mesh=mesh, rules=rules)
  reenacted = (reenacted * 255.0 + 0.5).astype(np.uint8)

  real = np.concatenate([c["driving"] for c in clips])
  real_labels = np.concatenate([np.full(len(c["driving"]), label[c["identity"]]) for c in clips])
  identity_probe = talking_face.fit_identity_probe(real, real_labels)
  predicted = np.asarray(identity_probe(reenacted))
  portrait_ids = np.concatenate(
    [np.full(len(clips[d]["driving"]), label[identities[p]]) for d, p in pairs]
  )
  driver_ids = np.concatenate(
    [np.full(len(clips[d]["driving"]), label[identities[d]]) for d, _ in pairs]
  )
  metrics = {
    "reenactment_pairs": len(pairs),
    "identity_portrait_accuracy": float(np.mean(predicted == portrait_ids)),
    "identity_driver_share": float(np.mean(predicted == driver_ids)),
    "identity_probe_real_accuracy": float(np.mean(np.asarray(identity_probe(real)) == real_labels)),
  }
  if all("mouth_open" in clips[d] for d, _ in pairs):
    train = open_split(config, split_name(config, "train"))
    mouth_probe, _ = talking_face.fit_twin_probes(train, max_examples=config.data.probe_clips)
    truth = np.concatenate([clips[d]["mouth_open"] for d, _ in pairs])
    lengths = [len(clips[d]["driving"]) for d, _ in pairs]
    estimate = np.asarray(mouth_probe(reenacted), np.float64)
    metrics["mouth_correlation"] = float(talking_face.pearson(estimate, truth))
    metrics["mouth_pair_correlation"] = _mean_within(estimate, truth, lengths)
    driver_estimate = np.asarray(mouth_probe(driving), np.float64)
    metrics["mouth_probe_real_correlation"] = float(talking_face.pearson(driver_estimate, truth))
    metrics["mouth_probe_real_pair_correlation"] = _mean_within(driver_estimate, truth, lengths)
    if all("mouth_open" in c for c in clips):
      estimate = np.asarray(mouth_probe(reconstruction), np.float64)
      truth = np.concatenate([c["mouth_open"] for c in clips])
      lengths = [len(c["driving"]) for c in clips]
      metrics["reconstruction_mouth_correlation"] = float(talking_face.pearson(estimate, truth))
      metrics["reconstruction_mouth_clip_correlation"] = _mean_within(estimate, truth, lengths)
  return metrics


def _mean_within(estimate: np.ndarray, truth: np.ndarray, lengths: list[int]) -> float:
  """`talking_face.mean_pearson` over consecutive segments of `lengths` frames (one per clip or
  pair): how the frames follow the clip's changes, apart from its offset, which relative
  reenactment takes from the portrait, not the driver."""
  from fdjax.metrics import talking_face

  bounds = np.cumsum(lengths)[:-1]
  return talking_face.mean_pearson(np.split(estimate, bounds), np.split(truth, bounds))
