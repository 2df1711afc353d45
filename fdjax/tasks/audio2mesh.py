"""Speech-driven 3D facial animation: audio in, per-frame mesh vertices out.

The task family of FaceFormer, CodeTalker, SelfTalk, EmoFace, EMOTE and their successors, on
VOCASET- and BIWI-layout data. It follows the task contract of `fdjax/tasks/__init__.py`:

- model: `SpeechToMesh` (wav2vec2/HuBERT encoder + FaceFormer, non-autoregressive or CodeTalker
  decoder), or `MotionAutoencoder` for CodeTalker's stage 1 (`config.model.decoder.kind`);
- loss: vertex MSE + velocity MSE (optionally lip-weighted), in millimetres so the numbers are
  readable and the optimizer's epsilon is negligible; plus the VQ losses for CodeTalker;
- evaluation: whole test sequences generated from audio alone, metrics of DESIGN section 5
  (LVE squared, LVE mm, FDD, MVE; masks named) for the model and for two baselines computed by
  the same code (static template; training-set mean offset);
- predict: `(params, audio, template, style) -> vertices` for any audio length.

Config keys read (beyond the base config): `data.name`, `data.fps`, `data.sample_rate`,
`data.window_frames`, `data.eval_split`, `data.eval_batch_size`, `data.eval_style`,
`data.lip_mask`, `data.upper_face_mask`, `data.{raw_dir,data_dir,synthetic,skip_invalid}`,
`model.encoder` (`variant`, `checkpoint`, fields), `model.decoder` (`kind`, `variant`, fields),
`model.prior_workdir` (CodeTalker stage 2), `loss.velocity_weight`, `loss.lip_weight`,
`loss.latent_weight`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import audio_mesh, pipeline, prepare
from fdjax import step as step_lib
from fdjax.metrics import mesh as mesh_metrics
from fdjax.models import losses
from fdjax.models.audio2mesh import MotionAutoencoder, SpeechToMesh
from fdjax.models.codetalker import CodePredictor, MotionVQVAE
from fdjax.models.motion_decoders import FaceFormerDecoder, NonAutoregressiveDecoder
from fdjax.models.wav2vec2 import Wav2Vec2Encoder
from fdjax.tasks import BATCH_DIM, ExportDim

MM_PER_METRE = 1000.0
DECODERS = {
  "faceformer": FaceFormerDecoder,
  "nonautoregressive": NonAutoregressiveDecoder,
  "codetalker": CodePredictor,
  "codetalker_vq": MotionVQVAE,
}
# Frames of evaluation batches are padded up to a multiple of this, to bound recompilation.
EVAL_FRAME_BUCKET = 32


def _fields(config_dict: Any, *drop: str) -> dict:
  fields = {k: v for k, v in dict(config_dict).items() if k not in drop}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def build_encoder(config: Any) -> Wav2Vec2Encoder:
  """The audio encoder: a named size, or the architecture of a local HF checkpoint."""
  from fdjax.models import hf_convert

  enc = config.model.encoder
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  fields = _fields(enc, "variant", "checkpoint")
  if enc.checkpoint:
    return Wav2Vec2Encoder.from_hf_config(
      hf_convert.read_hf_config(enc.checkpoint), dtype=dtype, **fields
    )
  return Wav2Vec2Encoder.from_variant(enc.variant, dtype=dtype, **fields)


def build_model(config: Any) -> nn.Module:
  dec = config.model.decoder
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  if dec.kind not in DECODERS:
    raise ValueError(f"config.model.decoder.kind={dec.kind!r}: expected one of {sorted(DECODERS)}")
  fields = _fields(dec, "kind", "variant", "prior")
  if dec.kind == "codetalker_vq":
    # Stage 1 reconstructs motion alone: the experiments' speaking-style count is not its field.
    fields.pop("num_styles", None)
    return MotionAutoencoder(prior=MotionVQVAE.from_variant(dec.variant, dtype=dtype, **fields))
  if dec.kind == "codetalker":
    prior = {**_fields(dec.prior), "dtype": dtype}
    decoder = CodePredictor.from_variant(dec.variant, prior=prior, dtype=dtype, **fields)
  else:
    decoder = DECODERS[dec.kind].from_variant(dec.variant, dtype=dtype, **fields)
  return SpeechToMesh(
    encoder=build_encoder(config),
    decoder=decoder,
    sample_rate=config.data.sample_rate,
    fps=config.data.fps,
  )


def _num_vertices(config: Any) -> int:
  model = build_model(config)
  module = model.prior if isinstance(model, MotionAutoencoder) else model.decoder
  return module.prior.num_vertices if isinstance(module, CodePredictor) else module.num_vertices


def _window_samples(config: Any, frames: int) -> int:
  return int(np.ceil(frames * config.data.sample_rate / config.data.fps))


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  frames = config.data.window_frames
  samples = _window_samples(config, frames)
  vertices = _num_vertices(config)
  batch = {
    "audio": np.zeros((batch_size, samples), np.float32),  # [B, S]
    "audio_mask": np.ones((batch_size, samples), bool),
    "vertices": np.zeros((batch_size, frames, vertices, 3), np.float32),  # [B, T, V, 3]
    "template": np.zeros((batch_size, vertices, 3), np.float32),  # [B, V, 3]
    "frame_mask": np.ones((batch_size, frames), bool),
    "subject": np.zeros((batch_size,), np.int32),
  }
  return batch


def load_pretrained(config: Any, params: dict) -> dict:
  """Parameters from local checkpoints: the HF audio encoder, the CodeTalker stage-1 prior."""
  params = dict(params)
  if config.model.decoder.kind != "codetalker_vq" and config.model.encoder.checkpoint:
    from fdjax.models import hf_convert

    _, encoder_params = hf_convert.load_wav2vec2(config.model.encoder.checkpoint)
    params["encoder"] = _replace_matching(params["encoder"], encoder_params, "encoder")
  if config.model.decoder.kind == "codetalker":
    if not config.model.prior_workdir:
      raise ValueError(
        "the codetalker variant needs config.model.prior_workdir: the workdir of a finished "
        "codetalker_vq (stage 1) run"
      )
    prior = _stage1_params(config.model.prior_workdir)
    decoder = dict(params["decoder"])
    decoder["prior"] = _replace_matching(decoder["prior"], prior, "decoder/prior")
    params["decoder"] = decoder
  return params


def _replace_matching(current: Any, loaded: Any, where: str) -> Any:
  """`loaded` placed like `current`, after checking the trees and shapes agree."""
  current_flat, treedef = jax.tree_util.tree_flatten_with_path(current)
  loaded_flat = dict(
    (jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]
  )
  leaves = []
  for path, leaf in current_flat:
    key = jax.tree_util.keystr(path)
    if key not in loaded_flat:
      raise ValueError(f"pretrained parameters for {where} lack {key}")
    value = np.asarray(loaded_flat.pop(key), leaf.dtype)
    if value.shape != leaf.shape:
      raise ValueError(f"{where}{key}: pretrained shape {value.shape}, model {leaf.shape}")
    leaves.append(value)
  if loaded_flat:
    raise ValueError(f"pretrained parameters for {where} have extra keys {sorted(loaded_flat)[:5]}")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _stage1_params(workdir: str) -> Any:
  from fdjax import config as config_lib
  from fdjax import trainer

  stage1 = config_lib.load_json_config(os.path.join(workdir, "config.json"))
  _, _, params, _ = trainer.restore_params(stage1, workdir)
  return jax.device_get(params["prior"])


def make_loss_fn(config: Any):
  """The loss for `config`: see the module docstring."""
  kind = config.model.decoder.kind
  lip_weights = None
  if config.loss.lip_weight != 1.0:
    raw_dir, _ = prepare.resolve_dirs(config.data)
    lips = mesh_metrics.load_region_mask(
      _mask_path(config, raw_dir, "lip_mask"), _num_vertices(config)
    )
    lip_weights = losses.region_weights(_num_vertices(config), lips.indices, config.loss.lip_weight)
  return functools.partial(
    _loss,
    kind=kind,
    velocity_weight=config.loss.velocity_weight,
    latent_weight=config.loss.latent_weight,
    lip_weights=None if lip_weights is None else jnp.asarray(lip_weights),
  )


def _loss(model, params, batch, rng, train, *, kind, velocity_weight, latent_weight, lip_weights):
  predicted, aux = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  frame_mask = batch["frame_mask"]
  predicted_mm = predicted * MM_PER_METRE
  truth_mm = batch["vertices"] * MM_PER_METRE
  vertex = losses.vertex_mse(predicted_mm, truth_mm, frame_mask, lip_weights)
  velocity = losses.velocity_mse(predicted_mm, truth_mm, frame_mask, lip_weights)
  loss = vertex + velocity_weight * velocity
  metrics = {"vertex_mse_mm2": vertex, "velocity_mse_mm2": velocity}
  if kind == "codetalker_vq":
    loss = loss + aux["vq_loss"]
    metrics.update(
      vq_loss=aux["vq_loss"],
      codebook_usage=aux["codebook_usage"],
      perplexity=aux["perplexity"],
    )
  if kind == "codetalker":
    latent = losses.latent_mse(aux["latents"], aux["target_latents"], frame_mask)
    loss = loss + latent_weight * latent
    metrics["latent_mse"] = latent
  metrics["weight"] = jnp.sum(frame_mask).astype(jnp.float32)
  return loss, metrics


def train_data(config: Any, *, process_index: int, process_count: int):
  _, data_dir = prepare.ensure_dataset(config.data)
  source = pipeline.tfds_source(config.data.name, data_dir, "train")
  transform = functools.partial(
    audio_mesh.train_window,
    window_frames=config.data.window_frames,
    fps=config.data.fps,
    sample_rate=config.data.sample_rate,
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


def _mask_path(config: Any, raw_dir: str, key: str) -> str:
  path = config.data[key]
  return path if os.path.isabs(path) else os.path.join(raw_dir, path)


def _bucket(batch: dict, config: Any) -> dict:
  """Pads frames to a multiple of EVAL_FRAME_BUCKET (and the audio to match)."""
  frames = batch["vertices"].shape[1]
  target = -(-frames // EVAL_FRAME_BUCKET) * EVAL_FRAME_BUCKET
  samples = _window_samples(config, target)
  pad_t, pad_s = target - frames, samples - batch["audio"].shape[1]
  out = dict(batch)
  out["vertices"] = np.concatenate(
    [batch["vertices"], np.repeat(batch["template"][:, None], pad_t, axis=1)], axis=1
  )
  out["frame_mask"] = np.pad(batch["frame_mask"], ((0, 0), (0, pad_t)))
  out["audio"] = np.pad(batch["audio"], ((0, 0), (0, max(pad_s, 0))))[:, :samples]
  out["audio_mask"] = np.pad(batch["audio_mask"], ((0, 0), (0, max(pad_s, 0))))[:, :samples]
  return out


@functools.partial(jax.jit, static_argnames=("model",))
def _generate(model, params, audio, audio_mask, frame_mask, template, style, emotion, intensity):
  predicted, _ = model.apply(
    {"params": params},
    audio,
    template,
    style,
    audio_mask=audio_mask,
    frame_mask=frame_mask,
    emotion=emotion,
    intensity=intensity,
    method="generate",
  )
  return predicted


@functools.partial(jax.jit, static_argnames=("model",))
def _reconstruct(model, params, vertices, template):
  return model.apply({"params": params}, vertices, template, method="generate")[0]


def training_mean_offset(config: Any, data_dir: str, workdir: str) -> np.ndarray:
  """The mean offset from the template over all training frames [V, 3], cached in workdir."""
  path = os.path.join(workdir, "mean_offset.npy")
  if os.path.exists(path):
    return np.load(path)
  source = pipeline.tfds_source(config.data.name, data_dir, "train")
  pairs = ((np.asarray(e["vertices"]), np.asarray(e["template"])) for e in source)
  offset = mesh_metrics.training_mean_offset(pairs).astype(np.float32)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    np.save(path, offset)
  return offset


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict[str, float]:
  """Metrics over whole sequences of `config.data.eval_split`, with both baselines.

  Every process evaluates the whole split (inputs replicated), so all report the same numbers.
  """
  raw_dir, data_dir = prepare.ensure_dataset(config.data)
  num_vertices = _num_vertices(config)
  lips = mesh_metrics.load_region_mask(_mask_path(config, raw_dir, "lip_mask"), num_vertices)
  upper = mesh_metrics.load_region_mask(
    _mask_path(config, raw_dir, "upper_face_mask"), num_vertices
  )
  accumulators = {
    name: mesh_metrics.MeshMetricsAccumulator(lips, upper)
    for name in ("model", "static_template", "mean_motion")
  }
  mean_offset = training_mean_offset(config, data_dir, workdir)
  source = pipeline.tfds_source(config.data.name, data_dir, config.data.eval_split)
  batches = pipeline.eval_dataset(
    source,
    functools.partial(
      audio_mesh.whole_sequence, fps=config.data.fps, sample_rate=config.data.sample_rate
    ),
    batch_size=config.data.eval_batch_size,
    batch_fn=audio_mesh.eval_batch,
  )
  replicated = NamedSharding(mesh, PartitionSpec())
  put = lambda x: None if x is None else jax.make_array_from_process_local_data(replicated, x)
  sample = None
  for batch in batches:
    batch = _bucket(batch, config)
    num_frames = batch["vertices"].shape[1]
    if config.model.decoder.kind == "codetalker_vq":
      predicted = _reconstruct(model, params, put(batch["vertices"]), put(batch["template"]))
    else:
      style = np.where(batch["subject"] >= 0, batch["subject"], config.data.eval_style)
      predicted = _generate(
        model,
        params,
        put(batch["audio"]),
        put(batch["audio_mask"]),
        put(batch["frame_mask"]),
        put(batch["template"]),
        put(style.astype(np.int32)),
        put(batch.get("emotion")),
        put(batch.get("intensity")),
      )
    predicted = np.asarray(jax.device_get(predicted), np.float32)  # [B, T, V, 3]
    truth, template, frame_mask = batch["vertices"], batch["template"], batch["frame_mask"]
    accumulators["model"].add_batch(predicted, truth, template, frame_mask)
    static = np.repeat(template[:, None], num_frames, axis=1)
    accumulators["static_template"].add_batch(static, truth, template, frame_mask)
    accumulators["mean_motion"].add_batch(static + mean_offset, truth, template, frame_mask)
    if sample is None:
      sample = (predicted[0], truth[0], batch["audio"][0], batch["audio_mask"][0], frame_mask[0])

  results = {name: acc.compute() for name, acc in accumulators.items()}
  metrics: dict[str, float] = {}
  for name, values in results.items():
    for metric in mesh_metrics.MeshMetricsAccumulator.METRIC_NAMES:
      key = metric if name == "model" else f"{name}/{metric}"
      metrics[key] = float(values[metric])
  if jax.process_index() == 0:
    _print_table(results, config.data.eval_split, step)
    _write_sample(workdir, raw_dir, config, sample)
    with open(os.path.join(workdir, "eval_masks.json"), "w") as f:
      json.dump({"lip_mask": lips.name, "upper_face_mask": upper.name}, f)
  return metrics


def _print_table(results: dict, split: str, step: int) -> None:
  model = results["model"]
  rows = [
    ("LVE squared (m^2)", "lve_squared", "{:.3e}"),
    ("LVE (mm)", "lve_mm", "{:.3f}"),
    ("FDD (m^2, signed)", "fdd", "{:+.3e}"),
    ("MVE (mm)", "mve_mm", "{:.3f}"),
  ]
  names = ("model", "static_template", "mean_motion")
  print(
    f"\n{split} split, step {step}: {model['num_sequences']} sequences, {model['num_frames']} "
    f"frames; lip mask {model['lip_mask']!r}, upper-face mask {model['upper_face_mask']!r}"
  )
  print(f"{'metric':<20}" + "".join(f"{n:>18}" for n in names))
  for label, key, fmt in rows:
    print(f"{label:<20}" + "".join(f"{fmt.format(results[n][key]):>18}" for n in names))
  print(flush=True)


def _write_sample(workdir: str, raw_dir: str, config: Any, sample) -> None:
  """One test sequence for rendering: prediction, truth, audio and the template mesh's faces."""
  import soundfile

  predicted, truth, audio, audio_mask, frame_mask = sample
  directory = os.path.join(workdir, "samples")
  os.makedirs(directory, exist_ok=True)
  frames = int(frame_mask.sum())
  np.save(os.path.join(directory, "sample_pred.npy"), predicted[:frames])
  np.save(os.path.join(directory, "sample_truth.npy"), truth[:frames])
  samples = int(audio_mask.sum())
  peak = max(float(np.abs(audio[:samples]).max()), 1e-6)
  soundfile.write(
    os.path.join(directory, "sample.wav"), audio[:samples] / peak * 0.9, config.data.sample_rate
  )
  for name in ("FLAME_sample.ply", "BIWI.ply"):
    if os.path.exists(os.path.join(raw_dir, name)):
      import shutil

      shutil.copy(os.path.join(raw_dir, name), os.path.join(directory, "faces.ply"))


