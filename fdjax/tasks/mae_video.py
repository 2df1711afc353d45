"""Self-supervised masked-autoencoder pretraining on face video (VideoMAE, MARLIN, MAE-DFER).

A clip's tubelet tokens are masked (`fdjax.masking`, drawn inside the loss on device from
per-example keys, so the input pipeline only delivers clips), `fdjax.models.video_mae.VideoMAE`
encodes the visible ones and predicts the masked ones, and the loss is the mean squared error on
the masked tubelets. Task contract: `fdjax/tasks/__init__.py`; docs/design.md has the section.

- masking (`config.mask`): `kind` random | tube | frame | part_window | face_region, `ratio`,
  `window` (part_window's token windows). face_region (MARLIN's fasking) reads each clip's
  per-pixel face-part map `face_parts` [B, T, H, W] uint8 from the batch;
- targets (`config.loss`): `target` = "pixels" (RGB in [0, 1]), "normalized_pixels" (each
  tubelet patch normalised per channel by its own mean and std, VideoMAE's norm_pix_loss) or
  "mean_subtracted_pixels" (RGB in [0, 1] minus the clip's mean frame: the target that goes
  with `config.model.subtract_mean_frame`, whose encoder never sees that mean; that option
  takes only masks that hide a position in all frames or none, `TUBE_KINDS`, since the mean
  frame would otherwise carry masked pixels into visible tokens);
  `frame_difference_weight` w > 0 adds MAE-DFER's motion target, the difference of each frame
  to the previous one (zero for the first; in [-1, 1], not normalised) predicted by a second
  head, the loss then being (1 - w) appearance + w motion; `adversarial_weight` > 0 adds
  MARLIN's adversarial term: a patch discriminator (`config.model.discriminator_width`) trained
  in the same step on real against reconstructed masked tubelets, the generator term weighted
  by `adversarial_weight` (the adversarial pattern of `fdjax/tasks/__init__.py`);
- data: `config.data.name` names a TFDS video builder whose examples carry `video` [T, S, S, 3]
  (and `face_parts` [T, S, S] for face_region): `voxceleb2`, or any labelled video twin such as
  `dfew` whose labels are ignored. Training takes `num_frames` frames `frame_stride` apart from
  a random start, one random resized crop and a flip per clip (the same for `face_parts`,
  resized nearest); evaluation the centred window and crop;
- evaluation: the reconstruction MSE on masked tubelets over `config.data.eval_split` (at most
  `data.eval_max_examples` clips, fixed masks per clip so steps compare), and a PNG strip of the
  first clip (rows: masked input, reconstruction, truth) in `<workdir>/reconstructions/` and
  `<workdir>/reconstruction.png`, and as an image in TensorBoard (`eval/reconstruction`).

The EMA of `config.ema` comes from the trainer like every task's. Pretrained encoders load into
`fdjax.models.video_mae.VideoViTClassifier` by their `encoder` parameter subtree.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import pipeline
from data_pipelines.ops import video as video_ops
from fdjax import masking
from fdjax import sharding as sharding_lib
from fdjax import step as step_lib
from fdjax.models.video_mae import VideoMAE, gather_tokens, video_mae_model
from fdjax.tasks.dfer import _transformer_flops, open_split, split_name

Array = jax.Array

TARGETS = ("pixels", "normalized_pixels", "mean_subtracted_pixels")
# Keys of `config.model` that configure the task rather than the module's fields.
TASK_MODEL_KEYS = ("variant", "init_from")
# Mask kinds that mask a spatial position in every frame of the clip or in none.
TUBE_KINDS = ("tube", "part_window", "face_region")


# ----------------------------------------------------------------------------------------------
# Model.


def build_model(config: Any) -> VideoMAE:
  """`VideoMAE` of `config.model.variant` with the other `config.model` keys as fields."""
  fields = {k: v for k, v in dict(config.model).items() if k not in TASK_MODEL_KEYS}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if config.loss.adversarial_weight > 0 and not fields.get("discriminator_width"):
    raise ValueError(
      "config.loss.adversarial_weight > 0 needs a discriminator: set "
      "config.model.discriminator_width > 0"
    )
  if fields.get("subtract_mean_frame") and config.mask.kind not in TUBE_KINDS:
    # The mean frame mixes every frame's pixels at a position into each visible token there:
    # with masks that hide some frames of a position and not others it reveals the hidden ones.
    raise ValueError(
      f"config.model.subtract_mean_frame=True with config.mask.kind={config.mask.kind!r}: the "
      "clip's mean frame would carry the masked tubelets' pixels into the visible ones; use a "
      f"mask that hides a position in all frames or none, one of {TUBE_KINDS}"
    )
  fields["frame_difference"] = config.loss.frame_difference_weight > 0
  fields["attention_impl"] = config.precision.attention_impl
  fields["dtype"] = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  return video_mae_model(config.model.variant, **fields)


def token_grid(config: Any, model: VideoMAE) -> tuple[int, int, int]:
  return model.encoder.grid(config.data.num_frames)


def needs_face_parts(config: Any) -> bool:
  return config.mask.kind == "face_region"


def draw_masks(config: Any, model: VideoMAE, batch: dict, keys: Array) -> tuple[Array, Array]:
  """`(visible [B, K], masked [B, M])` token indices, clip i's mask drawn from `keys[i]`."""
  grid = model.encoder.grid(batch["video"].shape[1])
  kind, ratio, window = config.mask.kind, config.mask.ratio, tuple(config.mask.window)
  if kind != "face_region":
    return jax.vmap(lambda k: masking.make_mask(kind, k, grid, ratio, window=window))(keys)
  if "face_parts" not in batch:
    raise ValueError(
      f"config.mask.kind='face_region' needs the per-pixel face-part maps `face_parts` "
      f"[B, T, H, W] in the batch, and config.data.name={config.data.name!r} gives none "
      f"(batch keys: {sorted(batch)}); use a dataset with face parts (voxceleb2) or another "
      "mask kind"
    )
  enc = model.encoder

  def one(k, face_parts):
    parts = masking.token_face_parts(face_parts, enc.patch_size, enc.tubelet_size)
    return masking.make_mask(kind, k, grid, ratio, parts=parts)

  return jax.vmap(one)(keys, batch["face_parts"])


