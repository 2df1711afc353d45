"""Emotion evaluation of speech-driven animation in FLAME space (the `mead` experiment).

What `audio2mesh`'s `evaluate` adds when the data has emotions (`config.data.emotions`), from
the whole test sequences its overall evaluation generated from their audio with their own
emotion and intensity:

- LVE (both forms, masks named) and MVE per emotion, by the same accumulator as the overall
  table (`fdjax.metrics.mesh.MeshMetricsAccumulator`);
- the emotion accuracy of the generated expression: an emotion classifier of FLAME expression
  trajectories, trained here, in the evaluation, on the training split's ground truth, then
  applied to the generated trajectories (and, as its own ceiling, to the test split's truth);
- what the emotion input changes: the same audio generated with another emotion
  (`swapped_emotions`) changes the mouth's opening about its mean (`mesh.mouth_opening`: the
  timing lip sync is judged by) by `emotion_swap/lip_sync_change` of that motion, and moves
  the upper face, held over the sequence, by `emotion_swap/upper_face_mm`.

The classifier (`EmotionProbe`): per sequence, the mean and standard deviation over its frames
of the expression coefficients and the jaw pose (`2 * (E + 3)` features, standardised on the
training set), into a multinomial logistic regression (L2 1e-3, full-batch gradient descent).
Small and deterministic; it only reads what a decoder with `output="flame"` predicts
(`expression`, `jaw`). Reported beside it: chance (1 / number of emotions) and the majority
rate of the test split.

Config keys read: `data.emotions` (class names, `emotion` indexes them),
`model.decoder.num_expression`, and those of `_speech_mesh.evaluate_sequences`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from data_pipelines import pipeline, prepare
from fdjax.metrics import classification
from fdjax.metrics import mesh as mesh_metrics
from fdjax.models import face_outputs
from fdjax.tasks import _speech_mesh

# What the evaluation keeps per batch: the bucketed batch, the generated vertices
# `[B, T, V, 3]`, `trajectories(aux)` (`expression [B, T, E]`, `jaw [B, T, 3]`) and the vertices
# generated from the same audio with `swapped_emotions`.
Generated = tuple[dict, np.ndarray, dict[str, np.ndarray], np.ndarray]


def swapped_emotions(emotion: np.ndarray, config: Any) -> np.ndarray:
  """Each sequence's emotion moved half-way round the classes (neutral <-> fear, angry <->
  happy, ...): what the evaluation generates besides, to measure what emotion changes."""
  count = len(config.data.emotions)
  return ((np.asarray(emotion) + count // 2) % count).astype(np.int32)


def trajectories(aux: dict) -> dict:
  """The generated expression trajectory of a decoder with `output="flame"`; {} for the other
  output kinds (whose evaluation then has no emotion accuracy)."""
  return {k: aux[k] for k in ("expression", "jaw") if k in aux}


def trajectory_features(expression: np.ndarray, jaw: np.ndarray, frames: int) -> np.ndarray:
  """Mean and standard deviation over the first `frames` frames of `[T, E]` and `[T, 3]`."""
  x = np.concatenate([expression[:frames], jaw[:frames]], axis=1).astype(np.float64)
  return np.concatenate([x.mean(0), x.std(0)])


@dataclasses.dataclass
class EmotionProbe:
  """Multinomial logistic regression on standardised trajectory features (module docstring)."""

  num_classes: int
  l2: float = 1e-3
  steps: int = 2000
  learning_rate: float = 0.5

  def fit(self, features: np.ndarray, labels: np.ndarray) -> EmotionProbe:
    self.mean = features.mean(0)
    self.scale = features.std(0) + 1e-8
    x = (features - self.mean) / self.scale
    targets = np.eye(self.num_classes)[labels]  # [N, C]
    self.weights = np.zeros((x.shape[1], self.num_classes))
    self.bias = np.zeros(self.num_classes)
    for _ in range(self.steps):
      error = _softmax(x @ self.weights + self.bias) - targets  # [N, C]
      self.weights -= self.learning_rate * (x.T @ error / len(x) + self.l2 * self.weights)
      self.bias -= self.learning_rate * error.mean(0)
    return self

  def predict(self, features: np.ndarray) -> np.ndarray:
    return np.argmax(((features - self.mean) / self.scale) @ self.weights + self.bias, axis=1)


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(1, keepdims=True))
  return shifted / shifted.sum(1, keepdims=True)


def _truth_features(example: dict, num_expression: int) -> np.ndarray:
  flame = example["flame"]
  expression = np.asarray(flame["expression"], np.float32)[:, :num_expression]
  jaw = np.asarray(flame["pose"], np.float32)[:, face_outputs.JAW]
  return trajectory_features(expression, jaw, len(expression))


def evaluate_emotions(
  config: Any, generated: list[Generated], num_vertices: int, *, step: int
) -> dict[str, float]:
  """Per-emotion LVE and MVE of the generated test sequences, and the emotion accuracy of their
  generated expression trajectories (module docstring); `generated` holds what the overall
  evaluation (`_speech_mesh.evaluate_sequences`) generated, batch by batch."""
  emotions = tuple(config.data.emotions)
  num_expression = config.model.decoder.num_expression
  raw_dir, data_dir = prepare.ensure_dataset(config.data)
  lips = mesh_metrics.load_region_mask(
    _speech_mesh.mask_path(config, raw_dir, "lip_mask"), num_vertices
  )
  upper = mesh_metrics.load_region_mask(
    _speech_mesh.mask_path(config, raw_dir, "upper_face_mask"), num_vertices
  )
  accumulators = {e: mesh_metrics.MeshMetricsAccumulator(lips, upper) for e in emotions}
  generated_features, labels = [], []
  lip_motion, lip_sync_change, upper_change_mm = [], [], []
  for batch, vertices, outputs, swapped in generated:
    for i, emotion in enumerate(batch["emotion"]):
      frames = int(batch["frame_mask"][i].sum())
      if not frames:
        continue  # a padding row
      accumulators[emotions[emotion]].add(
        vertices[i, :frames], batch["vertices"][i, :frames], batch["template"][i]
      )
      # What the other emotion changed: the timing of the mouth's opening (lip sync) and the
      # upper face held over the sequence.
      mesh, other = vertices[i, :frames], swapped[i, :frames]  # [T, V, 3]
      opening = mesh_metrics.mouth_opening(mesh, batch["template"][i], lips)
      opening -= opening.mean()
      other_opening = mesh_metrics.mouth_opening(other, batch["template"][i], lips)
      lip_motion.append(np.square(opening).sum())
      lip_sync_change.append(np.square(other_opening - other_opening.mean() - opening).sum())
      held = mesh[:, upper.indices].mean(0) - other[:, upper.indices].mean(0)  # [U, 3]
      upper_change_mm.append(1000 * np.linalg.norm(held, axis=-1).mean())
      if outputs:
        generated_features.append(
          trajectory_features(outputs["expression"][i], outputs["jaw"][i], frames)
        )
      labels.append(int(emotion))
  labels = np.array(labels)
  metrics = {
    # Another emotion on the same audio: the change of the mouth's opening about its mean
    # (RMS, relative to that motion itself) and the upper face's displacement held over each
    # sequence (mm).
    "emotion_swap/lip_sync_change": float(
      np.sqrt(np.sum(lip_sync_change) / max(np.sum(lip_motion), 1e-30))
    ),
    "emotion_swap/upper_face_mm": float(np.mean(upper_change_mm)),
  }
  if generated_features:  # a decoder of FLAME coefficients: the emotion of its expression
    train = pipeline.tfds_source(config.data.name, data_dir, "train")
    probe = EmotionProbe(len(emotions)).fit(
      np.stack([_truth_features(e, num_expression) for e in train]),
      np.array([int(e["emotion"]) for e in train]),
    )
    source = pipeline.tfds_source(config.data.name, data_dir, config.data.eval_split)
    truth_features = np.stack([_truth_features(e, num_expression) for e in source])
    truth_labels = np.array([int(e["emotion"]) for e in source])
    predicted = probe.predict(np.stack(generated_features))
    metrics.update(
      emotion_accuracy=classification.weighted_average_recall(labels, predicted),
      emotion_uar=classification.unweighted_average_recall(labels, predicted),
      emotion_accuracy_of_truth=classification.weighted_average_recall(
        truth_labels, probe.predict(truth_features)
      ),
      emotion_chance=1.0 / len(emotions),
      emotion_majority_rate=float(np.bincount(labels).max() / len(labels)),
    )
  for emotion, accumulator in accumulators.items():
    values = accumulator.compute()
    if values["num_frames"]:
      for name in ("lve_squared", "lve_mm", "mve_mm", "num_sequences"):
        metrics[f"{name}/{emotion}"] = float(values[name])
  if jax.process_index() == 0:
    _print_table(metrics, emotions, config.data.eval_split, step, lips.name)
  return metrics


def _print_table(metrics: dict, emotions: tuple, split: str, step: int, lip_mask: str) -> None:
  print(f"\n{split} split, step {step}: per emotion (lip mask {lip_mask!r})")
  print(f"{'emotion':<12}{'sequences':>10}{'LVE (mm)':>12}{'LVE sq (m^2)':>15}{'MVE (mm)':>12}")
  for emotion in emotions:
    if f"lve_mm/{emotion}" in metrics:
      print(
        f"{emotion:<12}{metrics[f'num_sequences/{emotion}']:>10.0f}"
        f"{metrics[f'lve_mm/{emotion}']:>12.3f}{metrics[f'lve_squared/{emotion}']:>15.3e}"
        f"{metrics[f'mve_mm/{emotion}']:>12.3f}"
      )
  if "emotion_accuracy" in metrics:
    print(
      f"emotion accuracy of the generated expression {metrics['emotion_accuracy']:.3f} (UAR "
      f"{metrics['emotion_uar']:.3f}); of the true expression "
      f"{metrics['emotion_accuracy_of_truth']:.3f}; chance {metrics['emotion_chance']:.3f}, "
      f"majority {metrics['emotion_majority_rate']:.3f}",
    )
  print(
    "another emotion on the same audio: the mouth's opening changed by "
    f"{metrics['emotion_swap/lip_sync_change']:.4f} of its motion, the upper face held "
    f"{metrics['emotion_swap/upper_face_mm']:.3f} mm elsewhere",
    flush=True,
  )
