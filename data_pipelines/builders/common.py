"""What every dataset builder shares: the bad-input policy of docs/design.md section 6.

A builder turns each raw example into a dict of arrays inside `validated(...)`. Anything wrong
with the example raises `InvalidExample(path, reason)`; `ExampleValidator` then either re-raises
it (the default: the build fails naming the file and the reason) or, under `skip_invalid`,
counts it and moves on. The count and the reasons are reported when the split is done.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

import numpy as np


class InvalidExample(ValueError):
  """A raw example that cannot go into a dataset, with the file it came from and why."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass
class ExampleValidator:
  """Applies the skip-or-fail policy and keeps the tally of skipped examples.

  Usage inside a builder's `_generate_examples`:

      validator = ExampleValidator(skip_invalid=self.builder_config.skip_invalid)
      for key, path in items:
        with validator.validated(path):
          example = load_and_check(path)   # raises InvalidExample, or any decode error
          yield key, example
      validator.report(split_name)
  """

  skip_invalid: bool = False
  skipped: list[InvalidExample] = dataclasses.field(default_factory=list)

  @contextlib.contextmanager
  def validated(self, path: str | os.PathLike) -> Iterator[None]:
    """Runs the body; turns any failure into `InvalidExample` naming `path`; skips or raises."""
    try:
      yield
    except InvalidExample as e:
      self._handle(e)
    except Exception as e:  # noqa: BLE001  decoders raise many kinds; all mean "unreadable".
      self._handle(InvalidExample(path, f"cannot be read: {type(e).__name__}: {e}"))

  def _handle(self, error: InvalidExample) -> None:
    if not self.skip_invalid:
      raise error
    logging.warning("skipping invalid example %s", error)
    self.skipped.append(error)

  def summary(self) -> dict[str, int]:
    """Counts of skipped examples by reason (the first clause of the reason)."""
    return dict(collections.Counter(e.reason.split(":")[0] for e in self.skipped))

  def report(self, split: str) -> str:
    msg = f"split {split!r}: skipped {len(self.skipped)} invalid example(s)"
    if self.skipped:
      msg += " " + str(self.summary())
    logging.warning(msg) if self.skipped else logging.info(msg)
    print(msg)
    return msg


def check_finite(path: str | os.PathLike, name: str, array: np.ndarray) -> None:
  """Raises `InvalidExample` if `array` holds NaN or infinity."""
  if not np.all(np.isfinite(array)):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise InvalidExample(path, f"{name} has {bad} non-finite value(s)")


def check_shape(path: str | os.PathLike, name: str, array: np.ndarray, expected: tuple) -> None:
  """Raises `InvalidExample` unless `array.shape` matches `expected` (None matches any size)."""
  shape = tuple(np.shape(array))
  ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
  if not ok:
    want = tuple("*" if e is None else e for e in expected)
    raise InvalidExample(path, f"{name} has shape {shape}, expected {want}")


def check_lengths_agree(
  path: str | os.PathLike, num_samples: int, sample_rate: int, num_frames: int, fps: float
) -> None:
  """Raises `InvalidExample` unless audio and frames span the same time within one frame."""
  audio_frames = num_samples * fps / sample_rate
  if abs(audio_frames - num_frames) > 1.0 + 1e-6:
    raise InvalidExample(
      path,
      f"audio/mesh length mismatch: {num_samples} samples at {sample_rate} Hz is "
      f"{audio_frames:.2f} frames at {fps} fps, but there are {num_frames} frames",
    )


class _NeverRaised(Exception):
  """Stands for TensorFlow's ResourceExhaustedError, which plain file objects never raise."""


class _GFile:
  """`tf.io.gfile` as TFDS's shuffler uses it (GFile, exists, remove), on `etils.epath`."""

  @staticmethod
  def GFile(path, mode="r"):  # noqa: N802 (TensorFlow's name)
    from etils import epath

    return epath.Path(path).open(mode)

  @staticmethod
  def exists(path) -> bool:
    from etils import epath

    return epath.Path(path).exists()

  @staticmethod
  def remove(path) -> None:
    from etils import epath

    epath.Path(path).unlink()


class _TensorFlowForShuffler:
  """The part of TensorFlow that `tensorflow_datasets.core.shuffle` touches."""

  class io:  # noqa: N801 (TensorFlow's name)
    gfile = _GFile

  class errors:  # noqa: N801
    ResourceExhaustedError = _NeverRaised


@contextlib.contextmanager
def shuffler_without_tensorflow() -> Iterator[None]:
  """Lets a TFDS build spill its shuffle buffer to disk without TensorFlow installed.

  TFDS writes array_record files without TensorFlow, except for one path: when a split's
  serialized examples exceed the shuffler's in-memory buffer (1 GB in TFDS 4.9), the shuffler
  spills them into bucket files through `tf.io.gfile`, and the build dies with
  "No module named 'tensorflow'" (the real DFEW or VoxCeleb2 at 128 px, or the `large` twins).
  Inside this context, and only when TensorFlow is absent, the shuffler's `tf` is a stand-in
  whose `io.gfile` opens, tests and removes files through `etils.epath`, the file layer TFDS
  uses everywhere else. With TensorFlow installed nothing changes.
  """
  import importlib.util

  from tensorflow_datasets.core import shuffle

  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  previous = shuffle.tf
  shuffle.tf = _TensorFlowForShuffler
  try:
    yield
  finally:
    shuffle.tf = previous
