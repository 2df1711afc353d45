"""Weights-free measures of talking-face video on the synthetic twin (HDTF, VoxCeleb2).

The twin knows, per frame, how far the mouth is open (`mouth_open`, the renderer's inner-lip
gap in head half-heights) and whose face it is. These measures let a talking-head evaluation
ask "does the generated mouth open when the true one does, in time?" and "is it still the
portrait's person?" without a pretrained network (SyncNet, a face recogniser), by fitting small
linear probes on twin frames with their ground truth:

- `fit_mouth_probe(frames, mouth_open) -> MouthProbe`: ridge regression from features of the
  mouth region (the lower middle of a face crop, resized to 64 px) to the mouth opening. The
  features are normalised by the face's own appearance in the same frame and do not depend on
  where the mouth sits: after a Gaussian blur (sigma 1.2 px) that removes the camera noise, each
  pixel's colour is taken as the log ratio to the region's median colour (the skin: skin tone,
  light and colour cast cancel), giving its luminance and redness (R over G) against the skin
  and its luminance against the rows two above and below (a thin bright or dark line: the
  teeth, the mouth's cavity, the line between closed lips). Each of the six signed maps (+/-
  of the three) is turned into soft indicators of exceeding 0.1 and 0.3 (a sigmoid 0.05 wide),
  and the feature is how many rows of four central column strips light up in each: the sorted
  top 12 rows of each strip, a vertical extent. Extents rather than pixel values make the
  features nearly independent of skin tone: with pale skin the open mouth shows as a dark
  cavity below teeth about as bright as the skin, with dark skin as bright teeth over a cavity
  about as dark as the lips, and a probe on raw pixel values read the latter's opening
  backwards. The probe is fitted on the frames and on blurred copies of them (sigma 1.5 px), so
  a generated, softer frame reads the same as a sharp one. On twins of 40 training identities
  (one 1.6-2 s clip each, 64 px) the Pearson correlation with the truth on 8 held-out
  identities is above 0.82 within every held-out clip and 0.82-0.83 pooled over them (three
  twin seeds); docs/design.md section 5 has the numbers.
- `fit_identity_probe(frames, identities) -> IdentityProbe`: ridge classifier (one-hot
  targets) on the face's centre, downsampled to 12 x 12 colour pixels normalised per frame,
  plus the face's mean chromaticity; `probe(frames)` gives identities, `probe.probabilities`
  a softmax of the scores with a temperature fitted on the training frames.
- `av_offset(signal, reference, max_lag) -> (lag, correlation)`: the lag in frames (positive:
  `signal` is late, `signal[t]` follows `reference[t - lag]`) that maximises the Pearson
  correlation, e.g. a generated clip's probed mouth opening against the true one or against
  the audio's loudness.
- `pearson(a, b)`: Pearson correlation of two equally long sequences (NaN when either is
  constant).
- `fit_twin_probes(source)`: both probes fitted on a built twin split (a stage's evaluation
  fits them on the training split, then reads generated frames).

All take frames `[..., H, W, 3]` as uint8 or as floats in [0, 1], any square size, and run in
numpy on the host: fitting on a few thousand frames takes seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import scipy.special
from numpy.typing import ArrayLike

PROBE_SIZE = 64  # frames are resized to this side before the features are taken
MOUTH_BOX = (0.54, 0.94, 0.22, 0.78)  # rows, columns of the mouth region (fractions)
FACE_BOX = (0.2, 0.8, 0.25, 0.75)  # the face's centre, for the identity probe
DENOISE_SIGMA = 1.2  # pixels of PROBE_SIZE
AUGMENT_BLUR_SIGMA = 1.5  # the blurred copies the mouth probe also fits
MOUTH_RIDGE = 0.05  # ridge penalty per training frame, on standardised features
CODE_RIDGE = 0.01  # the code probe's ridge penalty per training frame
IDENTITY_RIDGE = 0.01
MOUTH_STRIPS = 4  # central column strips of the mouth region whose vertical extents are taken
_STRIP_WIDTH = 5  # pixels of PROBE_SIZE per strip
_ROWS_KEPT = 12  # the most lit rows of each strip
_THRESHOLDS = (0.1, 0.3)  # of the log ratios the soft indicators mark
_SOFTNESS = 0.05  # the indicators' sigmoid width
_LOG_FLOOR = 0.02  # added to colours before their log ratio (dark pixels stay finite)
_LINE_SPAN = 2  # rows above and below a pixel that its line contrast compares with


def _as_frames(frames: ArrayLike, what: str = "frames") -> tuple[np.ndarray, tuple[int, ...]]:
  """`([N, PROBE_SIZE, PROBE_SIZE, 3] float32 in [0, 1], leading shape)` of `[..., H, W, 3]`."""
  frames = np.asarray(frames)
  if frames.ndim < 3 or frames.shape[-1] != 3:
    raise ValueError(f"{what} must be [..., H, W, 3] RGB, got shape {frames.shape}")
  lead = frames.shape[:-3]
  frames = frames.reshape(-1, *frames.shape[-3:])
  if frames.dtype == np.uint8:
    frames = frames.astype(np.float32) / 255.0
  else:
    frames = frames.astype(np.float32)
  height, width = frames.shape[1:3]
  if (height, width) != (PROBE_SIZE, PROBE_SIZE):
    # Area-like resampling (antialiased when shrinking), as the frames' pixels average.
    frames = np.stack(
      [
        scipy.ndimage.zoom(
          scipy.ndimage.gaussian_filter(f, (max(0.0, 0.5 * height / PROBE_SIZE - 0.5),) * 2 + (0,)),
          (PROBE_SIZE / height, PROBE_SIZE / width, 1),
          order=1,
          grid_mode=True,
          mode="nearest",
        )
        for f in frames
      ]
    )
  return frames, lead


def _box(frames: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
  size = frames.shape[1]
  r0, r1, c0, c1 = (int(round(b * size)) for b in box)
  return frames[:, r0:r1, c0:c1]


def _mouth_maps(frames: np.ndarray) -> list[np.ndarray]:
  """The signed maps `[N, rows, cols]` of the mouth region the mouth features threshold."""
  region = scipy.ndimage.gaussian_filter(
    _box(frames, MOUTH_BOX), (0, DENOISE_SIGMA, DENOISE_SIGMA, 0)
  )
  count = len(region)
  skin = np.median(region.reshape(count, -1, 3), axis=1)[:, None, None, :]
  ratio = np.log((region + _LOG_FLOOR) / (skin + _LOG_FLOOR))  # against the skin, per channel
  luminance = ratio.mean(-1)
  redness = ratio[..., 0] - ratio[..., 1]
  padded = np.pad(luminance, ((0, 0), (_LINE_SPAN,) * 2, (0, 0)), mode="edge")
  line = luminance - 0.5 * (padded[:, : -2 * _LINE_SPAN] + padded[:, 2 * _LINE_SPAN :])
  return [line, -line, luminance, -luminance, redness, -redness]


def mouth_features(frames: np.ndarray) -> np.ndarray:
  """`[N, F]` features of the mouth region of `[N, PROBE_SIZE, PROBE_SIZE, 3]` float frames:
  for each signed map and threshold, the sorted top rows of soft exceedance in central column
  strips (see the module's docstring)."""
  maps = _mouth_maps(frames)
  count, rows, cols = maps[0].shape
  first = (cols - MOUTH_STRIPS * _STRIP_WIDTH) // 2
  features = []
  for signed in maps:
    strips = signed[:, :, first : first + MOUTH_STRIPS * _STRIP_WIDTH]
    for threshold in _THRESHOLDS:
      lit = scipy.special.expit((strips - threshold) / _SOFTNESS)
      lit = lit.reshape(count, rows, MOUTH_STRIPS, _STRIP_WIDTH).mean(-1)
      features.append(-np.sort(-lit, axis=1)[:, :_ROWS_KEPT].reshape(count, -1))
  return np.concatenate(features, axis=1).astype(np.float32)


def identity_features(frames: np.ndarray) -> np.ndarray:
  """`[N, F]` features of the face's centre of `[N, PROBE_SIZE, PROBE_SIZE, 3]` float frames."""
  face = _box(frames, FACE_BOX)
  count, height, width = face.shape[:3]
  small = face[:, : height - height % 12, : width - width % 12]
  small = small.reshape(count, 12, small.shape[1] // 12, 12, small.shape[2] // 12, 3).mean((2, 4))
  mean = small.mean((1, 2, 3), keepdims=True)
  std = small.std((1, 2, 3), keepdims=True) + 0.02
  colour = face.reshape(count, -1, 3).mean(1)
  chroma = colour / (colour.sum(-1, keepdims=True) + 1e-3)
  return np.concatenate([((small - mean) / std).reshape(count, -1), chroma, colour], axis=1).astype(
    np.float32
  )


@dataclasses.dataclass(frozen=True)
class _Ridge:
  """Ridge regression on standardised features: `((x - mean) / scale) @ weights + bias`."""

  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray  # [F] or [F, K]
  bias: np.ndarray

  @classmethod
  def fit(cls, features: np.ndarray, targets: np.ndarray, penalty: float) -> _Ridge:
    mean, scale = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / scale
    bias = targets.mean(0)
    gram = z.T @ z + penalty * len(z) * np.eye(z.shape[1], dtype=z.dtype)
    weights = np.linalg.solve(gram.astype(np.float64), (z.T @ (targets - bias)).astype(np.float64))
    return cls(mean, scale, weights.astype(np.float32), np.asarray(bias, np.float32))

  def __call__(self, features: np.ndarray) -> np.ndarray:
    return ((features - self.mean) / self.scale) @ self.weights + self.bias


@dataclasses.dataclass(frozen=True)
class MouthProbe:
  """Reads the mouth opening (head half-heights, as the twin's `mouth_open`) off face frames."""

  ridge: _Ridge

  def __call__(self, frames: ArrayLike) -> np.ndarray:
    """`[...]` the estimated mouth opening of frames `[..., H, W, 3]`."""
    frames, lead = _as_frames(frames)
    return self.ridge(mouth_features(frames)).reshape(lead)


def fit_mouth_probe(frames: ArrayLike, mouth_open: ArrayLike) -> MouthProbe:
  """Fits a `MouthProbe` on face frames `[..., H, W, 3]` and their true `mouth_open` `[...]`."""
  frames, lead = _as_frames(frames)
  target = np.asarray(mouth_open, np.float32)
  if target.shape != lead:
    raise ValueError(f"mouth_open has shape {target.shape}, the frames' leading shape is {lead}")
  if len(frames) < 2 or np.ptp(target) == 0:
    raise ValueError("the mouth probe needs frames with different mouth openings")
  blurred = scipy.ndimage.gaussian_filter(frames, (0, AUGMENT_BLUR_SIGMA, AUGMENT_BLUR_SIGMA, 0))
  features = np.concatenate([mouth_features(frames), mouth_features(blurred)])
  targets = np.concatenate([target.reshape(-1)] * 2)
  return MouthProbe(_Ridge.fit(features, targets, MOUTH_RIDGE))


@dataclasses.dataclass(frozen=True)
class CodeProbe:
  """Reads the mouth opening off motion codes (a talking-head stage 1's), up to a per-clip
  offset: for within-clip correlations of sampled codes with the true opening."""

  ridge: _Ridge

  def __call__(self, codes: ArrayLike) -> np.ndarray:
    """`[...]` the estimated opening (plus an offset) of codes `[..., D]`."""
    codes = np.asarray(codes, np.float64)
    return self.ridge(codes.reshape(-1, codes.shape[-1])).reshape(codes.shape[:-1])


def fit_code_probe(codes: Sequence[ArrayLike], mouth_open: Sequence[ArrayLike]) -> CodeProbe:
  """Fits a `CodeProbe` on clips' codes (each `[T_i, D]`) and true openings (each `[T_i]`),
  both centred per clip, so what a clip's identity adds to every code of it is left out."""
  if len(codes) != len(mouth_open) or not codes:
    raise ValueError(
      f"need as many code clips as opening clips (>= 1): {len(codes)}, {len(mouth_open)}"
    )
  features, targets = [], []
  for i, (code, mouth) in enumerate(zip(codes, mouth_open)):
    code, mouth = np.asarray(code, np.float64), np.asarray(mouth, np.float64)
    if code.ndim != 2 or mouth.shape != code.shape[:1]:
      raise ValueError(
        f"clip {i}: codes {code.shape} must be [T, D] and openings [T], got {mouth.shape}"
      )
    features.append(code - code.mean(axis=0))
    targets.append(mouth - mouth.mean())
  targets = np.concatenate(targets)
  if np.ptp(targets) == 0:
    raise ValueError("the code probe needs clips whose mouth opening changes")
  return CodeProbe(_Ridge.fit(np.concatenate(features), targets, CODE_RIDGE))


@dataclasses.dataclass(frozen=True)
class IdentityProbe:
  """Tells which of the identities it was fitted on a face frame shows."""

  ridge: _Ridge
  identities: np.ndarray  # [K] the labels, in score order
  temperature: float  # softmax temperature of the scores

  def scores(self, frames: ArrayLike) -> np.ndarray:
    """`[..., K]` one score per identity (about 1 for the shown identity, 0 for the others)."""
    frames, lead = _as_frames(frames)
    return self.ridge(identity_features(frames)).reshape(*lead, len(self.identities))

  def probabilities(self, frames: ArrayLike) -> np.ndarray:
    """`[..., K]` softmax of the scores over `identities`."""
    logits = self.scores(frames) / self.temperature
    logits -= logits.max(-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(-1, keepdims=True)

  def __call__(self, frames: ArrayLike) -> np.ndarray:
    """`[...]` the most likely identity of each frame (labels as given to the fit)."""
    return self.identities[np.argmax(self.scores(frames), axis=-1)]


def fit_identity_probe(frames: ArrayLike, identities: ArrayLike) -> IdentityProbe:
  """Fits an `IdentityProbe` on face frames `[..., H, W, 3]` and their identity labels `[...]`
  (strings or integers; at least two identities)."""
  frames, lead = _as_frames(frames)
  labels = np.asarray(identities)
  if labels.shape != lead:
    raise ValueError(f"identities has shape {labels.shape}, the frames' leading shape is {lead}")
  names, index = np.unique(labels.reshape(-1), return_inverse=True)
  if len(names) < 2:
    raise ValueError(f"the identity probe needs at least two identities, got {list(names)}")
  onehot = np.eye(len(names), dtype=np.float32)[index]
  features = identity_features(frames)
  ridge = _Ridge.fit(features, onehot, IDENTITY_RIDGE)
  scores = ridge(features)
  # The temperature that makes the training frames' probabilities most likely.
  temperatures = np.geomspace(0.005, 1.0, 40)
  loss = []
  for t in temperatures:
    logits = scores / t
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss.append(-log_probs[np.arange(len(index)), index].mean())
  return IdentityProbe(ridge, names, float(temperatures[int(np.argmin(loss))]))


def fit_twin_probes(
  source, every: int = 2, max_examples: int | None = None
) -> tuple[MouthProbe, IdentityProbe]:
  """Both probes fitted on a built twin split (`hdtf`'s examples: `video`, `mouth_open`,
  `identity`, `has_ground_truth`), e.g. `pipeline.tfds_source("hdtf", data_dir, "train")`.

  Takes every `every`-th frame of up to `max_examples` evenly spread examples with ground
  truth; a split without ground truth (the real data) raises naming what is missing.
  """
  count = len(source)
  picks = (
    range(count)
    if max_examples is None
    else np.unique(np.linspace(0, count - 1, min(count, max_examples)).astype(int))
  )
  frames, mouth, identities = [], [], []
  for i in picks:
    example = source[int(i)]
    if not bool(example["has_ground_truth"]):
      continue
    video = np.asarray(example["video"])[::every]
    frames.append(video)
    mouth.append(np.asarray(example["mouth_open"])[::every])
    identity = example["identity"]
    identities += [identity.decode() if isinstance(identity, bytes) else str(identity)] * len(video)
  if not frames:
    raise ValueError(
      f"none of the {count} examples has ground truth (has_ground_truth): the probes need the "
      "synthetic twin's per-frame mouth opening"
    )
  frames = np.concatenate(frames)
  return (
    fit_mouth_probe(frames, np.concatenate(mouth)),
    fit_identity_probe(frames, np.array(identities)),
  )


def pearson(a: ArrayLike, b: ArrayLike) -> float:
  """The Pearson correlation of two equally long sequences (NaN when either is constant)."""
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"pearson needs sequences of equal length, got {len(a)} and {len(b)}")
  a, b = a - a.mean(), b - b.mean()
  norm = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / norm) if norm > 0 else float("nan")


def mean_pearson(a: Sequence[ArrayLike], b: Sequence[ArrayLike]) -> float:
  """The mean over pairs of sequences (clips) of their Pearson correlation, clips where either is
  constant left out (NaN when all are): how one follows the other within each clip, apart from
  each clip's offset."""
  values = [pearson(x, y) for x, y in zip(a, b, strict=True)]
  return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def av_offset(
  signal: ArrayLike | Sequence[ArrayLike],
  reference: ArrayLike | Sequence[ArrayLike],
  max_lag: int = 15,
) -> tuple[int, float]:
  """The lag in frames, within `[-max_lag, max_lag]`, at which `signal` best follows
  `reference`, and the Pearson correlation there.

  A positive lag means `signal` is late: `signal[t]` goes with `reference[t - lag]`. Either
  two sequences `[T]`, or two lists of sequences (clips, each pair equally long), whose
  overlapping pairs are pooled at every lag. Ties go to the smallest |lag|.
  """
  if isinstance(signal, np.ndarray) or np.ndim(signal[0]) == 0:
    signal, reference = [signal], [reference]
  pairs = []
  for s, r in zip(signal, reference, strict=True):
    s, r = np.asarray(s, np.float64).reshape(-1), np.asarray(r, np.float64).reshape(-1)
    if s.shape != r.shape:
      raise ValueError(f"av_offset needs equally long clips, got {len(s)} and {len(r)}")
    pairs.append((s, r))
  if max_lag < 0 or max_lag >= min(len(s) for s, _ in pairs) - 1:
    raise ValueError(f"max_lag {max_lag} must be in [0, shortest clip length - 2]")
  best = (0, -np.inf)
  for lag in sorted(range(-max_lag, max_lag + 1), key=abs):
    a = np.concatenate([s[max(lag, 0) : len(s) + min(lag, 0)] for s, _ in pairs])
    b = np.concatenate([r[max(-lag, 0) : len(r) - max(lag, 0)] for _, r in pairs])
    correlation = pearson(a, b)
    if correlation > best[1]:
      best = (lag, correlation)
  if best[1] == -np.inf:  # a constant sequence: no lag correlates
    return 0, float("nan")
  return best[0], float(best[1])