def predict_fn(config: Any, model: nn.Module):
  """`predict(params, audio [b, s], template [b, V, 3], style [b]) -> vertices [b, t, V, 3]`."""
  num_vertices = _num_vertices(config)
  if config.model.decoder.kind == "codetalker_vq":

    def reconstruct(params, vertices, template):
      return model.apply({"params": params}, vertices, template, method="generate")[0]

    return reconstruct, {
      "vertices": (f"b, t, {num_vertices}, 3", "float32"),
      "template": (f"b, {num_vertices}, 3", "float32"),
    }

  def predict(params, audio, template, style):
    return model.apply({"params": params}, audio, template, style, method="generate")[0]

  return predict, {
    "audio": ("b, s", "float32"),
    "template": (f"b, {num_vertices}, 3", "float32"),
    "style": ("b", "int32"),
  }


def export_dims(config: Any) -> list[ExportDim]:
  """`b` by `--batch`, `t` (mesh frames) by `--time`, and `s` (audio samples) from `t` as
  `round(t * sample_rate / fps)`."""

  def samples(sizes: dict[str, int]) -> int:
    sample_rate, fps = config.data.get("sample_rate"), config.data.get("fps")
    if not (sample_rate and fps):
      raise ValueError("the config gives no sample_rate and fps to convert frames to samples")
    return round(sizes["t"] * sample_rate / fps)

  return [
    BATCH_DIM,
    ExportDim("t", "--time", "mesh frames, or a dim name (default: symbolic)"),
    ExportDim("s", help="audio samples", derive=samples, needs=("t",)),
  ]


