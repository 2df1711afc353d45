"""Stage 2 of the talking-head line: speech to stage-1 motion codes by diffusion (DAWN, JoyVASA,
AniTalker).

Task contract of `fdjax/tasks/__init__.py` over talking-face video with speech (`hdtf`, or any
builder with `video [T, S, S, 3]` and `audio [T * sr / fps]`):

- model: `fdjax.models.audio2motion.TalkingHeadMotion`: a wav2vec2/HuBERT encoder (a named size
  or a local HF directory, `config.model.encoder` as audio2mesh reads it), a transformer
  denoiser over code windows after the previous window's last frames (`config.model.decoder`,
  `MotionCodeDiffusion`), and the frozen stage-1 model of the run `config.model.motion_ae`
  (built from that run's config; its parameters merged under `motion_ae/` by `load_pretrained`
  and frozen by `optim.freeze`, which must cover `^motion_ae/`);
- loss: codes of the training windows are computed on the fly by stage 1 (no gradient); the
  denoiser's implied x_0 against them, plus `loss.velocity_weight` x their velocities, in the
  diffused units (codes times `sample_scale`), per example over the denoised frames;
- evaluation (`evaluate`): held-out clips sampled `data.eval_num_samples` times from their audio
  and their first frame; codes against stage 1's codes of the truth (and the static-reference
  baseline), diversity over samples; on data with per-frame ground truth (the twin) the frames
  rendered by stage 1 are read by the twin's mouth probe (`fdjax.metrics.talking_face`): Pearson
  correlation of the generated mouth opening with the truth and the audio-visual offset;
- predict (`fdjax export`): the sampler `(audio, reference, seed, guidance_scale) -> codes`
  beside stage 1's `portrait_code` and `render` (`export_functions`).

Config keys read (beyond the base config): `model.motion_ae`, `model.relative_motion`,
`model.encoder`, `model.decoder` (`variant` and MotionCodeDiffusion / TransformerDenoiser
fields), `loss.velocity_weight`, `loss.distance`, `data.name`, `data.builder_config`,
`data.train_split`, `data.eval_split`, `data.sample_rate`, `data.fps`, `data.window_frames`,
`data.eval_max_examples`, `data.eval_num_samples`, `data.probe_frames`, `data.av_max_lag`.
Design in docs/design.md section 23.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import video as video_ops
from fdjax import diffusion
from fdjax import step as step_lib
from fdjax.models.audio2motion import MotionCodeDiffusion, TalkingHeadMotion
from fdjax.state import strip_boxes
from fdjax.tasks import BATCH_DIM, ExportDim, _speech_mesh, import_task_module
from fdjax.tasks.audio2mesh import build_encoder
from fdjax.tasks.dfer import open_split

# Where the stage-1 parameters sit in this model's tree (frozen: `optim.freeze`).
MOTION_AE = "motion_ae"


# --- the stage-1 run --------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def stage1(workdir: str) -> tuple[nn.Module, Any, tuple[int, int], int]:
  """The stage-1 run at `workdir`: `(model, config, (H, W) of its frames, code width D)`, from
  its saved config alone (the model of its task's `build_model`; no checkpoint is read)."""
  from fdjax import config as config_lib

  if not workdir:
    raise ValueError(
      "config.model.motion_ae is empty: name the workdir of a trained face_motion_ae (stage 1) run"
    )
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.model.motion_ae={workdir}: no stage-1 run there ({path})")
  config = config_lib.load_json_config(path)
  task = import_task_module(config.task)
  model = task.build_model(config)
  # Its frame size: that of the images in its dummy batch (`[..., H, W, 3]`).
  batch = task.dummy_batch(config, 1)
  images = [np.shape(v) for v in batch.values() if np.ndim(v) >= 4 and np.shape(v)[-1] == 3]
  if not images:
    raise ValueError(f"{workdir}: its task {config.task!r} has no images in its dummy batch")
  height, width = images[0][-3:-1]
  image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)

  def code(image):
    variables = model.init(jax.random.key(0), image, method="encode_motion")
    return model.apply(variables, image, method="encode_motion")

  (_, code_width) = jax.eval_shape(code, image).shape
  return model, config, (int(height), int(width)), int(code_width)


def load_stage1_params(workdir: str) -> Any:
  """The stage-1 run's parameters (its EMA when it keeps one), by its task's `load`."""
  _, config, _, _ = stage1(workdir)
  _, params, _ = import_task_module(config.task).load(workdir)
  return strip_boxes(jax.device_get(params))


# --- model and data ---------------------------------------------------------------------------


