"""Tests for fdjax.metrics.classification against scikit-learn on random predictions."""

import math
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk

from fdjax.metrics import classification as cls

SEEDS = (0, 1, 2, 3, 4)


def _random_labels(seed, num_classes=7, size=200, missing=()):
  """Random labels and predictions; classes in `missing` never appear as true labels."""
  rng = np.random.default_rng(seed)
  allowed = [c for c in range(num_classes) if c not in missing]
  labels = rng.choice(allowed, size=size)
  # Biased towards the truth so recalls are spread, not all near chance.
  preds = np.where(rng.random(size) < 0.5, labels, rng.integers(0, num_classes, size))
  return labels, preds


@pytest.fixture(autouse=True)
def _quiet_sklearn():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn's UndefinedMetricWarning for zero_division cases
    yield


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_matrix_uar_war_match_sklearn(seed):
  labels, preds = _random_labels(seed)
  np.testing.assert_array_equal(
    cls.confusion_matrix(labels, preds, 7), sk.confusion_matrix(labels, preds, labels=range(7))
  )
  assert cls.unweighted_average_recall(labels, preds) == pytest.approx(
    sk.recall_score(labels, preds, average="macro"), abs=1e-12
  )
  assert cls.weighted_average_recall(labels, preds) == pytest.approx(
    sk.accuracy_score(labels, preds), abs=1e-12
  )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_division", [0.0, 1.0, math.nan])
def test_uar_with_absent_classes_matches_sklearn(seed, zero_division):
  # Class 2 is predicted but never true; class 5 is never true and may never be predicted.
  labels, preds = _random_labels(seed, missing=(2, 5), size=40)
  preds[0] = 2
  expected_default = sk.recall_score(labels, preds, average="macro", zero_division=zero_division)
  expected_all = sk.recall_score(
    labels, preds, labels=list(range(9)), average="macro", zero_division=zero_division
  )
  got_default = cls.unweighted_average_recall(labels, preds, zero_division=zero_division)
  got_all = cls.unweighted_average_recall(
    labels, preds, classes=range(9), zero_division=zero_division
  )
  assert got_default == pytest.approx(expected_default, abs=1e-12)
  assert got_all == pytest.approx(expected_all, abs=1e-12)
  matrix = cls.confusion_matrix(labels, preds, 9)
  assert cls.unweighted_average_recall_from_confusion(
    matrix, zero_division=zero_division
  ) == pytest.approx(expected_default, abs=1e-12)


def test_uar_is_mean_of_row_normalised_diagonal_by_hand():
  labels = np.array([0, 0, 0, 0, 1, 1, 2])
  preds = np.array([0, 0, 0, 1, 1, 0, 2])
  # Recalls 3/4, 1/2, 1/1 -> UAR 0.75; accuracy 5/7.
  assert cls.unweighted_average_recall(labels, preds) == pytest.approx(0.75)
  assert cls.weighted_average_recall(labels, preds) == pytest.approx(5 / 7)


@pytest.mark.parametrize("seed", SEEDS)
def test_accumulator_streams_batches_with_padding(seed):
  labels, preds = _random_labels(seed, size=103)
  accumulator = cls.ClassificationAccumulator(7)
  for start in range(0, 103, 16):
    batch_labels = np.zeros(16, np.int64)
    batch_preds = np.zeros(16, np.int64)
    chunk = slice(start, min(start + 16, 103))
    size = chunk.stop - chunk.start
    batch_labels[:size], batch_preds[:size] = labels[chunk], preds[chunk]
    accumulator.add(batch_labels, batch_preds, mask=np.arange(16) < size)
  result = accumulator.compute()
  assert result["num_examples"] == 103
  assert result["uar"] == pytest.approx(sk.recall_score(labels, preds, average="macro"))
  assert result["war"] == pytest.approx(sk.accuracy_score(labels, preds))
  np.testing.assert_array_equal(
    accumulator.confusion_matrix, sk.confusion_matrix(labels, preds, labels=range(7))
  )


def _random_aus(seed, size=150, num_aus=12):
  rng = np.random.default_rng(seed)
  labels = (rng.random((size, num_aus)) < rng.uniform(0.05, 0.6, num_aus)).astype(np.int64)
  probabilities = np.clip(0.35 * labels + 0.65 * rng.random((size, num_aus)), 0, 1)
  labels[:, 0] = 0  # an AU that never occurs: F1 is 0 unless a prediction also never occurs
  probabilities[:, 1] = 0.0  # an AU never predicted
  labels[:, 2] = 0
  probabilities[:, 2] = 0.1  # never occurs, never predicted: zero_division applies
  probabilities[:3, 3] = 0.5  # exactly at the threshold counts as positive
  return labels, probabilities


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_division", [0.0, 1.0, math.nan])
def test_au_f1_matches_sklearn_per_au_and_mean(seed, zero_division):
  labels, probabilities = _random_aus(seed)
  predicted = (probabilities >= 0.5).astype(np.int64)
  expected = sk.f1_score(labels, predicted, average=None, zero_division=zero_division)
  got = cls.au_f1_per_au(labels, probabilities, zero_division=zero_division)
  np.testing.assert_allclose(got, expected, atol=1e-12)
  expected_mean = sk.f1_score(labels, predicted, average="macro", zero_division=zero_division)
  assert cls.au_f1(labels, probabilities, zero_division=zero_division) == pytest.approx(
    expected_mean, abs=1e-12
  )

  accumulator = cls.AUF1Accumulator(12, zero_division=zero_division)
  for start in range(0, len(labels), 32):
    accumulator.add(labels[start : start + 32], probabilities[start : start + 32])
  result = accumulator.compute()
  assert result["au_f1"] == pytest.approx(expected_mean, abs=1e-12)
  np.testing.assert_allclose([result[f"au_f1/au{i}"] for i in range(12)], expected, atol=1e-12)


def test_au_labels_must_be_binary():
  with pytest.raises(ValueError, match="0/1"):
    cls.au_f1(np.array([[0, 3]]), np.array([[0.2, 0.9]]))


def test_confusion_matrix_rejects_out_of_range_classes():
  with pytest.raises(ValueError, match=r"labels holds class 7, outside \[0, 7\)"):
    cls.confusion_matrix([0, 7], [0, 1], 7)


def test_save_confusion_png_writes_an_image(tmp_path):
  labels, preds = _random_labels(0)
  path = tmp_path / "plots" / "confusion.png"
  names = ["neutral", "happy", "sad", "angry", "surprise", "disgust", "fear"]
  cls.save_confusion_png(cls.confusion_matrix(labels, preds, 7), names, path, title="fold 1")
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200


def test_fold_summary_mean_and_std():
  folds = [
    {"uar": 0.5, "war": 0.6, "num_examples": 10, "task": "dfer"},
    {"uar": 0.7, "war": 0.8, "num_examples": 10, "task": "dfer"},
  ]
  summary = cls.fold_summary(folds)
  assert summary["uar"] == {
    "mean": pytest.approx(0.6),
    "std": pytest.approx(0.1),
    "per_fold": [0.5, 0.7],
  }
  assert summary["war"]["mean"] == pytest.approx(0.7)
  assert "task" not in summary
  assert cls.fold_summary(folds, ddof=1)["uar"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  with pytest.raises(ValueError, match=r"fold 1 .*'war'"):
    cls.fold_summary([folds[0], {"uar": 0.1, "num_examples": 3}])