def init_fn(model: VideoMAE, rngs: dict, batch: dict) -> dict:
  """`model.init` on the batch's clips with half their tokens masked (the parameters do not
  depend on the count)."""
  video = batch["video"]
  grid = model.encoder.grid(video.shape[1])
  keys = jax.random.split(jax.random.key(0), video.shape[0])
  visible, masked = jax.vmap(lambda k: masking.random_mask(k, grid, 0.5))(keys)
  return model.init(rngs, video, visible, masked)


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  size = build_model(config).encoder.image_size
  frames = config.data.num_frames
  batch = {"video": np.zeros((batch_size, frames, size, size, 3), np.uint8)}  # [B, T, H, W, 3]
  if needs_face_parts(config):
    batch["face_parts"] = np.zeros((batch_size, frames, size, size), np.uint8)  # [B, T, H, W]
  return batch


# ----------------------------------------------------------------------------------------------
# Targets and loss.


def video_patches(video: Array, patch_size: int, tubelet_size: int) -> Array:
  """video [B, T, H, W, C] -> tubelet patches [B, N, tubelet * p * p * C] in token order
  (t, y, x) and value order (frame, row, column, channel)."""
  b, t, h, w, c = video.shape
  p, q = patch_size, tubelet_size
  x = video.reshape(b, t // q, q, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, T', h, w, q, p, p, C]
  return x.reshape(b, (t // q) * (h // p) * (w // p), q * p * p * c)


def normalize_patches(patches: Array, channels: int = 3, eps: float = 1e-6) -> Array:
  """Each patch [..., P] normalised per channel by its own mean and (unbiased) std."""
  x = patches.reshape(*patches.shape[:-1], -1, channels)
  mean = x.mean(axis=-2, keepdims=True)
  std = jnp.sqrt(x.var(axis=-2, keepdims=True, ddof=1))
  return ((x - mean) / (std + eps)).reshape(patches.shape)


def frame_differences(video: Array) -> Array:
  """[B, T, H, W, C] in [0, 1] -> each frame minus the previous one (zeros for the first)."""
  return jnp.concatenate([jnp.zeros_like(video[:, :1]), video[:, 1:] - video[:, :-1]], axis=1)


def mean_frame(video: Array) -> Array:
  """[B, T, H, W, C] -> the clip's mean frame [B, 1, H, W, C]."""
  return jnp.mean(video, axis=1, keepdims=True)


def targets(video: Array, model: VideoMAE, target: str) -> tuple[Array, Array]:
  """`(appearance [B, N, P], motion [B, N, P])` targets of every tubelet of `video` uint8."""
  if target not in TARGETS:
    raise ValueError(f"config.loss.target={target!r}: expected one of {TARGETS}")
  enc = model.encoder
  pixels = video.astype(jnp.float32) / 255.0
  if target == "mean_subtracted_pixels":
    appearance = video_patches(pixels - mean_frame(pixels), enc.patch_size, enc.tubelet_size)
  else:
    appearance = video_patches(pixels, enc.patch_size, enc.tubelet_size)
  if target == "normalized_pixels":
    appearance = normalize_patches(appearance)
  motion = video_patches(frame_differences(pixels), enc.patch_size, enc.tubelet_size)
  return appearance, motion


def make_loss_fn(config: Any):
  """The masked reconstruction loss of `config.mask` and `config.loss` (module docstring)."""
  if config.mask.kind not in masking.KINDS:
    raise ValueError(f"config.mask.kind={config.mask.kind!r}: expected one of {masking.KINDS}")
  return functools.partial(_loss, config=config)


def _loss(model, params, batch, rng, train, *, config):
  video = batch["video"]
  keys = jax.random.split(jax.random.fold_in(rng, 0), video.shape[0])
  visible, masked = draw_masks(config, model, batch, keys)
  pixels, aux = model.apply(
    {"params": params}, video, visible, masked, method=VideoMAE.reconstruct
  )  # [B, M, P]
  appearance, motion = targets(video, model, config.loss.target)
  truth = gather_tokens(appearance, masked)  # [B, M, P]
  reconstruction = jnp.mean(jnp.square(pixels - truth))
  metrics = {"reconstruction_loss": reconstruction}
  loss = reconstruction
  weight = config.loss.frame_difference_weight
  if weight > 0:
    motion_loss = jnp.mean(jnp.square(aux["motion"] - gather_tokens(motion, masked)))
    metrics["motion_loss"] = motion_loss
    loss = (1.0 - weight) * reconstruction + weight * motion_loss
  if config.loss.adversarial_weight > 0:
    generator, discriminator = adversarial_losses(model, params, pixels, truth)
    metrics.update(generator_loss=generator, discriminator_loss=discriminator)
    loss = loss + config.loss.adversarial_weight * generator + discriminator
  return loss, metrics


def adversarial_losses(model, params, fake: Array, real: Array) -> tuple[Array, Array]:
  """`(generator_loss, discriminator_loss)` (non-saturating), each stopping the other network's
  gradient: the generator's sees the discriminator's parameters frozen, the discriminator's
  the reconstruction `fake` [B, M, P] frozen; `real` [B, M, P] are the true masked tubelets."""
  score = lambda p, x: model.apply({"params": p}, x, method=VideoMAE.discriminate)
  frozen = {**params, "discriminator": jax.lax.stop_gradient(params["discriminator"])}
  generator = jnp.mean(jax.nn.softplus(-score(frozen, fake)))
  discriminator = jnp.mean(jax.nn.softplus(-score(params, jax.lax.stop_gradient(real))))
  discriminator += jnp.mean(jax.nn.softplus(score(params, jax.lax.stop_gradient(fake))))
  return generator, discriminator


# ----------------------------------------------------------------------------------------------
# FLOPs.


def flops_per_example(config: Any) -> float:
  """Training FLOPs of one clip (3x the forward matmul FLOPs, 2 per multiply-add).

  Forward: the tubelet embedding of all N tokens, the encoder blocks over the K visible tokens,
  the projection to the decoder, the decoder blocks over all N tokens, the pixel head (and the
  motion head) over the M masked tokens, and the discriminator's two layers on 3 x M patches
  (the reconstruction twice, the truth once). Norms, softmax and activations are left out.
  """
  model = build_model(config)
  enc = model.encoder
  grid = token_grid(config, model)
  n = int(np.prod(grid))
  m = masking.num_masked(config.mask.kind, grid, config.mask.ratio, tuple(config.mask.window))
  k = n - m
  values = model.patch_values
  forward = 2 * n * values * enc.width
  forward += _transformer_flops(k, enc.width, enc.mlp_dim, enc.depth)
  forward += 2 * k * enc.width * model.decoder_width
  forward += _transformer_flops(n, model.decoder_width, model.decoder_mlp_dim, model.decoder_depth)
  heads = 2 if model.frame_difference else 1
  forward += heads * 2 * m * model.decoder_width * values
  if model.discriminator_width:
    forward += 3 * 2 * m * (values * model.discriminator_width + model.discriminator_width)
  return 3.0 * forward


# ----------------------------------------------------------------------------------------------
# Data.


def _frame_indices(stored: int, num_frames: int, stride: int, rng: np.random.Generator | None):
  """`num_frames` indices `stride` apart from a random (training) or centred (evaluation) start,
  repeating the last frame where the clip is too short."""
  span = (num_frames - 1) * stride + 1
  room = max(stored - span, 0)
  start = room // 2 if rng is None else int(rng.integers(room + 1))
  return np.minimum(start + stride * np.arange(num_frames), stored - 1)


def _crop_parts(parts: np.ndarray, box, size: int, flip: bool) -> np.ndarray:
  """Face-part maps [T, S, S] cropped and resized like the frames, by nearest neighbour."""
  from PIL import Image

  rgb = np.repeat(parts[..., None], 3, axis=-1)
  return video_ops.crop_and_resize(rgb, box, size, resample=Image.NEAREST, flip=flip)[..., 0]


def pretrain_transform(
  example: dict,
  rng: np.random.Generator | None,
  *,
  num_frames: int,
  frame_stride: int,
  image_size: int,
  scale: tuple[float, float] = (1.0, 1.0),
  ratio: tuple[float, float] = (1.0, 1.0),
  flip_prob: float = 0.0,
  crop_fraction: float = 1.0,
  face_parts: bool = False,
) -> dict[str, np.ndarray]:
  """One clip for pretraining: `{"video": uint8 [T, H, W, 3]}` (plus `face_parts` uint8
  [T, H, W] when asked). `rng` None: evaluation (centred window and crop, no flip)."""
  video = np.asarray(example["video"])  # [T_stored, S, S, 3]
  if len(video) == 0:
    raise ValueError(f"example {example.get('key', '?')!r} has no frames")
  indices = _frame_indices(len(video), num_frames, frame_stride, rng)
  frames = video[indices]
  if rng is None:
    box, flip = video_ops.center_square_box(*frames.shape[1:3], crop_fraction), False
  else:
    box = video_ops.random_resized_crop_box(*frames.shape[1:3], rng, scale, ratio)
    flip = bool(rng.random() < flip_prob)
  out = {"video": video_ops.crop_and_resize(frames, box, image_size, flip=flip)}
  if face_parts:
    if "face_parts" not in example:
      raise ValueError(
        "config.mask.kind='face_region' needs `face_parts` [T, H, W] in every example; this "
        f"dataset's examples have {sorted(example)}"
      )
    parts = np.asarray(example["face_parts"])
    if not example.get("has_face_parts", True) or len(parts) != len(video):
      raise ValueError(
        f"example {example.get('key', '?')!r} has no face-part map (`face_parts` of "
        f"{len(parts)} frames for {len(video)} video frames): config.mask.kind='face_region' "
        "needs one per frame; real VoxCeleb2 clips carry none, so mask them with 'tube' or "
        "'part_window', or add parts maps (`<clip>.parts.npz`) beside the clips"
      )
    parts = parts[indices]
    out["face_parts"] = _crop_parts(parts, box, image_size, flip)
  return out


def _transform_options(config: Any, model: VideoMAE) -> dict:
  return dict(
    num_frames=config.data.num_frames,
    frame_stride=config.data.frame_stride,
    image_size=model.encoder.image_size,
    face_parts=needs_face_parts(config),
  )


def train_data(config: Any, *, process_index: int, process_count: int):
  """The endless stream of training clips (labels and other fields dropped)."""
  model = build_model(config)
  source = open_split(config, split_name(config, "train"))
  augment = config.data.augment
  transform = functools.partial(
    pretrain_transform,
    scale=tuple(augment.scale),
    ratio=tuple(augment.ratio),
    flip_prob=augment.flip_prob,
    **_transform_options(config, model),
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


def eval_batches(config: Any, model: VideoMAE, multiple_of: int = 1):
  """The evaluation split's first `data.eval_max_examples` clips (0: all), centred, in batches
  of one fixed size padded with zeros; `mask` [B] marks the real clips, `index` [B] their
  position in the split."""
  source = open_split(config, split_name(config, "eval"))
  limit = config.data.eval_max_examples or len(source)
  examples = [source[i] for i in range(min(limit, len(source)))]
  transform = functools.partial(
    pretrain_transform, crop_fraction=config.data.crop_fraction, **_transform_options(config, model)
  )
  size = -(-config.data.eval_batch_size // multiple_of) * multiple_of
  for start in range(0, len(examples), size):
    clips = [transform(e, None) for e in examples[start : start + size]]
    batch = {k: np.stack([c[k] for c in clips]) for k in clips[0]}
    count = len(clips)
    batch = {
      k: np.concatenate([v, np.zeros((size - count, *v.shape[1:]), v.dtype)])
      for k, v in batch.items()
    }
    batch["mask"] = np.arange(size) < count
    batch["index"] = np.arange(start, start + size)
    yield batch


# ----------------------------------------------------------------------------------------------
# Evaluation.


@functools.lru_cache(maxsize=8)
def _eval_fn(model: VideoMAE, config: Any, mesh: jax.sharding.Mesh):
  """Jitted `(params, batch) -> (per-clip reconstruction MSE [B], pixels, visible, masked)`,
  replicated; clip i's mask is drawn from `key(seed)` folded with its index in the split."""

  def run(params, batch):
    base = jax.random.key(config.seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
    visible, masked = draw_masks(config, model, batch, keys)
    pixels, _ = model.apply(
      {"params": params}, batch["video"], visible, masked, method=VideoMAE.reconstruct
    )
    appearance, _ = targets(batch["video"], model, config.loss.target)
    per_clip = jnp.mean(jnp.square(pixels - gather_tokens(appearance, masked)), axis=(1, 2))
    return per_clip, pixels, visible, masked

  return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict:
  """Reconstruction MSE on the masked tubelets of the evaluation clips, and the PNG strip.

  Every process evaluates the same clips (each batch sharded over the devices), so all report
  the same numbers.
  """
  sharding = sharding_lib.batch_sharding(mesh, rules)
  run = _eval_fn(model, config, mesh)
  total, count, first = 0.0, 0, None
  for batch in eval_batches(config, model, sharding_lib.data_parallel_size(mesh, rules)):
    inputs = {k: v for k, v in batch.items() if k != "mask"}
    device = {
      k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
      for k, v in inputs.items()
    }
    per_clip, pixels, visible, masked = jax.device_get(run(params, device))
    total += float(np.sum(np.asarray(per_clip, np.float64) * batch["mask"]))
    count += int(batch["mask"].sum())
    if first is None:
      first = (batch["video"][0], pixels[0], visible[0], masked[0])
  if not count:
    raise ValueError(f"evaluation split {split_name(config, 'eval')!r} has no clips")
  metrics = {"reconstruction_loss": total / count, "num_examples": count}
  if jax.process_index() == 0 and workdir:
    strip = reconstruction_strip(config, model, *first)
    split = split_name(config, "eval")
    path = os.path.join(workdir, "reconstructions", f"{split}_step{step:07d}.png")
    save_png(strip, path)
    shutil.copyfile(path, os.path.join(workdir, "reconstruction.png"))
    _tensorboard_image(workdir, "eval/reconstruction", strip, step)
  return metrics


# ----------------------------------------------------------------------------------------------
# Reconstruction images.


def unpatch(patches: np.ndarray, grid: tuple[int, int, int], patch_size: int, tubelet_size: int):
  """Tubelet patches [N, q p p C] in token order -> video [T, H, W, C] (`video_patches`'s
  inverse for one clip)."""
  steps, h, w = grid
  p, q = patch_size, tubelet_size
  x = patches.reshape(steps, h, w, q, p, p, -1).transpose(0, 3, 1, 4, 2, 5, 6)
  return x.reshape(steps * q, h * p, w * p, -1)


def reconstruction_strip(
  config: Any,
  model: VideoMAE,
  video: np.ndarray,
  pixels: np.ndarray,
  visible: np.ndarray,
  masked: np.ndarray,
  max_frames: int = 8,
  min_side: int = 64,
) -> np.ndarray:
  """uint8 image [3 S, F S, 3] of one clip: masked input (hidden tubelets grey), the
  reconstruction (visible tubelets as given, masked ones predicted; normalised predictions
  are mapped back with the true patch's mean and std, as VideoMAE shows them, mean-subtracted
  ones by adding the clip's true mean frame), and the truth,
  for the first F = `max_frames` frames, each upscaled to at least `min_side` pixels."""
  enc = model.encoder
  grid = enc.grid(video.shape[0])
  truth = np.asarray(
    video_patches(jnp.asarray(video[None], jnp.float32) / 255.0, enc.patch_size, enc.tubelet_size)
  )[0]
  predicted = np.asarray(pixels, np.float32)
  if config.loss.target == "normalized_pixels":
    x = truth[masked].reshape(len(masked), -1, 3)
    mean, std = x.mean(1, keepdims=True), x.std(1, ddof=1, keepdims=True)
    predicted = (predicted.reshape(x.shape) * (std + 1e-6) + mean).reshape(len(masked), -1)
  if config.loss.target == "mean_subtracted_pixels":
    pixels = jnp.asarray(video[None], jnp.float32) / 255.0
    still = jnp.broadcast_to(mean_frame(pixels), pixels.shape)
    still = np.asarray(video_patches(still, enc.patch_size, enc.tubelet_size))[0]
    predicted = predicted + still[masked]
  shown_input = truth.copy()
  shown_input[masked] = 0.5
  reconstruction = truth.copy()
  reconstruction[masked] = np.clip(predicted, 0.0, 1.0)
  rows = [
    unpatch(r, grid, enc.patch_size, enc.tubelet_size) for r in (shown_input, reconstruction, truth)
  ]
  rows = [np.concatenate(list(r[:max_frames]), axis=1) for r in rows]  # [S, F S, 3] each
  image = np.concatenate(rows, axis=0)
  scale = max(1, -(-min_side // video.shape[1]))
  image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def _tensorboard_image(workdir: str, tag: str, image: np.ndarray, step: int) -> None:
  """Adds `image` [H, W, 3] uint8 to the run's TensorBoard directory (a second event file beside
  the trainer's scalars; TensorBoard reads them together)."""
  from tensorboardX import SummaryWriter

  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  writer.add_image(tag, image, int(step), dataformats="HWC")
  writer.close()