def build_model(config: Any) -> TalkingHeadMotion:
  dec = config.model.decoder
  motion_ae, _, _, code_width = stage1(config.model.motion_ae)
  fields = _speech_mesh.module_fields(dec, "variant")
  fields.update(
    motion_width=code_width,
    num_styles=0,
    dtype=step_lib.resolve_compute_dtype(config.precision.compute_dtype),
    attention_impl=config.precision.attention_impl,
  )
  return TalkingHeadMotion(
    encoder=build_encoder(config),
    decoder=MotionCodeDiffusion.from_variant(dec.variant, **fields),
    motion_ae=motion_ae,
    sample_rate=config.data.sample_rate,
    fps=config.data.fps,
    relative_motion=config.model.relative_motion,
  )


def check_frozen(config: Any) -> None:
  """Stage 1 must stay as it was trained: its parameters frozen (else weight decay and the
  EMA would still move them)."""
  probe = f"{MOTION_AE}/encoder/kernel"
  if not any(re.search(pattern, probe) for pattern in config.optim.freeze):
    raise ValueError(
      f"config.optim.freeze={tuple(config.optim.freeze)} does not freeze the stage-1 model: "
      f"add '^{MOTION_AE}/'"
    )


def _image_size(config: Any) -> tuple[int, int]:
  return stage1(config.model.motion_ae)[2]


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  frames = config.data.window_frames
  height, width = _image_size(config)
  return {
    "video": np.zeros((batch_size, frames, height, width, 3), np.uint8),
    "audio": np.zeros((batch_size, _speech_mesh.window_samples(config, frames)), np.float32),
    "audio_mask": np.ones((batch_size, _speech_mesh.window_samples(config, frames)), bool),
    "frame_mask": np.ones((batch_size, frames), bool),
  }


def clip_window(
  example: dict,
  start: int,
  num_frames: int,
  *,
  sample_rate: int,
  fps: float,
  image_size: tuple[int, int],
) -> dict[str, np.ndarray]:
  """Frames `[start, start + num_frames)` of a clip with their audio (normalised over the
  window), padded at the end and masked where the clip is shorter."""
  video = np.asarray(example["video"])
  total = video.shape[0]  # this window's frames (`num_frames` may count the whole clip)
  frames = video[start : min(start + num_frames, total)]
  if frames.shape[1:3] != tuple(image_size):
    frames = resize_frames(frames, image_size)
  valid = frames.shape[0]
  first = audio_ops.frame_start_sample(start, sample_rate, fps)
  last = audio_ops.frame_start_sample(start + valid, sample_rate, fps)
  audio = audio_ops.normalize(np.asarray(example["audio"], np.float32)[first:last])
  samples = audio_ops.frame_start_sample(num_frames, sample_rate, fps)
  window = {
    "video": np.pad(frames, ((0, num_frames - valid), (0, 0), (0, 0), (0, 0))),
    "audio": np.pad(audio, (0, samples - audio.shape[0])),
    "audio_mask": np.arange(samples) < audio.shape[0],
    "frame_mask": np.arange(num_frames) < valid,
  }
  return window


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 frames `[N, H, W, 3]` -> their centred square resized to `size` (square), as the
  stage-1 task resizes its frames."""
  if size[0] != size[1]:
    raise ValueError(f"the stage-1 frames are {size[0]} x {size[1]}: only square frames resize")
  box = video_ops.center_square_box(*frames.shape[1:3])
  return video_ops.crop_and_resize(frames, box, size[0])


def _train_transform(example, rng, *, num_frames, **options):
  total = len(example["video"])
  start = int(rng.integers(0, max(total - num_frames, 0) + 1))
  return clip_window(example, start, num_frames, **options)


def _window_options(config: Any) -> dict:
  return {
    "sample_rate": config.data.sample_rate,
    "fps": config.data.fps,
    "image_size": _image_size(config),
  }


def train_data(config: Any, *, process_index: int, process_count: int):
  """Random windows of `data.window_frames` frames (the previous frames then the window) of
  the training clips, with their audio."""
  transform = functools.partial(
    _train_transform, num_frames=config.data.window_frames, **_window_options(config)
  )
  return pipeline.train_dataset(
    open_split(config, config.data.train_split),
    transform,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    shuffle=config.data.shuffle,
  )


# --- weights ----------------------------------------------------------------------------------


def load_pretrained(config: Any, params: dict) -> dict:
  """The stage-1 run's parameters under `motion_ae/` (every leaf the model uses, same shapes;
  what only stage-1 training uses, such as its discriminator, is left out), and the audio
  encoder's from `model.encoder.checkpoint` when given."""
  from flax import traverse_util

  from fdjax import pretrained

  check_frozen(config)
  source = traverse_util.flatten_dict(load_stage1_params(config.model.motion_ae), sep="/")
  target = traverse_util.flatten_dict(params[MOTION_AE], sep="/")
  merged = {}
  for path, leaf in target.items():
    if path not in source or np.shape(source[path]) != np.shape(leaf):
      found = np.shape(source[path]) if path in source else "nothing"
      raise ValueError(
        f"config.model.motion_ae={config.model.motion_ae}: stage-1 parameter {path} of shape "
        f"{np.shape(leaf)} expected, found {found}"
      )
    merged[path] = np.asarray(source[path], np.float32)
  params = {**params, MOTION_AE: traverse_util.unflatten_dict(merged, sep="/")}
  if config.model.encoder.checkpoint:
    spec = pretrained.InitFrom(config.model.encoder.checkpoint, "", "encoder")
    params = pretrained.merge_specs(params, [spec], where="config.model.encoder.checkpoint")
  return params


