"""Per-example transforms for the video family: expression classes and action units.

They sit between a TFDS source of the video builders (DFEW, MAFW, FERV39k, BP4D, DISFA) and
the model, on top of the generic plumbing in `data_pipelines/pipeline.py`:

    train:  train_dataset(source, make_train_transform(num_frames=16, image_size=112), ...)
    eval:   eval_dataset(source, make_eval_transform(num_frames=16, image_size=112), ...)

Outputs follow docs/design.md section 3 (per example, before batching; every example of a family has
the same shapes, so the default stacking batches them):

    video  uint8   [T, H, W, 3]  T = num_frames, H = W = image_size
    label  int32   []            expression class (clip datasets)
    aus    float32 [A]           AU occurrence of the labelled frame (action-unit datasets)

Clip datasets (examples with `label`): training takes one random frame from each of T equal
segments of the stored clip, evaluation the centre frame of each segment; clips shorter than
T repeat frames. Action-unit datasets (examples with `frame_aus`): labels belong to single
frames, so the transform takes T *consecutive* frames centred on one frame (random in
training, the window's centre in evaluation) and returns that frame's AUs, repeating edge
frames where the window runs out.

Spatially, training draws one random resized crop per clip (scale and aspect ranges as in
Inception/torchvision), flips the clip left-right with probability `flip_prob` and jitters
brightness, contrast and saturation; evaluation takes the centred square covering
`crop_fraction` of the stored frame (112 of 128 pixels by default). Both resize to
`image_size`. Stored frames are already small (see `data_pipelines/builders/_video.py`), so
this costs a few milliseconds per clip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from data_pipelines.ops import video as video_ops

Example = Mapping[str, Any]


def _frames_and_target(
  example: Example, num_frames: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The sampled frames `[T, S, S, 3]` and the label or AUs; `rng=None` means evaluation."""
  video = np.asarray(example["video"])  # [T_stored, S, S, 3]
  stored = len(video)
  if stored == 0:
    raise ValueError(f"example {example.get('key', '?')!r} has no frames")
  if "frame_aus" in example:
    centre = stored // 2 if rng is None else int(rng.integers(stored))
    indices = video_ops.window_indices(stored, num_frames, centre)
    aus = np.asarray(example["frame_aus"], np.float32)[centre]
    return video[indices], {"aus": aus}
  if rng is None:
    indices = video_ops.uniform_indices(stored, num_frames)
  else:
    indices = video_ops.random_indices(stored, num_frames, rng)
  return video[indices], {"label": np.int32(example["label"])}


def train_transform(
  example: Example,
  rng: np.random.Generator,
  *,
  num_frames: int = 16,
  image_size: int = 112,
  scale: tuple[float, float] = (0.5, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  flip_prob: float = 0.5,
  brightness: float = 0.3,
  contrast: float = 0.3,
  saturation: float = 0.3,
) -> dict[str, np.ndarray]:
  """Random temporal sample, random resized crop, flip and colour jitter of one example.

  Args:
    example: a builder example (`video` and `label`, or `video` and `frame_aus`).
    rng: all randomness of this example.
    num_frames: T, frames per output clip.
    image_size: output height and width.
    scale, ratio: area share and aspect range of the random crop box.
    flip_prob: probability of mirroring the clip.
    brightness, contrast, saturation: jitter strengths (factors drawn from [1 - s, 1 + s]);
      all zero turns jitter off.

  Returns:
    `{"video": uint8 [T, H, W, 3], "label": int32 []}` or `{..., "aus": float32 [A]}`.
  """
  frames, target = _frames_and_target(example, num_frames, rng)
  box = video_ops.random_resized_crop_box(*frames.shape[1:3], rng, scale, ratio)
  flip = bool(rng.random() < flip_prob)
  matrix = None
  if brightness or contrast or saturation:
    grey = video_ops.mean_grey(frames)
    matrix = video_ops.color_jitter_matrix(rng, grey, brightness, contrast, saturation).ravel()
  # Crop, resize, flip and jitter in one Pillow pass per frame.
  video = video_ops.crop_and_resize(frames, box, image_size, flip=flip, color_matrix=matrix)
  return {"video": video, **target}


def eval_transform(
  example: Example,
  rng: np.random.Generator | None = None,
  *,
  num_frames: int = 16,
  image_size: int = 112,
  crop_fraction: float = 0.875,
) -> dict[str, np.ndarray]:
  """Uniform temporal sample and centre crop of one example (deterministic; `rng` unused).

  Args:
    example: a builder example (`video` and `label`, or `video` and `frame_aus`).
    rng: ignored; accepted so the same callable fits train-style `(example, rng)` maps.
    num_frames: T, frames per output clip.
    image_size: output height and width.
    crop_fraction: side of the centred square crop as a share of the stored frame's side.

  Returns:
    `{"video": uint8 [T, H, W, 3], "label": int32 []}` or `{..., "aus": float32 [A]}`.
  """
  del rng
  frames, target = _frames_and_target(example, num_frames, None)
  return {"video": video_ops.center_crop(frames, image_size, crop_fraction), **target}


def make_train_transform(**options: Any) -> Callable[[Example, np.random.Generator], dict]:
  """`train_transform` with its options bound (a picklable callable for worker processes)."""
  return functools.partial(train_transform, **options)


def make_eval_transform(**options: Any) -> Callable[..., dict]:
  """`eval_transform` with its options bound (a picklable callable for worker processes)."""
  return functools.partial(eval_transform, **options)
