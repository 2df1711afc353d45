"""Pieces shared by the speech-mesh tasks (`audio2mesh`, `motion_vq`) on VOCASET- and BIWI-layout
data: batches, training windows, the vertex and velocity losses in millimetres, region masks,
whole-sequence evaluation with both baselines, its table and renderable sample, and the
export metadata. Each task supplies its model and how it predicts a batch of whole sequences.

Config keys read: `data.name`, `data.fps`, `data.sample_rate`, `data.window_frames`,
`data.max_frames`,
`data.eval_split`, `data.eval_batch_size`, `data.lip_mask`, `data.upper_face_mask`,
`data.train_subjects`, `data.{raw_dir,data_dir,synthetic,skip_invalid}`, `loss.velocity_weight`,
`loss.lip_weight`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import audio_mesh, pipeline, prepare
from fdjax.metrics import mesh as mesh_metrics
from fdjax.models import losses

MM_PER_METRE = 1000.0
# Frames of evaluation batches are padded up to a multiple of this, to bound recompilation.
EVAL_FRAME_BUCKET = 32
# The three rows of the evaluation table: the model and the two baselines.
SYSTEMS = ("model", "static_template", "mean_motion")


def module_fields(config_dict: Any, *drop: str) -> dict:
  """The fields of a config node as module keyword arguments (lists as tuples), less `drop`."""
  fields = {k: v for k, v in dict(config_dict).items() if k not in drop}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def window_samples(config: Any, frames: int) -> int:
  """Audio samples that cover `frames` mesh frames."""
  return int(np.ceil(frames * config.data.sample_rate / config.data.fps))


def training_frames(config: Any) -> int:
  """Frames of a training example: `data.window_frames`, or with 0 (whole sentences) the most
  a batch pads to, `data.max_frames`."""
  return config.data.window_frames or config.data.max_frames


def dummy_batch(config: Any, batch_size: int, num_vertices: int) -> dict[str, np.ndarray]:
  frames = training_frames(config)
  samples = window_samples(config, frames)
  return {
    "audio": np.zeros((batch_size, samples), np.float32),  # [B, S]
    "audio_mask": np.ones((batch_size, samples), bool),
    "vertices": np.zeros((batch_size, frames, num_vertices, 3), np.float32),  # [B, T, V, 3]
    "template": np.zeros((batch_size, num_vertices, 3), np.float32),  # [B, V, 3]
    "frame_mask": np.ones((batch_size, frames), bool),
    "subject": np.zeros((batch_size,), np.int32),
    # Emotion conditioning (EMOTE / EmoFace), where the decoder has it.
    **{
      key: np.zeros((batch_size,), np.int32)
      for key, count in (("emotion", "num_emotions"), ("intensity", "num_intensities"))
      if config.model.decoder.get(count, 0)
    },
  }


def train_data(config: Any, *, process_index: int, process_count: int):
  """Random training windows of `data.window_frames` frames with their audio; with
  `window_frames=0`, whole sentences (longer than `data.max_frames`: a random window of that
  many), each batch padded (masks False) to its longest sentence rounded up to
  `EVAL_FRAME_BUCKET` frames, so a run compiles one step per bucket, not per length. With
  several processes every batch is padded to `max_frames`, as all must agree on its shape."""
  _, data_dir = prepare.ensure_dataset(config.data)
  source = pipeline.tfds_source(config.data.name, data_dir, "train")
  rates = {"fps": config.data.fps, "sample_rate": config.data.sample_rate}
  batch_fn = None
  if config.data.window_frames > 0:
    transform = functools.partial(
      audio_mesh.train_window, window_frames=config.data.window_frames, **rates
    )
  else:
    max_frames = config.data.max_frames
    if max_frames < 1:
      raise ValueError(
        "config.data.window_frames=0 trains on whole sentences and needs config.data.max_frames "
        f">= 1 (the longest a batch pads to), got {max_frames}"
      )
    transform = functools.partial(audio_mesh.train_sequence, max_frames=max_frames, **rates)
    pad_to = max_frames if process_count > 1 else 0
    batch_fn = functools.partial(sentence_batch, pad_to=pad_to, **rates)
  return pipeline.train_dataset(
    source,
    transform,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    shuffle=config.data.shuffle,
    batch_fn=batch_fn,
  )


def sentence_batch(
  examples: list[dict], *, pad_to: int, fps: float, sample_rate: int
) -> dict[str, np.ndarray]:
  """Whole sentences padded to the longest (`audio_mesh.eval_batch`), then to a multiple of
  `EVAL_FRAME_BUCKET` frames, or to `pad_to` frames when set; the audio to match."""
  batch = audio_mesh.eval_batch(examples)
  frames = batch["vertices"].shape[1]
  target = pad_to or -(-frames // EVAL_FRAME_BUCKET) * EVAL_FRAME_BUCKET
  return pad_frames(batch, target, fps=fps, sample_rate=sample_rate)


def pad_frames(batch: dict, frames: int, *, fps: float, sample_rate: int) -> dict:
  """Pads a batch of whole sequences to `frames` frames (vertices with the template, masks
  False) and its audio to the samples those frames span."""
  pad_t = frames - batch["vertices"].shape[1]
  samples = int(np.ceil(frames * sample_rate / fps))
  pad_s = samples - batch["audio"].shape[1]
  out = dict(batch)
  out["vertices"] = np.concatenate(
    [batch["vertices"], np.repeat(batch["template"][:, None], pad_t, axis=1)], axis=1
  )
  out["frame_mask"] = np.pad(batch["frame_mask"], ((0, 0), (0, pad_t)))
  out["audio"] = np.pad(batch["audio"], ((0, 0), (0, max(pad_s, 0))))[:, :samples]
  out["audio_mask"] = np.pad(batch["audio_mask"], ((0, 0), (0, max(pad_s, 0))))[:, :samples]
  if "flame" in batch:  # head-model parameters per frame, zero on padding
    out["flame"] = {
      k: v if k == "shape" else np.pad(v, ((0, 0), (0, pad_t), (0, 0)))
      for k, v in batch["flame"].items()
    }
  return out


def mask_path(config: Any, raw_dir: str, key: str) -> str:
  """The file of region mask `config.data[key]` (relative paths are in the raw directory)."""
  path = config.data[key]
  return path if os.path.isabs(path) else os.path.join(raw_dir, path)


def lip_weights(config: Any, num_vertices: int) -> jax.Array | None:
  """Per-vertex loss weights [V] with `loss.lip_weight` on the lips (None when it is 1)."""
  if config.loss.lip_weight == 1.0:
    return None
  return region_weights(config, "lip_mask", num_vertices, config.loss.lip_weight)


def region_weights(
  config: Any, key: str, num_vertices: int, weight: float = 1.0, elsewhere: float = 1.0
) -> jax.Array:
  """Per-vertex weights [V]: `weight` on the region mask `config.data[key]`, `elsewhere` off it
  (the dataset, whose raw directory holds the mask, is prepared first if it is not yet)."""
  raw_dir, _ = prepare.ensure_dataset(config.data)
  region = mesh_metrics.load_region_mask(mask_path(config, raw_dir, key), num_vertices)
  return jnp.asarray(losses.region_weights(num_vertices, region.indices, weight, elsewhere))


def vertex_losses(
  predicted: jax.Array, batch: dict, *, velocity_weight: float, lip_weights: jax.Array | None
) -> tuple[jax.Array, dict]:
  """Vertex MSE + `velocity_weight` x velocity MSE in mm^2, and their metrics (with `weight`)."""
  frame_mask = batch["frame_mask"]
  predicted_mm = predicted * MM_PER_METRE
  truth_mm = batch["vertices"] * MM_PER_METRE
  vertex = losses.vertex_mse(predicted_mm, truth_mm, frame_mask, lip_weights)
  velocity = losses.velocity_mse(predicted_mm, truth_mm, frame_mask, lip_weights)
  metrics = {
    "vertex_mse_mm2": vertex,
    "velocity_mse_mm2": velocity,
    "weight": jnp.sum(frame_mask).astype(jnp.float32),
  }
  return vertex + velocity_weight * velocity, metrics


def bucket(batch: dict, config: Any) -> dict:
  """Pads frames to a multiple of EVAL_FRAME_BUCKET (and the audio to match)."""
  frames = batch["vertices"].shape[1]
  target = -(-frames // EVAL_FRAME_BUCKET) * EVAL_FRAME_BUCKET
  return pad_frames(batch, target, fps=config.data.fps, sample_rate=config.data.sample_rate)


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


# `predict(batch, put) -> vertices [B, T, V, 3]` for one bucketed host batch of whole sequences
# (`[N, B, T, V, 3]`, N samples, for a sampled model); `put` makes a host array (or None) a
# replicated global array.
PredictBatch = Callable[[dict, Callable], jax.Array]
# The column of the evaluation table with the metrics averaged over N samples.
SAMPLES_MEAN = "mean_of_samples"


def evaluate_sequences(
  config: Any,
  predict: PredictBatch,
  num_vertices: int,
  *,
  mesh,
  workdir: str,
  step: int,
  num_samples: int = 0,
) -> dict[str, float]:
  """Metrics of `predict` over whole sequences of `config.data.eval_split`, with both baselines
  (static template; training-set mean offset), named masks, a printed table and a sample.

  With `num_samples` N > 0 (a sampled model: `predict` returns N samples per sequence, drawn
  from N seeds) the model's row is its first sample, `mean_of_samples/<metric>` each metric
  averaged over the N samples, and `diversity_mm` the diversity of the N samples (N >= 2;
  `fdjax.metrics.mesh.sample_diversity`, all vertices).

  Every process evaluates the whole split (inputs replicated), so all report the same numbers.
  """
  raw_dir, data_dir = prepare.ensure_dataset(config.data)
  lips = mesh_metrics.load_region_mask(mask_path(config, raw_dir, "lip_mask"), num_vertices)
  upper = mesh_metrics.load_region_mask(mask_path(config, raw_dir, "upper_face_mask"), num_vertices)
  accumulators = {name: mesh_metrics.MeshMetricsAccumulator(lips, upper) for name in SYSTEMS}
  per_sample = [mesh_metrics.MeshMetricsAccumulator(lips, upper) for _ in range(num_samples)]
  diversities = []  # per sequence, in the vertices' units
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
    batch = bucket(batch, config)
    num_frames = batch["vertices"].shape[1]
    predicted = np.asarray(jax.device_get(predict(batch, put)), np.float32)
    truth, template, frame_mask = batch["vertices"], batch["template"], batch["frame_mask"]
    if num_samples:
      samples, predicted = predicted, predicted[0]  # [N, B, T, V, 3], [B, T, V, 3]
      for accumulator, one in zip(per_sample, samples, strict=True):
        accumulator.add_batch(one, truth, template, frame_mask)
      if num_samples > 1:
        per_sequence = mesh_metrics.sequence_diversity(samples, frame_mask)
        diversities.extend(per_sequence[~np.isnan(per_sequence)])
    accumulators["model"].add_batch(predicted, truth, template, frame_mask)
    static = np.repeat(template[:, None], num_frames, axis=1)
    accumulators["static_template"].add_batch(static, truth, template, frame_mask)
    accumulators["mean_motion"].add_batch(static + mean_offset, truth, template, frame_mask)
    if sample is None:
      sample = (predicted[0], truth[0], batch["audio"][0], batch["audio_mask"][0], frame_mask[0])

  results = {name: acc.compute() for name, acc in accumulators.items()}
  if num_samples:
    computed = [accumulator.compute() for accumulator in per_sample]
    results[SAMPLES_MEAN] = {
      **computed[0],
      **{
        metric: float(np.mean([c[metric] for c in computed]))
        for metric in mesh_metrics.MeshMetricsAccumulator.METRIC_NAMES
      },
    }
  metrics: dict[str, float] = {}
  for name, values in results.items():
    for metric in mesh_metrics.MeshMetricsAccumulator.METRIC_NAMES:
      key = metric if name == "model" else f"{name}/{metric}"
      metrics[key] = float(values[metric])
  diversity = None
  if diversities:
    diversity = float(np.mean(diversities)) * MM_PER_METRE
    metrics["diversity_mm"] = diversity
  if num_samples:
    metrics["num_samples"] = float(num_samples)
  if jax.process_index() == 0:
    _print_table(results, config.data.eval_split, step, num_samples, diversity)
    _write_sample(workdir, raw_dir, config, sample)
    with open(os.path.join(workdir, "eval_masks.json"), "w") as f:
      json.dump({"lip_mask": lips.name, "upper_face_mask": upper.name}, f)
  return metrics


def _print_table(
  results: dict, split: str, step: int, num_samples: int, diversity: float | None
) -> None:
  model = results["model"]
  rows = [
    ("LVE squared (m^2)", "lve_squared", "{:.3e}"),
    ("LVE (mm)", "lve_mm", "{:.3f}"),
    ("FDD (m^2, signed)", "fdd", "{:+.3e}"),
    ("MVE (mm)", "mve_mm", "{:.3f}"),
  ]
  columns = ("model", SAMPLES_MEAN, *SYSTEMS[1:]) if num_samples else SYSTEMS
  print(
    f"\n{split} split, step {step}: {model['num_sequences']} sequences, {model['num_frames']} "
    f"frames; lip mask {model['lip_mask']!r}, upper-face mask {model['upper_face_mask']!r}"
  )
  if num_samples:
    print(f"model: its first sample; {SAMPLES_MEAN}: each metric's mean over {num_samples} seeds")
  print(f"{'metric':<20}" + "".join(f"{n:>18}" for n in columns))
  for label, key, fmt in rows:
    print(f"{label:<20}" + "".join(f"{fmt.format(results[n][key]):>18}" for n in columns))
  if diversity is not None:
    print(f"diversity (mm, all vertices, {num_samples} samples per sequence): {diversity:.4f}")
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
      shutil.copy(os.path.join(raw_dir, name), os.path.join(directory, "faces.ply"))


def export_metadata(config: Any, num_vertices: int) -> dict:
  """The signature.json metadata every speech-mesh artifact carries."""
  return {
    "sample_rate": config.data.sample_rate,
    "fps": config.data.fps,
    "num_vertices": num_vertices,
    "dataset": config.data.name,
    "train_subjects": list(config.data.train_subjects),
  }