# --- loss -------------------------------------------------------------------------------------


def make_loss_fn(config: Any):
  check_frozen(config)
  return functools.partial(
    _loss,
    velocity_weight=config.loss.velocity_weight,
    distance=config.loss.distance,
    scale=config.model.decoder.sample_scale,
  )


def _loss(model, params, batch, rng, train, *, velocity_weight, distance, scale):
  """Code + `velocity_weight` x velocity distance of the implied x_0 (in the diffused units)
  over the frames the decoder scores; noise, timesteps and condition drops from `rng`."""
  predicted, aux = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  truth = aux["codes"] * scale
  predicted = predicted * scale
  weight = aux["loss_weight"]
  code = diffusion.denoising_loss(predicted, truth, aux["loss_mask"], weight, distance=distance)
  velocity = diffusion.denoising_loss(
    jnp.diff(predicted, axis=1),
    jnp.diff(truth, axis=1),
    aux["velocity_mask"],
    weight,
    distance=distance,
  )
  loss = code + velocity_weight * velocity  # [B]
  metrics = {
    "code_loss": code.mean(),
    "velocity_loss": velocity.mean(),
    "weight": jnp.asarray(predicted.shape[0], jnp.float32),
  }
  return loss.mean(), metrics


# --- sampling, rendering, evaluation ------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "num_frames"))
def sample_codes(model, params, audio, reference, seed, guidance_scale, num_frames):
  """Codes `[B, T, D]` sampled for `audio [B, S]` after `reference [B, D]`, example b from
  `seed[b]`, guided by `guidance_scale [B]`."""
  return model.apply(
    {"params": params},
    audio,
    reference,
    num_frames=num_frames,
    seed=seed,
    guidance_scale=guidance_scale,
    method="generate",
  )


@functools.partial(jax.jit, static_argnames=("model",))
def stage1_codes(model, params, video):
  """Stage 1's codes `[B, T, D]` of `video [B, T, H, W, 3]`."""
  return model.apply({"params": params}, video, method="motion_codes")


@functools.partial(jax.jit, static_argnames=("model",))
def render_codes(model, params, portrait, codes):
  """Frames `[B, T, H, W, 3]` in [0, 1]: `codes [B, T, D]` rendered on `portrait [B, H, W, 3]`'s
  appearance."""

  def render(params):
    appearance, _ = model.apply({"params": params}, portrait, method="encode_portrait")
    batch_size, num_frames, width = codes.shape

    def one(code):  # [B, D] -> [B, H, W, 3]
      return model.apply({"params": params}, appearance, code, method="render")

    frames = jax.lax.map(one, jnp.swapaxes(codes, 0, 1))  # [T, B, H, W, 3]
    return jnp.swapaxes(frames, 0, 1)

  return render(params)


@functools.partial(jax.jit, static_argnames=("model",))
def portrait_code(model, params, portrait):
  """The stage-1 code `[B, D]` of `portrait [B, H, W, 3]` (the sampler's reference)."""
  return model.apply({"params": params}, portrait, method="encode_portrait")[1]