def export_metadata(config: Any) -> dict:
  metadata = {
    "sample_rate": config.data.sample_rate,
    "fps": config.data.fps,
    "num_vertices": _num_vertices(config),
    "dataset": config.data.name,
    "train_subjects": list(config.data.train_subjects),
  }
  if config.model.decoder.kind != "codetalker_vq":
    metadata["audio_input"] = "audio"
    metadata["audio"] = "mono waveform at sample_rate, zero mean and unit variance over the clip"
  return metadata


def export_defaults(config: Any) -> dict[str, np.ndarray]:
  """What the server fills in when a request sends audio only: style 0 and its template."""
  if config.model.decoder.kind == "codetalker_vq":
    return {}
  _, data_dir = prepare.ensure_dataset(config.data)
  source = pipeline.tfds_source(config.data.name, data_dir, "train")
  first = next(e for e in source if int(e["subject"]) == 0)
  return {"template": np.asarray(first["template"], np.float32), "style": np.int32(0)}


def symbolic_constraints(config: Any) -> list[str]:
  """Symbolic audio must cover at least one encoder frame (and one mesh frame)."""
  if config.model.decoder.kind == "codetalker_vq":
    return ["t >= 1"]
  minimum = max(build_encoder(config).receptive_field, _window_samples(config, 1))
  return [f"s >= {minimum}"]


