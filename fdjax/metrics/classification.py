"""Classification metrics for expression recognition (UAR, WAR) and AU detection (AU F1).

The dfer and au tasks evaluate by streaming predictions into `ClassificationAccumulator` /
`AUF1Accumulator`, log `compute()`, save the confusion matrix with `save_confusion_png`, and the
fold runner reduces per-fold results with `fold_summary`. Definitions (docs/design.md section 5),
each equal to scikit-learn's (tests check this on random predictions):

- UAR (`unweighted_average_recall`): the mean over classes of recall = the mean of the diagonal
  of the row-normalised confusion matrix. Equal to `sklearn.metrics.recall_score(labels, preds,
  average="macro")`: by default the classes averaged are those present in labels or predictions
  (sklearn's `unique_labels(y_true, y_pred)`); a class that is predicted but never true has an
  undefined recall, scored `zero_division` (0, as sklearn's default "warn" does; NaN excludes it
  from the mean, as sklearn's `zero_division=np.nan`). Pass `classes=range(num_classes)` (sklearn's
  `labels=`) to average over a fixed class set instead; classes absent from both are then scored
  `zero_division` too.
- WAR (`weighted_average_recall`): overall accuracy (recall weighted by class support), as
  `sklearn.metrics.accuracy_score`.
- AU F1 (`au_f1`): per action unit, predictions are `probability >= threshold` (0.5), F1 =
  2 TP / (2 TP + FP + FN); the mean over AUs. Per AU equal to `sklearn.metrics.f1_score(...,
  average=None)` and the mean to `average="macro"`: F1 is `zero_division` only when TP, FP and
  FN are all 0 (the AU is never present and never predicted); if only TP + FP = 0 or TP + FN = 0,
  F1 is 0 by the formula.

All values are fractions in [0, 1] (papers often print percentages).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


def _class_vector(values: ArrayLike, what: str) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"{what} must be a 1-D vector of class indices, got shape {values.shape}")
  if values.size and not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{what} must hold integer class indices, got dtype {values.dtype}")
  return values.astype(np.int64)


def _checked_pair(labels: ArrayLike, preds: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  labels = _class_vector(labels, "labels")
  preds = _class_vector(preds, "preds")
  if labels.shape != preds.shape:
    raise ValueError(f"labels has {labels.shape[0]} entries but preds has {preds.shape[0]}")
  return labels, preds


def confusion_matrix(labels: ArrayLike, preds: ArrayLike, num_classes: int) -> np.ndarray:
  """Counts [C, C] int64: row = true class, column = predicted class (sklearn's layout).

  Args:
    labels: [N] int true classes in [0, num_classes).
    preds: [N] int predicted classes in [0, num_classes).
    num_classes: C.
  """
  labels, preds = _checked_pair(labels, preds)
  for values, what in ((labels, "labels"), (preds, "preds")):
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
      raise ValueError(
        f"{what} holds class {int(values[bad][0])}, outside [0, {num_classes}) "
        f"(num_classes={num_classes})"
      )
  flat = labels * num_classes + preds
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(matrix: ArrayLike, *, zero_division: float = 0.0) -> np.ndarray:
  """Recall per class from a confusion matrix [C, C]: the diagonal of the row-normalised matrix.

  Classes with no true example get `zero_division`. Returns [C] float64.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  support = matrix.sum(axis=1)
  diagonal = np.diagonal(matrix)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(support > 0, diagonal / np.maximum(support, 1), zero_division)


def _macro_mean(values: np.ndarray) -> float:
  """The mean sklearn's average="macro" takes: NaN entries (zero_division=nan) left out."""
  kept = values[~np.isnan(values)]
  return float(np.mean(kept)) if kept.size else math.nan


def unweighted_average_recall_from_confusion(
  matrix: ArrayLike, *, classes: Sequence[int] | None = None, zero_division: float = 0.0
) -> float:
  """UAR from a confusion matrix [C, C].

  Args:
    matrix: counts, rows true, columns predicted.
    classes: the classes averaged over; default those with any true or predicted example
      (sklearn's default). `range(C)` averages over every class.
    zero_division: recall of a class with no true example (NaN leaves it out of the mean).
  """
  matrix = np.asarray(matrix)
  recall = per_class_recall(matrix, zero_division=zero_division)
  if classes is None:
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    classes = np.flatnonzero(present)
  classes = np.asarray(list(classes), dtype=np.int64)
  if classes.size == 0:
    raise ValueError("UAR is undefined with no classes (empty confusion matrix)")
  return _macro_mean(recall[classes])


def unweighted_average_recall(
  labels: ArrayLike,
  preds: ArrayLike,
  *,
  classes: Sequence[int] | None = None,
  zero_division: float = 0.0,
) -> float:
  """UAR: mean per-class recall, equal to sklearn `recall_score(average="macro")`.

  Args:
    labels: [N] int true classes.
    preds: [N] int predicted classes.
    classes: the classes averaged over (sklearn's `labels=`); default the classes present in
      `labels` or `preds`. Use `range(num_classes)` for a fixed class set.
    zero_division: recall of a class with no true example; 0 as sklearn's default, NaN to
      leave such classes out of the mean.
  """
  labels, preds = _checked_pair(labels, preds)
  if classes is None:
    classes = np.union1d(labels, preds)
  classes = np.asarray(list(classes), dtype=np.int64)
  if classes.size == 0:
    raise ValueError("UAR is undefined with no examples and no classes")
  is_class = labels[:, None] == classes[None]  # [N, K]
  support = is_class.sum(axis=0)
  true_positives = (is_class & (preds == labels)[:, None]).sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.where(support > 0, true_positives / np.maximum(support, 1), zero_division)
  return _macro_mean(recall.astype(np.float64))


def weighted_average_recall(labels: ArrayLike, preds: ArrayLike) -> float:
  """WAR: overall accuracy, equal to sklearn `accuracy_score`."""
  labels, preds = _checked_pair(labels, preds)
  if labels.size == 0:
    raise ValueError("WAR is undefined with no examples")
  return float(np.mean(labels == preds))


def _au_counts(
  labels: ArrayLike, probabilities: ArrayLike, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-AU true positives, false positives, false negatives: three [A] int64 vectors."""
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities)
  if labels.ndim != 2 or labels.shape != probabilities.shape:
    raise ValueError(
      f"AU labels and probabilities must both be [N, A], got {labels.shape} and "
      f"{probabilities.shape}"
    )
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(
      "AU labels must be occurrence labels 0/1 (threshold intensities first), got values "
      f"{np.unique(labels)[:10].tolist()}"
    )
  truth = labels.astype(bool)
  predicted = probabilities >= threshold
  true_positives = np.sum(truth & predicted, axis=0)
  false_positives = np.sum(~truth & predicted, axis=0)
  false_negatives = np.sum(truth & ~predicted, axis=0)
  return true_positives, false_positives, false_negatives


def _f1_from_counts(
  true_positives: np.ndarray,
  false_positives: np.ndarray,
  false_negatives: np.ndarray,
  zero_division: float,
) -> np.ndarray:
  denominator = 2 * true_positives + false_positives + false_negatives
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = 2 * true_positives / np.maximum(denominator, 1)
  return np.where(denominator > 0, f1, zero_division).astype(np.float64)


def au_f1_per_au(
  labels: ArrayLike,
  probabilities: ArrayLike,
  *,
  threshold: float = 0.5,
  zero_division: float = 0.0,
) -> np.ndarray:
  """F1 per action unit [A]; equal to sklearn `f1_score(labels, probs >= threshold,
  average=None, zero_division=zero_division)`.

  Args:
    labels: [N, A] 0/1 occurrence.
    probabilities: [N, A] predicted probabilities (after the sigmoid); positive when
      `>= threshold`.
    threshold: decision threshold (0.5 by section 5).
    zero_division: F1 of an AU with no true and no predicted occurrence.
  """
  return _f1_from_counts(*_au_counts(labels, probabilities, threshold), zero_division)


def au_f1(
  labels: ArrayLike,
  probabilities: ArrayLike,
  *,
  threshold: float = 0.5,
  zero_division: float = 0.0,
) -> float:
  """Mean AU F1 over AUs (sklearn `f1_score(..., average="macro")`); args as `au_f1_per_au`."""
  return _macro_mean(
    au_f1_per_au(labels, probabilities, threshold=threshold, zero_division=zero_division)
  )


def _batch_mask(mask: ArrayLike | None, size: int) -> np.ndarray:
  if mask is None:
    return np.ones(size, dtype=bool)
  mask = np.asarray(mask, dtype=bool)
  if mask.shape != (size,):
    raise ValueError(f"mask must be [{size}] bool, got shape {mask.shape}")
  return mask


class ClassificationAccumulator:
  """Streams single-label predictions into a confusion matrix; gives UAR and WAR.

  Example:
    acc = ClassificationAccumulator(num_classes=7)
    for batch, logits in ...:
      acc.add(batch["label"], logits.argmax(-1), mask=batch.get("mask"))
    acc.compute()  # {"uar": ..., "war": ..., "num_examples": ...}
    save_confusion_png(acc.confusion_matrix, class_names, "confusion.png")
  """

  def __init__(
    self,
    num_classes: int,
    *,
    classes: Sequence[int] | None = None,
    zero_division: float = 0.0,
  ):
    self.num_classes = num_classes
    self.classes = classes  # classes UAR averages over; None = present ones (sklearn default)
    self.zero_division = zero_division
    self.reset()

  def reset(self) -> None:
    self.confusion_matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

  def add(self, labels: ArrayLike, preds: ArrayLike, *, mask: ArrayLike | None = None) -> None:
    """Adds a batch: labels [B] int, preds [B] int, mask [B] bool (False = padding)."""
    labels, preds = _checked_pair(labels, preds)
    keep = _batch_mask(mask, labels.shape[0])
    self.confusion_matrix += confusion_matrix(labels[keep], preds[keep], self.num_classes)

  def compute(self) -> dict[str, float]:
    """`uar`, `war` (fractions) and `num_examples`."""
    total = int(self.confusion_matrix.sum())
    if total == 0:
      raise ValueError("ClassificationAccumulator.compute called before any example was added")
    return {
      "uar": unweighted_average_recall_from_confusion(
        self.confusion_matrix, classes=self.classes, zero_division=self.zero_division
      ),
      "war": float(np.trace(self.confusion_matrix) / total),
      "num_examples": total,
    }


class AUF1Accumulator:
  """Streams multi-label AU predictions; gives per-AU F1 and their mean.

  Example:
    acc = AUF1Accumulator(num_aus=12, au_names=["AU1", "AU2", ...])
    acc.add(batch["aus"], jax.nn.sigmoid(logits))
    acc.compute()  # {"au_f1": mean, "au_f1/AU1": ..., ..., "num_examples": ...}
  """

  def __init__(
    self,
    num_aus: int,
    *,
    threshold: float = 0.5,
    zero_division: float = 0.0,
    au_names: Sequence[str] | None = None,
  ):
    if au_names is not None and len(au_names) != num_aus:
      raise ValueError(f"au_names has {len(au_names)} names for {num_aus} AUs")
    self.num_aus = num_aus
    self.threshold = threshold
    self.zero_division = zero_division
    self.au_names = list(au_names) if au_names is not None else [f"au{i}" for i in range(num_aus)]
    self.reset()

  def reset(self) -> None:
    self._true_positives = np.zeros(self.num_aus, dtype=np.int64)
    self._false_positives = np.zeros(self.num_aus, dtype=np.int64)
    self._false_negatives = np.zeros(self.num_aus, dtype=np.int64)
    self._num_examples = 0

  def add(
    self, labels: ArrayLike, probabilities: ArrayLike, *, mask: ArrayLike | None = None
  ) -> None:
    """Adds a batch: labels [B, A] 0/1, probabilities [B, A], mask [B] bool (False = padding)."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    if labels.ndim != 2 or labels.shape[1] != self.num_aus:
      raise ValueError(f"AU labels must be [B, {self.num_aus}], got shape {labels.shape}")
    keep = _batch_mask(mask, labels.shape[0])
    counts = _au_counts(labels[keep], probabilities[keep], self.threshold)
    self._true_positives += counts[0]
    self._false_positives += counts[1]
    self._false_negatives += counts[2]
    self._num_examples += int(keep.sum())

  def per_au(self) -> np.ndarray:
    """F1 per AU [A]."""
    return _f1_from_counts(
      self._true_positives, self._false_positives, self._false_negatives, self.zero_division
    )

  def compute(self) -> dict[str, float]:
    """`au_f1` (mean over AUs), `au_f1/<name>` per AU, and `num_examples`."""
    if self._num_examples == 0:
      raise ValueError("AUF1Accumulator.compute called before any example was added")
    per_au = self.per_au()
    result = {"au_f1": _macro_mean(per_au)}
    result.update(
      {f"au_f1/{name}": float(v) for name, v in zip(self.au_names, per_au, strict=True)}
    )
    result["num_examples"] = self._num_examples
    return result


def save_confusion_png(
  matrix: ArrayLike,
  class_names: Sequence[str],
  path: str | os.PathLike,
  *,
  title: str | None = None,
) -> None:
  """Writes the row-normalised confusion matrix as a PNG (matplotlib's Agg canvas, no display).

  Each cell shows the fraction of the true class (the row) given the predicted class (the
  column) and, below it, the count; the diagonal is the per-class recall.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  matrix = np.asarray(matrix)
  num_classes = len(class_names)
  if matrix.shape != (num_classes, num_classes):
    raise ValueError(
      f"confusion matrix has shape {matrix.shape} but there are {num_classes} class names"
    )
  support = matrix.sum(axis=1, keepdims=True)
  normalised = matrix / np.maximum(support, 1)
  side = 1.6 + 0.75 * num_classes
  figure = Figure(figsize=(side + 1.2, side))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
  axes.set_xticks(range(num_classes), labels=class_names, rotation=45, ha="right")
  axes.set_yticks(range(num_classes), labels=class_names)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  if title:
    axes.set_title(title)
  for row in range(num_classes):
    for column in range(num_classes):
      value = normalised[row, column]
      axes.text(
        column,
        row,
        f"{value:.2f}\n{int(matrix[row, column])}",
        ha="center",
        va="center",
        fontsize=7,
        color="white" if value > 0.5 else "black",
      )
  figure.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=120)


def _is_scalar_number(value: object) -> bool:
  if isinstance(value, bool | str):
    return False
  if isinstance(value, int | float | np.number):
    return True
  return isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.number)


def fold_summary(per_fold: list[dict], *, ddof: int = 0) -> dict[str, dict]:
  """Mean and standard deviation over cross-validation folds, per metric.

  Args:
    per_fold: one metrics dict per fold (e.g. `ClassificationAccumulator.compute()`); scalar
      numbers are summarised, other entries (names, arrays) are ignored. Every fold must report
      the same numeric metrics.
    ddof: delta degrees of freedom of the std; 0 (numpy's default, population std) unless set.

  Returns:
    `{metric: {"mean": float, "std": float, "per_fold": [float, ...]}}` in the first fold's
    key order.
  """
  if not per_fold:
    raise ValueError("fold_summary needs at least one fold")
  names = [k for k, v in per_fold[0].items() if _is_scalar_number(v)]
  for index, fold in enumerate(per_fold):
    fold_names = {k for k, v in fold.items() if _is_scalar_number(v)}
    if fold_names != set(names):
      difference = sorted(fold_names.symmetric_difference(names))
      raise ValueError(
        f"fold {index} reports different metrics from fold 0 (differing: {difference})"
      )
  summary = {}
  for name in names:
    values = np.array([float(fold[name]) for fold in per_fold])
    std = float(np.std(values, ddof=ddof)) if values.size > ddof else math.nan
    summary[name] = {"mean": float(np.mean(values)), "std": std, "per_fold": values.tolist()}
  return summary