def _to_uint8(frames) -> np.ndarray:
  return np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict[str, float]:
  """Held-out clips (`data.eval_split`, the first `data.eval_max_examples`), each sampled
  `data.eval_num_samples` times (sample n from seed `decoder.sample_seed + n`) from its audio,
  after its first frame's code. Always: `code_mse` (sample 0 against stage 1's codes of the
  true frames, in the diffused units), the `static_reference/code_mse` baseline (every frame
  the first), `diversity` (per frame and code dimension the standard deviation over samples,
  averaged; diffused units). Where the data has ground truth (`has_ground_truth`, the twin):
  frames rendered by stage 1 from the first frame are read by the twin's mouth probe (fitted on
  `data.probe_frames` training frames) and `mouth_correlation` (mean over clips of the Pearson
  correlation of the generated mouth opening with the truth), `av_offset_frames` (the lag
  maximising it, clips pooled, within `data.av_max_lag`; positive: generated late) are
  reported, with the same for the probe on the true frames (`truth/...`: the probe's ceiling)
  and on stage 1's reconstruction (`reconstruction/...`: stage 1's); and, apart from stage 1's
  rendering, for a linear probe from stage 1's codes to the opening (`_fit_mouth_probe`) on the
  sampled codes (`code/...`) and on stage 1's codes of the true frames (`truth_code/...`: that
  probe's ceiling)."""
  del mesh, rules, workdir, step
  source = open_split(config, config.data.eval_split)
  limit = min(config.data.eval_max_examples or len(source), len(source))
  examples = [source[i] for i in range(limit)]
  scale = config.model.decoder.sample_scale
  num_samples = config.data.eval_num_samples
  if num_samples < 1:
    raise ValueError(f"config.data.eval_num_samples must be >= 1, got {num_samples}")
  seed0 = config.model.decoder.sample_seed
  options = _window_options(config)
  squared, static, spread, counted = [], [], [], 0
  has_truth = all(bool(e.get("has_ground_truth", False)) for e in examples)
  probe, code_probe = _fit_mouth_probe(config, model, params) if has_truth else (None, None)
  # Per source of frames (or codes): the probes' mouth opening of each clip; the true openings.
  mouth: dict[str, list[np.ndarray]] = {
    "": [],
    "truth/": [],
    "reconstruction/": [],
    "code/": [],
    "truth_code/": [],
  }
  true_mouth: list[np.ndarray] = []
  for example in examples:
    total = len(example["video"])
    clip = clip_window(example, 0, total, **options)
    video = clip["video"][None]
    truth = np.asarray(stage1_codes(model, params, video))[0]  # [T, D]
    reference = truth[:1]
    audio = clip["audio"][None]
    samples = np.stack(
      [
        np.asarray(
          sample_codes(
            model,
            params,
            audio,
            reference,
            np.asarray([seed0 + n], np.int32),
            np.asarray([config.model.decoder.audio_guidance_scale], np.float32),
            total,
          )
        )[0]
        for n in range(num_samples)
      ]
    )  # [N, T, D]
    squared.append(((samples[0] - truth) * scale) ** 2)
    static.append(((reference - truth) * scale) ** 2)
    spread.append(samples.std(axis=0) * scale)
    counted += total
    if probe is not None:
      portrait = clip["video"][:1]
      generated = _to_uint8(render_codes(model, params, portrait, samples[:1]))[0]
      rebuilt = _to_uint8(render_codes(model, params, portrait, truth[None]))[0]
      reference_mouth = np.asarray(example["mouth_open"], np.float32)[:total]
      for prefix, frames in (
        ("", generated),
        ("truth/", clip["video"]),
        ("reconstruction/", rebuilt),
      ):
        mouth[prefix].append(np.asarray(probe(frames), np.float64))
      mouth["code/"].append(code_probe(samples[0]))
      mouth["truth_code/"].append(code_probe(truth))
      true_mouth.append(reference_mouth.astype(np.float64))
  metrics = {
    "code_mse": float(np.concatenate(squared).mean()),
    "static_reference/code_mse": float(np.concatenate(static).mean()),
    "diversity": float(np.concatenate(spread).mean()),
    "num_clips": float(len(examples)),
    "num_frames": float(counted),
    "num_samples": float(num_samples),
  }
  if probe is not None:
    from fdjax.metrics import talking_face

    for prefix, estimates in mouth.items():
      lag, _ = talking_face.av_offset(estimates, true_mouth, config.data.av_max_lag)
      metrics[f"{prefix}mouth_correlation"] = talking_face.mean_pearson(estimates, true_mouth)
      metrics[f"{prefix}av_offset_frames"] = float(lag)
  return metrics