def flops_per_example(config: Any) -> float:
  """Training FLOPs of one window, counted analytically (for MFU).

  Counts the matmuls and convolutions, 2 FLOPs per multiply-add: the wav2vec2 encoder (conv
  stack over the window's samples; feature projection, positional conv and transformer over
  the frames they run at: the mesh frames for "interpolate" and for a causal encoder that
  resamples to them (`fps` set), r per mesh frame for "pairs", the audio frames for a causal
  encoder with fps=0) and the FaceFormer or non-autoregressive decoder (audio
  projection of r features per frame, style/emotion embeddings, motion embedding of the T - 1
  previous frames (FaceFormer), per layer the attention projections, the dense [T, T] scores
  and weighted sums, FaceFormer's aligned cross-attention over r keys per frame, the MLP, and
  the offset projection to V * 3). Norms, activations, softmax and the loss are left out, as
  is usual for MFU.

  Training cost follows what the step computes: each matmul costs its forward once, plus once
  more for the gradient of its weights when they are trainable, plus once more for the
  gradient of each input that depends on a trainable parameter. So a frozen module whose
  inputs are data (wav2vec2's conv stack with `optim.freeze`, as FaceFormer trains it) costs
  its forward only, the first trainable layer after it and the motion embedding of the data
  twice their forward, and everything downstream three times. CodeTalker's variants are not
  counted (0: the trainer then logs no MFU).
  """
  from fdjax import optim as optim_lib
  from fdjax.state import strip_boxes

  model = build_model(config)
  if not isinstance(model, SpeechToMesh) or not isinstance(
    model.decoder, FaceFormerDecoder | NonAutoregressiveDecoder
  ):
    return 0.0
  shapes = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, dummy_batch(config, 1)
    )
  )
  mask = optim_lib.trainable_mask(strip_boxes(shapes["params"]), config.optim.freeze)
  trainable_paths = [
    optim_lib.param_path(path)
    for path, keep in jax.tree_util.tree_flatten_with_path(mask)[0]
    if keep
  ]

  def trainable(prefix: str) -> bool:
    return any(path.startswith(prefix) for path in trainable_paths)

  total = 0.0

  def add(flops: float, *gradients: bool) -> None:
    # The forward, plus one more of the same for each gradient the backward pass computes.
    nonlocal total
    total += flops * (1 + sum(bool(g) for g in gradients))

  enc, dec = model.encoder, model.decoder
  frames = config.data.window_frames
  ratio = dec.audio_frames_per_frame
  length = _window_samples(config, frames) + getattr(enc, "causal_padding", 0)
  channels, needs = 1, False  # needs: the activations depend on a trainable parameter
  for i, (dim, kernel, stride) in enumerate(zip(enc.conv_dim, enc.conv_kernel, enc.conv_stride)):
    length = (length - kernel) // stride + 1
    weights = trainable(f"encoder/feature_extractor/conv_layers_{i}/")
    add(2 * length * channels * dim * kernel, weights, needs)
    channels, needs = dim, needs or weights
  if enc.causal and enc.fps:
    steps = frames  # the conv features are resampled to the mesh frame rate first
  elif enc.causal:
    steps = length  # the transformer runs at the audio frame rate, aligned afterwards
  else:
    steps = frames * ratio if enc.frame_alignment == "pairs" else frames
  d, groups = enc.hidden_size, enc.num_conv_pos_embedding_groups
  weights = trainable("encoder/feature_projection/")
  add(2 * steps * channels * d, weights, needs)
  needs = needs or weights or trainable("encoder/masked_spec_embed")
  weights = trainable("encoder/encoder/pos_conv_embed/")
  add(2 * steps * d * (d // groups) * enc.num_conv_pos_embeddings, weights, needs)
  needs = needs or weights or trainable("encoder/encoder/layer_norm/")

  def transformer_layer(prefix: str, steps: int, width: int, mlp: int, needs: bool) -> bool:
    """A self-attention + MLP layer over `steps` positions; returns its output's `needs`."""
    weights = trainable(prefix)
    inner = needs or weights
    add(2 * steps * 3 * width * width, weights, needs)  # query, key, value
    add(4 * steps * steps * width, inner, inner)  # scores and weighted sum, both operands
    add(2 * steps * width * width, weights, inner)  # output projection
    add(4 * steps * width * mlp, weights, inner)  # MLP in and out
    return inner

  for i in range(enc.num_hidden_layers):
    prefix = "encoder/encoder/layers/" if enc.scan_layers else f"encoder/encoder/layers_{i}/"
    needs = transformer_layer(prefix, steps, d, enc.intermediate_size, needs)

  dm, v3 = dec.d_model, 3 * dec.num_vertices
  weights = trainable("decoder/audio_projection/")
  add(2 * frames * ratio * d * dm, weights, needs)
  audio_needs = needs or weights
  condition = False
  for field, count in (
    ("style", dec.num_styles),
    ("emotion", dec.num_emotions),
    ("intensity", dec.num_intensities),
  ):
    if count > 0:
      weights = trainable(f"decoder/condition_embedding/{field}_embedding/")
      add(2 * count * dm, weights)  # one-hot input: data
      condition = condition or weights

  if isinstance(dec, NonAutoregressiveDecoder):
    needs = audio_needs or condition
    for i in range(dec.num_layers):
      needs = transformer_layer(f"decoder/encoder/layer_{i}/", frames, dm, dec.mlp_dim, needs)
  else:
    weights = trainable("decoder/vertex_embedding/")
    add(2 * (frames - 1) * v3 * dm, weights)  # offsets of the true previous frames: data
    needs = weights or condition
    for i in range(dec.num_layers):
      prefix = f"decoder/layers_{i}/"
      weights = trainable(prefix)
      inner = needs or weights
      add(2 * frames * 3 * dm * dm, weights, needs)  # self-attention query, key, value
      add(4 * frames * frames * dm, inner, inner)  # causal scores and weighted sum (dense)
      add(2 * frames * dm * dm, weights, inner)  # self-attention output
      memory = audio_needs or weights
      add(2 * frames * dm * dm, weights, inner)  # cross-attention query
      add(2 * 2 * frames * ratio * dm * dm, weights, audio_needs)  # keys and values of memory
      add(2 * frames * ratio * dm, inner, memory)  # aligned scores: r keys per frame
      add(2 * frames * ratio * dm, inner or memory, memory)  # weighted sum
      needs = inner or memory
      add(2 * frames * dm * dm, weights, needs)  # cross-attention output
      add(4 * frames * dm * dec.mlp_dim, weights, needs)  # MLP in and out
  add(2 * frames * dm * v3, trainable("decoder/offset_projection/"), needs)
  return total


def stream_fn(config: Any, model: nn.Module):
  """For a causal model, the streaming functions `fdjax export` writes beside `predict`.

  Returns `({"stream_init": (fn, input_specs), "stream_step": (fn, input_specs)}, metadata)`
  (see `fdjax.streaming.export_functions`) with the chunk of `config.model.stream_chunk_frames`,
  or None when the model does not stream (not causal, or not frame by frame).
  """
  from fdjax import streaming

  if not (isinstance(model, SpeechToMesh) and model.encoder.causal):
    return None
  chunk_frames = config.model.stream_chunk_frames
  return (
    streaming.export_functions(model, chunk_frames),
    streaming.metadata(model, chunk_frames),
  )
