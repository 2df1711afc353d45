"""Mesh-motion metrics for speech-driven 3D faces: LVE (squared and mm), FDD, MVE, baselines,
and the diversity of sampled motion.

Evaluation of the audio2mesh task gathers whole test sequences on the host and feeds them here,
one sequence (or one padded batch) at a time, through `MeshMetricsAccumulator`. The definitions
follow docs/design.md section 5 and the evaluation scripts behind the FaceFormer / CodeTalker /
SelfTalk tables, so numbers are comparable with those tables when the same region masks are used:

- LVE squared (`lip_vertex_error_squared`): per frame, the maximum over lip vertices of the
  *squared* L2 distance between prediction and truth; the mean over all test frames pooled
  together (a long sequence weighs more than a short one). Units: the vertices' units squared
  (m^2 for VOCASET). This is the number the published tables call "LVE".
- LVE mm (`lip_vertex_error_mm`): per frame, the maximum over lip vertices of the L2 distance
  (not squared), times `mm_per_unit`, pooled over frames the same way. Note that this is not the
  square root of LVE squared: the mean of roots is not the root of the mean.
- FDD (`upper_face_dynamics_deviation`): motion = vertices - template; per upper-face vertex the
  population standard deviation (ddof=0) over the sequence's frames of the squared motion norm;
  per sequence the mean over upper-face vertices of (std of truth - std of prediction); then the
  unweighted mean over sequences. Signed: positive means the prediction moves the upper face
  less (is stiffer) than the truth. Units: the vertices' units squared.
- MVE (`mean_vertex_error`): mean Euclidean distance over all valid frames and all vertices,
  pooled over frames.
- Diversity (`sample_diversity`, generative models): N samples for the same audio; per frame
  and vertex the standard deviation across the samples of the vertex position (the root of the
  summed per-coordinate population variances: the RMS distance to the samples' mean); per
  sequence its mean over valid frames and all vertices; then the unweighted mean over
  sequences. Units: the vertices' units (times `mm_per_unit`). Zero for a deterministic model.

In every function the prediction is cut to the truth's length (models driven by audio often
produce a frame more); a prediction shorter than the truth is an error. Region masks are data
(publications disagree on them), loaded from files by `load_region_mask`, and every result
names the masks it used.

Arrays may be numpy or JAX arrays; everything is computed on the host in float64.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


@dataclasses.dataclass(frozen=True, eq=False)
class RegionMask:
  """A named set of vertices (lips, upper face) that a metric is restricted to."""

  name: str  # printed beside every number computed with this mask, e.g. "lips_flame"
  indices: np.ndarray  # [K] int64 vertex indices, in the order the source gave them
  num_vertices: int  # vertex count of the topology the indices refer to

  @classmethod
  def from_array(
    cls, values: ArrayLike, num_vertices: int, name: str, *, source: str | None = None
  ) -> RegionMask:
    """Builds a mask from a bool array [V] or an index array [K].

    Index order and repeats are kept as given, so a published index list reproduces the
    published computation exactly (a repeated vertex counts twice in FDD's mean).

    Args:
      values: bool [V] (True = in the region) or integer [K] vertex indices.
      num_vertices: V of the mesh topology.
      name: the mask's name in reports.
      source: where the values came from (a file path), named in errors.

    Returns:
      The validated `RegionMask`.
    """
    where = source or f"region mask {name!r}"
    values = np.asarray(values)
    if values.ndim != 1:
      raise ValueError(f"{where}: expected a 1-D index list or bool mask, got shape {values.shape}")
    if values.dtype == np.bool_:
      if values.shape[0] != num_vertices:
        raise ValueError(
          f"{where}: bool mask has {values.shape[0]} entries but the mesh has {num_vertices} "
          "vertices"
        )
      indices = np.flatnonzero(values)
    elif np.issubdtype(values.dtype, np.integer):
      indices = values.astype(np.int64)
    else:
      raise ValueError(
        f"{where}: expected integer vertex indices or a bool mask, got dtype {values.dtype}"
      )
    if indices.size == 0:
      raise ValueError(f"{where}: the region is empty")
    bad = (indices < 0) | (indices >= num_vertices)
    if bad.any():
      raise ValueError(
        f"{where}: vertex index {int(indices[bad][0])} is out of range for a mesh with "
        f"{num_vertices} vertices ({int(bad.sum())} of {indices.size} indices out of range)"
      )
    return cls(name=name, indices=indices, num_vertices=int(num_vertices))


def load_region_mask(
  path: str | os.PathLike, num_vertices: int, *, name: str | None = None
) -> RegionMask:
  """Loads a vertex region from a file.

  Formats:
    - `.npy`: a 1-D integer array of vertex indices, or a 1-D bool array of length V.
    - `.txt` / `.csv`: integer vertex indices separated by commas and/or whitespace (the form of
      FaceFormer's `regions/lve.txt` and `regions/fdd.txt`).

  Args:
    path: the file.
    num_vertices: V of the mesh topology; indices must lie in [0, V).
    name: the mask's name in reports; defaults to the file's stem.

  Returns:
    A `RegionMask`. Errors name the file and the reason.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"region mask file {path} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".npy":
    try:
      values = np.load(path, allow_pickle=False)
    except ValueError as error:
      raise ValueError(f"{path}: not a plain numpy array ({error})") from error
  elif suffix in (".txt", ".csv"):
    tokens = [t for t in re.split(r"[\s,;]+", path.read_text()) if t]
    try:
      values = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as error:
      raise ValueError(f"{path}: expected integer vertex indices ({error})") from error
  else:
    raise ValueError(f"{path}: unsupported region mask format {suffix!r} (use .npy or .txt)")
  return RegionMask.from_array(values, num_vertices, name or path.stem, source=str(path))


def _region_indices(region: RegionMask | ArrayLike, num_vertices: int, what: str) -> np.ndarray:
  if isinstance(region, RegionMask):
    if region.num_vertices != num_vertices:
      raise ValueError(
        f"{what} mask {region.name!r} is for {region.num_vertices} vertices but the meshes have "
        f"{num_vertices}"
      )
    return region.indices
  return RegionMask.from_array(region, num_vertices, what).indices


def _align(
  prediction: ArrayLike, truth: ArrayLike, frame_mask: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Adds a batch axis where missing and cuts the prediction to the truth's length.

  Returns prediction [B, T, V, 3], truth [B, T, V, 3], frame_mask [B, T] bool.
  """
  prediction = np.asarray(prediction, dtype=np.float64)
  truth = np.asarray(truth, dtype=np.float64)
  if truth.ndim == 3:
    truth = truth[None]
  if prediction.ndim == 3:
    prediction = prediction[None]
  if truth.ndim != 4 or truth.shape[-1] != 3:
    raise ValueError(f"truth must be [T, V, 3] or [B, T, V, 3], got shape {truth.shape}")
  if prediction.ndim != 4 or prediction.shape[-1] != 3:
    raise ValueError(f"prediction must be [T, V, 3] or [B, T, V, 3], got shape {prediction.shape}")
  if prediction.shape[0] != truth.shape[0]:
    raise ValueError(
      f"prediction has batch size {prediction.shape[0]} but the truth has {truth.shape[0]}"
    )
  if prediction.shape[2] != truth.shape[2]:
    raise ValueError(
      f"prediction has {prediction.shape[2]} vertices but the truth has {truth.shape[2]}"
    )
  num_frames = truth.shape[1]
  if prediction.shape[1] < num_frames:
    raise ValueError(
      f"prediction has {prediction.shape[1]} frames but the truth has {num_frames}; the "
      "prediction must cover the truth (it is cut to the truth's length)"
    )
  prediction = prediction[:, :num_frames]
  if frame_mask is None:
    frame_mask = np.ones(truth.shape[:2], dtype=bool)
  else:
    frame_mask = np.asarray(frame_mask, dtype=bool)
    if frame_mask.ndim == 1:
      frame_mask = frame_mask[None]
    if frame_mask.shape != truth.shape[:2]:
      raise ValueError(
        f"frame_mask has shape {frame_mask.shape} but the truth has [B, T] = {truth.shape[:2]}"
      )
  return prediction, truth, frame_mask


def _per_frame_lip_distance(
  prediction: np.ndarray, truth: np.ndarray, lip_indices: np.ndarray
) -> np.ndarray:
  """Per frame, the maximum over lip vertices of the squared L2 distance: [B, T]."""
  difference = prediction[:, :, lip_indices] - truth[:, :, lip_indices]  # [B, T, K, 3]
  return np.max(np.sum(difference * difference, axis=-1), axis=-1)


def lip_vertex_error_squared(
  prediction: ArrayLike,
  truth: ArrayLike,
  lip_mask: RegionMask | ArrayLike,
  *,
  frame_mask: ArrayLike | None = None,
) -> float:
  """LVE in the squared form of the FaceFormer/CodeTalker/SelfTalk tables (units^2).

  Args:
    prediction: [T', V, 3] or [B, T', V, 3] with T' >= T; cut to T.
    truth: [T, V, 3] or [B, T, V, 3].
    lip_mask: the lip region (`RegionMask`, or an index list [K] / bool mask [V]).
    frame_mask: [T] or [B, T] bool, valid truth frames (padding excluded); default all valid.

  Returns:
    The mean over all valid frames (pooled over the batch) of the per-frame maximum over lip
    vertices of the squared distance.
  """
  prediction, truth, frame_mask = _align(prediction, truth, frame_mask)
  lips = _region_indices(lip_mask, truth.shape[2], "lip")
  per_frame = _per_frame_lip_distance(prediction, truth, lips)  # [B, T]
  return _pooled_mean(per_frame, frame_mask)


def lip_vertex_error_mm(
  prediction: ArrayLike,
  truth: ArrayLike,
  lip_mask: RegionMask | ArrayLike,
  *,
  frame_mask: ArrayLike | None = None,
  mm_per_unit: float = 1000.0,
) -> float:
  """LVE in the root form, in millimetres.

  Per frame, the maximum over lip vertices of the L2 distance (not squared), times
  `mm_per_unit`; the mean over all valid frames pooled over the batch. `mm_per_unit` is 1000
  for vertices in metres (VOCASET) and 1 for vertices in millimetres.

  Args: as `lip_vertex_error_squared`, plus `mm_per_unit`.
  """
  prediction, truth, frame_mask = _align(prediction, truth, frame_mask)
  lips = _region_indices(lip_mask, truth.shape[2], "lip")
  per_frame = np.sqrt(_per_frame_lip_distance(prediction, truth, lips)) * mm_per_unit
  return _pooled_mean(per_frame, frame_mask)


def _pooled_mean(per_frame: np.ndarray, frame_mask: np.ndarray) -> float:
  count = frame_mask.sum()
  if count == 0:
    raise ValueError("no valid frames: frame_mask is all False")
  return float(np.sum(per_frame, where=frame_mask) / count)


def _motion_std(
  vertices: np.ndarray, template: np.ndarray, upper_indices: np.ndarray, frame_mask: np.ndarray
) -> np.ndarray:
  """Per sequence and upper-face vertex, the std over valid frames of |motion|^2: [B, K]."""
  motion = vertices[:, :, upper_indices] - template[:, None, upper_indices]  # [B, T, K, 3]
  squared_norm = np.sum(motion * motion, axis=-1)  # [B, T, K]
  weight = frame_mask[:, :, None].astype(np.float64)  # [B, T, 1]
  count = np.maximum(weight.sum(axis=1), 1.0)  # [B, 1]
  mean = np.sum(squared_norm * weight, axis=1) / count  # [B, K]
  variance = np.sum(weight * (squared_norm - mean[:, None]) ** 2, axis=1) / count
  return np.sqrt(variance)


def _sequence_fdd(
  prediction: np.ndarray,
  truth: np.ndarray,
  template: np.ndarray,
  upper_indices: np.ndarray,
  frame_mask: np.ndarray,
) -> np.ndarray:
  """Per-sequence FDD [B] (rows of the batch whose frame_mask is all False give NaN)."""
  template = np.asarray(template, dtype=np.float64)
  if template.ndim == 2:
    template = np.broadcast_to(template[None], (truth.shape[0],) + template.shape)
  if template.shape != (truth.shape[0], truth.shape[2], 3):
    raise ValueError(
      f"template must be [V, 3] or [B, V, 3] with V = {truth.shape[2]}, got {template.shape}"
    )
  std_truth = _motion_std(truth, template, upper_indices, frame_mask)
  std_prediction = _motion_std(prediction, template, upper_indices, frame_mask)
  fdd = np.mean(std_truth - std_prediction, axis=-1)  # [B]
  return np.where(frame_mask.any(axis=1), fdd, np.nan)


def upper_face_dynamics_deviation(
  prediction: ArrayLike,
  truth: ArrayLike,
  template: ArrayLike,
  upper_face_mask: RegionMask | ArrayLike,
  *,
  frame_mask: ArrayLike | None = None,
) -> float:
  """FDD, signed: mean over sequences of mean over upper-face vertices of (std_truth - std_pred).

  std is the population standard deviation (ddof=0) over a sequence's valid frames of the
  squared norm of motion = vertices - template. Positive means the prediction's upper face moves
  less than the truth's.

  Args:
    prediction: [T', V, 3] or [B, T', V, 3] with T' >= T; cut to T.
    truth: [T, V, 3] or [B, T, V, 3].
    template: [V, 3] or [B, V, 3], each sequence's neutral mesh.
    upper_face_mask: the upper-face region (`RegionMask`, index list [K] or bool mask [V]).
    frame_mask: [T] or [B, T] bool valid frames; batch rows with no valid frame are padding
      and skipped.

  Returns:
    The unweighted mean over sequences of the per-sequence FDD (units^2).
  """
  prediction, truth, frame_mask = _align(prediction, truth, frame_mask)
  upper = _region_indices(upper_face_mask, truth.shape[2], "upper-face")
  per_sequence = _sequence_fdd(prediction, truth, template, upper, frame_mask)
  valid = ~np.isnan(per_sequence)
  if not valid.any():
    raise ValueError("no valid sequences: frame_mask is all False")
  return float(np.mean(per_sequence[valid]))


def _vertex_distance(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Per frame, the mean over vertices of the Euclidean distance: [B, T]."""
  difference = prediction - truth
  return np.mean(np.sqrt(np.sum(difference * difference, axis=-1)), axis=-1)


def mean_vertex_error(
  prediction: ArrayLike,
  truth: ArrayLike,
  *,
  frame_mask: ArrayLike | None = None,
) -> float:
  """MVE: mean Euclidean distance over all valid frames (pooled) and all vertices (units).

  Args:
    prediction: [T', V, 3] or [B, T', V, 3] with T' >= T; cut to T.
    truth: [T, V, 3] or [B, T, V, 3].
    frame_mask: [T] or [B, T] bool valid frames.
  """
  prediction, truth, frame_mask = _align(prediction, truth, frame_mask)
  return _pooled_mean(_vertex_distance(prediction, truth), frame_mask)


def sequence_diversity(samples: ArrayLike, frame_mask: ArrayLike | None = None) -> np.ndarray:
  """Per-sequence diversity [B] of N samples for each sequence (see the module docstring).

  Args:
    samples: [N, T, V, 3] or [N, B, T, V, 3], N >= 2 samples of the same sequences.
    frame_mask: [T] or [B, T] bool valid frames; rows with no valid frame give NaN.

  Returns:
    [B] the mean over valid frames and all vertices of the per-vertex standard deviation across
    samples (units).
  """
  samples = np.asarray(samples, np.float64)
  if samples.ndim == 4:
    samples = samples[:, None]
  if samples.ndim != 5 or samples.shape[-1] != 3:
    raise ValueError(f"samples must be [N, T, V, 3] or [N, B, T, V, 3], got {samples.shape}")
  if samples.shape[0] < 2:
    raise ValueError(f"diversity needs at least 2 samples, got {samples.shape[0]}")
  if frame_mask is None:
    frame_mask = np.ones(samples.shape[1:3], bool)
  frame_mask = np.asarray(frame_mask, bool).reshape(-1, samples.shape[2])
  if frame_mask.shape != samples.shape[1:3]:
    raise ValueError(f"frame_mask must be [B, T] = {samples.shape[1:3]}, got {frame_mask.shape}")
  deviation = samples - samples.mean(axis=0, keepdims=True)  # [N, B, T, V, 3]
  std = np.sqrt(np.mean(np.sum(deviation * deviation, axis=-1), axis=0))  # [B, T, V]
  per_frame = std.mean(axis=-1)  # [B, T]
  count = frame_mask.sum(axis=1)
  total = np.sum(per_frame, axis=1, where=frame_mask)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def sample_diversity(
  samples: ArrayLike, frame_mask: ArrayLike | None = None, *, mm_per_unit: float = 1.0
) -> float:
  """Diversity of N samples: the mean over sequences of `sequence_diversity`, times
  `mm_per_unit` (1000 for vertices in metres, to report mm). Args as `sequence_diversity`."""
  per_sequence = sequence_diversity(samples, frame_mask)
  valid = ~np.isnan(per_sequence)
  if not valid.any():
    raise ValueError("no valid sequences: frame_mask is all False")
  return float(np.mean(per_sequence[valid])) * mm_per_unit


def mouth_opening(vertices: ArrayLike, template: ArrayLike, lips: RegionMask) -> np.ndarray:
  """The mouth's opening per frame: the mean height (y) of the lip vertices that sit above the
  lips' median height in the template minus that of those below. `vertices [T, V, 3]`,
  `template [V, 3]` -> `[T]` in the vertices' units; it grows as the jaw drops and the lips
  part, and is what lip sync times."""
  vertices, template = np.asarray(vertices), np.asarray(template)
  height = template[lips.indices, 1]
  upper = lips.indices[height > np.median(height)]
  lower = lips.indices[height <= np.median(height)]
  return vertices[:, upper, 1].mean(1) - vertices[:, lower, 1].mean(1)


def static_template_prediction(template: ArrayLike, num_frames: int) -> np.ndarray:
  """The *static template* baseline: the neutral face, not moving. Returns [T, V, 3]."""
  template = np.asarray(template)
  if template.ndim != 2 or template.shape[-1] != 3:
    raise ValueError(f"template must be [V, 3], got shape {template.shape}")
  return np.repeat(template[None], num_frames, axis=0)


def mean_motion_prediction(
  template: ArrayLike, mean_offset: ArrayLike, num_frames: int
) -> np.ndarray:
  """The *mean motion* baseline: template + the training set's mean offset.

  Args:
    template: [V, 3] the test subject's neutral mesh.
    mean_offset: [V, 3] the mean over training frames of (vertices - template) (see
      `training_mean_offset`), added to every frame; or [T0, V, 3] a per-frame mean offset,
      used for the first T0 frames, its last frame held beyond T0 and the extra frames cut
      when T0 > num_frames.
    num_frames: T.

  Returns:
    [T, V, 3] vertices.
  """
  template = np.asarray(template)
  mean_offset = np.asarray(mean_offset)
  if template.ndim != 2 or template.shape[-1] != 3:
    raise ValueError(f"template must be [V, 3], got shape {template.shape}")
  if mean_offset.ndim == 2:
    mean_offset = mean_offset[None]
  if mean_offset.ndim != 3 or mean_offset.shape[1:] != template.shape:
    raise ValueError(
      f"mean_offset must be [V, 3] or [T0, V, 3] with V, 3 = {template.shape}, got "
      f"{mean_offset.shape}"
    )
  frame_index = np.minimum(np.arange(num_frames), mean_offset.shape[0] - 1)  # [T]
  return template[None] + mean_offset[frame_index]


def training_mean_offset(sequences: Iterable[tuple[ArrayLike, ArrayLike]]) -> np.ndarray:
  """Mean over all training frames (pooled) of vertices - template, streaming.

  Args:
    sequences: (vertices [T, V, 3], template [V, 3]) pairs, e.g. one per training sequence.

  Returns:
    [V, 3] float64 mean offset for `mean_motion_prediction`.
  """
  total = None
  count = 0
  for vertices, template in sequences:
    offset = np.asarray(vertices, np.float64) - np.asarray(template, np.float64)[None]
    total = offset.sum(axis=0) if total is None else total + offset.sum(axis=0)
    count += offset.shape[0]
  if count == 0:
    raise ValueError("training_mean_offset needs at least one frame")
  return total / count


class MeshMetricsAccumulator:
  """Accumulates LVE (both forms), FDD and MVE over whole test sequences.

  Frames are pooled for LVE and MVE; FDD is averaged over sequences, as section 5 defines.

  Example:
    acc = MeshMetricsAccumulator(load_region_mask("lips.npy", 5023),
                                 load_region_mask("upper_face.npy", 5023))
    for pred, truth, template in sequences:
      acc.add(pred, truth, template)
    acc.compute()  # {"lve_squared": ..., "lve_mm": ..., "fdd": ..., "mve": ..., "mve_mm": ...,
                   #  "num_sequences": ..., "num_frames": ..., "lip_mask": "lips",
                   #  "upper_face_mask": "upper_face"}
  """

  # The numeric entries of `compute()`; the others are the mask names.
  METRIC_NAMES = ("lve_squared", "lve_mm", "fdd", "mve", "mve_mm", "num_sequences", "num_frames")

  def __init__(
    self, lip_mask: RegionMask, upper_face_mask: RegionMask, *, mm_per_unit: float = 1000.0
  ):
    if lip_mask.num_vertices != upper_face_mask.num_vertices:
      raise ValueError(
        f"lip mask {lip_mask.name!r} is for {lip_mask.num_vertices} vertices but upper-face mask "
        f"{upper_face_mask.name!r} is for {upper_face_mask.num_vertices}"
      )
    self.lip_mask = lip_mask
    self.upper_face_mask = upper_face_mask
    self.mm_per_unit = mm_per_unit
    self.reset()

  def reset(self) -> None:
    self._lve_squared_sum = 0.0
    self._lve_root_sum = 0.0
    self._mve_sum = 0.0
    self._num_frames = 0
    self._fdd_values: list[float] = []

  def add(self, prediction: ArrayLike, truth: ArrayLike, template: ArrayLike) -> dict[str, float]:
    """Adds one whole sequence: prediction [T', V, 3] (T' >= T), truth [T, V, 3], template [V, 3].

    Returns this sequence's own metrics (same keys as `compute`'s numbers).
    """
    prediction, truth, template = (np.asarray(x)[None] for x in (prediction, truth, template))
    return self.add_batch(prediction, truth, template)[0]

  def add_batch(
    self,
    prediction: ArrayLike,
    truth: ArrayLike,
    template: ArrayLike,
    frame_mask: ArrayLike | None = None,
  ) -> list[dict[str, float]]:
    """Adds a padded batch: prediction [B, T', V, 3], truth [B, T, V, 3], template [B, V, 3],
    frame_mask [B, T] bool. Rows with no valid frame are padding and skipped.

    Returns one metrics dict per non-padding row.
    """
    prediction, truth, frame_mask = _align(prediction, truth, frame_mask)
    num_vertices = truth.shape[2]
    if num_vertices != self.lip_mask.num_vertices:
      raise ValueError(
        f"meshes have {num_vertices} vertices but the masks are for {self.lip_mask.num_vertices}"
      )
    lve_squared = _per_frame_lip_distance(prediction, truth, self.lip_mask.indices)  # [B, T]
    lve_mm = np.sqrt(lve_squared) * self.mm_per_unit
    mve = _vertex_distance(prediction, truth)  # [B, T]
    fdd = _sequence_fdd(prediction, truth, template, self.upper_face_mask.indices, frame_mask)
    per_sequence = []
    for row in range(truth.shape[0]):
      mask = frame_mask[row]
      count = int(mask.sum())
      if count == 0:
        continue
      sums = [float(np.sum(x[row], where=mask)) for x in (lve_squared, lve_mm, mve)]
      self._lve_squared_sum += sums[0]
      self._lve_root_sum += sums[1]
      self._mve_sum += sums[2]
      self._num_frames += count
      self._fdd_values.append(float(fdd[row]))
      per_sequence.append(
        {
          "lve_squared": sums[0] / count,
          "lve_mm": sums[1] / count,
          "fdd": float(fdd[row]),
          "mve": sums[2] / count,
          "mve_mm": sums[2] / count * self.mm_per_unit,
          "num_sequences": 1,
          "num_frames": count,
        }
      )
    return per_sequence

  def compute(self) -> dict[str, float | int | str]:
    """The pooled metrics and the names of the masks they used.

    Keys: `lve_squared` (units^2), `lve_mm` (mm), `fdd` (units^2, signed), `mve` (units),
    `mve_mm` (mm), `num_sequences`, `num_frames`, `lip_mask`, `upper_face_mask` (mask names).
    """
    if self._num_frames == 0:
      raise ValueError("MeshMetricsAccumulator.compute called before any sequence was added")
    return {
      "lve_squared": self._lve_squared_sum / self._num_frames,
      "lve_mm": self._lve_root_sum / self._num_frames,
      "fdd": float(np.mean(self._fdd_values)),
      "mve": self._mve_sum / self._num_frames,
      "mve_mm": self._mve_sum / self._num_frames * self.mm_per_unit,
      "num_sequences": len(self._fdd_values),
      "num_frames": self._num_frames,
      "lip_mask": self.lip_mask.name,
      "upper_face_mask": self.upper_face_mask.name,
    }