def _fit_mouth_probe(config: Any, model: TalkingHeadMotion, params: Any):
  """The twin's mouth probe fitted on up to `data.probe_frames` frames of the training split
  (evenly over its clips), and the code probe (`talking_face.fit_code_probe`) on stage 1's
  codes of the same frames."""
  from fdjax.metrics import talking_face

  source = open_split(config, config.data.train_split)
  per_clip = max(1, config.data.probe_frames // max(len(source), 1))
  frames, targets, codes = [], [], []
  for index in range(len(source)):
    example = source[index]
    total = len(example["video"])
    chosen = np.linspace(0, total - 1, min(per_clip, total)).round().astype(int)
    video = np.asarray(example["video"])[chosen]
    size = _image_size(config)
    video = video if video.shape[1:3] == size else resize_frames(video, size)
    frames.append(video)
    targets.append(np.asarray(example["mouth_open"], np.float32)[chosen])
    codes.append(np.asarray(stage1_codes(model, params, video[None]))[0])  # [n, D]
    if sum(len(t) for t in targets) >= config.data.probe_frames:
      break
  probe = talking_face.fit_mouth_probe(np.concatenate(frames), np.concatenate(targets))
  return probe, talking_face.fit_code_probe(codes, targets)


# --- export -----------------------------------------------------------------------------------


def predict_fn(config: Any, model: TalkingHeadMotion):
  """`predict(params, audio [b, s], reference [b, D], seed [b], guidance_scale [b]) -> codes
  [b, t, D]`: the whole sampler (the audio encoded once, then the windows, each the decoder's
  `sampling_steps` steps, fixed at export). Windowed sampling scans over a whole number of
  windows, so t (and s from it) is fixed at export (`--time`) when the decoder samples in
  windows."""
  code_width = stage1(config.model.motion_ae)[3]

  def predict(params, audio, reference, seed, guidance_scale):
    num_frames = _speech_mesh_frames(audio.shape[1], config)
    return sample_codes(model, params, audio, reference, seed, guidance_scale, num_frames)

  specs = {
    "audio": ("b, s", "float32"),
    "reference": (f"b, {code_width}", "float32"),
    "seed": ("b", "int32"),
    "guidance_scale": ("b", "float32"),
  }
  return predict, specs


def _speech_mesh_frames(samples, config):
  from fdjax.models.audio2mesh import frames_in

  return frames_in(samples, config.data.sample_rate, config.data.fps)


def export_functions(config: Any, model: TalkingHeadMotion) -> dict:
  """Stage 1's functions beside the sampler: `portrait_code(portrait [b, H, W, 3]) -> [b, D]`
  (the sampler's reference) and `render(portrait [b, H, W, 3], codes [b, t, D]) -> frames
  [b, t, H, W, 3]` (float in [0, 1]); portraits are float in [0, 1]."""
  height, width = _image_size(config)
  code_width = stage1(config.model.motion_ae)[3]
  portrait = (f"b, {height}, {width}, 3", "float32")
  return {
    "portrait_code": (
      lambda params, portrait: portrait_code.__wrapped__(model, params, portrait),
      {"portrait": portrait},
    ),
    "render": (
      lambda params, portrait, codes: render_codes.__wrapped__(model, params, portrait, codes),
      {"portrait": portrait, "codes": (f"b, t, {code_width}", "float32")},
    ),
  }


def export_dims(config: Any) -> list[ExportDim]:
  """`b` by `--batch`, `t` (video frames) by `--time`, `s` (audio samples) from `t`."""

  def samples(sizes):
    return audio_ops.frame_start_sample(sizes["t"], config.data.sample_rate, config.data.fps)

  return [
    BATCH_DIM,
    ExportDim("t", "--time", "video frames, or a dim name (default: symbolic)"),
    ExportDim("s", help="audio samples", derive=samples, needs=("t",)),
  ]


def export_metadata(config: Any) -> dict:
  dec = config.model.decoder
  height, width = _image_size(config)
  return {
    "sample_rate": config.data.sample_rate,
    "fps": config.data.fps,
    "image_size": [height, width],
    "code_width": stage1(config.model.motion_ae)[3],
    "relative_motion": bool(config.model.relative_motion),
    "audio": "mono waveform at sample_rate, zero mean and unit variance over the clip",
    "sampler": {
      "method": dec.sampling_method,
      "steps": dec.sampling_steps,
      "window_frames": dec.window_frames,
      "previous_frames": dec.previous_frames,
      "seed": "per example: the sample of example i is a function of seed[i]",
    },
  }


def export_defaults(config: Any) -> dict[str, np.ndarray]:
  dec = config.model.decoder
  return {
    "seed": np.int32(dec.sample_seed),
    "guidance_scale": np.float32(dec.audio_guidance_scale),
  }
