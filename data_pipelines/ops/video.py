"""Per-example video ops: decoding, temporal sampling, spatial crops and colour jitter.

Sits at both ends of the video data flow. Dataset builders use the decoding and resizing ops at
build time (PyAV for mp4/avi, Pillow for frame folders) to store clips as uint8 frames of a
fixed moderate size; the per-example transforms in `data_pipelines/video.py` use the cheap ops
(index sampling, crop + resize, flip, jitter) at training time on those stored frames.

Everything here is pure: numpy arrays in, numpy arrays out, randomness only from the
`np.random.Generator` passed in. Clips are `[T, H, W, 3] uint8` RGB; boxes are
`(x0, y0, x1, y1)` in pixels, half-open, in the frame's own coordinates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import av
import numpy as np
from PIL import Image

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")

# ITU-R BT.601 luma weights: what torchvision and PIL use for greyscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class VideoDecodeError(ValueError):
  """A video file or frame folder that cannot be read, naming the path and why."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


# ----------------------------------------------------------------------------------------------
# Decoding and encoding.


def _frame_number(name: str) -> tuple[int, str]:
  """Sort key: the last run of digits in the file stem (`00001_00012.jpg` -> 12)."""
  digits = re.findall(r"\d+", os.path.splitext(name)[0])
  return (int(digits[-1]) if digits else -1, name)


def list_frame_files(folder: str | os.PathLike) -> list[str]:
  """Paths of the jpg/png frames in `folder`, in frame order (by the number in the name)."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise VideoDecodeError(folder, "frame folder does not exist")
  names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)]
  if not names:
    raise VideoDecodeError(folder, "frame folder holds no .jpg/.png frames")
  return [os.path.join(folder, n) for n in sorted(names, key=_frame_number)]


def read_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
  """One RGB image as `[H, W, 3] uint8`; a broken file raises `VideoDecodeError` naming it.

  With `min_side`, a JPEG may be decoded at a reduced scale (1/2, 1/4, 1/8) as long as its
  shorter side stays at least `min_side` pixels: far cheaper for large frames that are
  resized down anyway.
  """
  try:
    with Image.open(path) as image:
      if min_side is not None and image.format == "JPEG":
        short = min(image.size)
        scale = max(1, min(8, short // max(min_side, 1)))
        image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as e:
    raise VideoDecodeError(path, f"cannot decode image: {e}") from e


def read_frames(paths: Sequence[str | os.PathLike], min_side: int | None = None) -> np.ndarray:
  """Decodes image files into one clip `[T, H, W, 3] uint8`; all frames must share a size.

  `min_side` allows reduced-scale JPEG decoding (see `read_image`).
  """
  frames = [read_image(p, min_side) for p in paths]
  if not frames:
    raise ValueError("read_frames needs at least one path")
  shape = frames[0].shape
  for p, f in zip(paths, frames):
    if f.shape != shape:
      raise VideoDecodeError(p, f"frame has shape {f.shape}, the clip's first frame {shape}")
  return np.stack(frames)


def read_frame_folder(
  folder: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
  """Decodes a folder of frames, or only the frames at `indices`, into `[T, H, W, 3] uint8`."""
  paths = list_frame_files(folder)
  if indices is not None:
    paths = [paths[int(i)] for i in indices]
  return read_frames(paths)


def iter_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """Yields the frames of an mp4/avi/... file as `[H, W, 3] uint8` RGB, decoding lazily.

  Any container or codec failure (a truncated file, a missing index) raises
  `VideoDecodeError` naming the file; so does a file with no video stream or no frames.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise VideoDecodeError(path, "video file does not exist")
  count = 0
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise VideoDecodeError(path, "file has no video stream")
      stream = container.streams.video[0]
      for frame in container.decode(stream):
        count += 1
        yield frame.to_ndarray(format="rgb24")
  except av.FFmpegError as e:
    raise VideoDecodeError(path, f"cannot decode video: {e}") from e
  if count == 0:
    raise VideoDecodeError(path, "video has no decodable frames")


def video_fps(path: str | os.PathLike) -> float:
  """The nominal frame rate stored in the container (frames per second)."""
  try:
    with av.open(os.fspath(path)) as container:
      if not container.streams.video:
        raise VideoDecodeError(path, "file has no video stream")
      rate = container.streams.video[0].average_rate or container.streams.video[0].base_rate
      return float(rate) if rate else 0.0
  except av.FFmpegError as e:
    raise VideoDecodeError(path, f"cannot open video: {e}") from e


def decode_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
  """The first audio stream of a video file as mono float32 `[S]` at `sample_rate` Hz.

  Talking-face videos (VoxCeleb2, HDTF) carry their speech as AAC inside the mp4; PyAV's
  resampler downmixes it and converts the rate. A file without an audio stream, or one that
  fails to decode, raises `VideoDecodeError` naming it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise VideoDecodeError(path, "video file does not exist")
  pieces = []
  try:
    with av.open(path) as container:
      if not container.streams.audio:
        raise VideoDecodeError(path, "file has no audio stream")
      resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
      for frame in container.decode(container.streams.audio[0]):
        pieces.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
      pieces.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
  except av.FFmpegError as e:
    raise VideoDecodeError(path, f"cannot decode audio: {e}") from e
  return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros((0,), np.float32)


def decode_video(
  path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
  """Decodes a video file into `[T, H, W, 3] uint8`, keeping only `indices` if given.

  Indices may repeat and come in any order; an index past the last decoded frame raises
  `VideoDecodeError` (the file is shorter than its annotation claims).
  """
  if indices is None:
    return np.stack(list(iter_video_frames(path)))
  wanted = np.asarray(indices, np.int64)
  last = int(wanted.max())
  kept: dict[int, np.ndarray] = {}
  needed = set(wanted.tolist())
  for i, frame in enumerate(iter_video_frames(path)):
    if i in needed:
      kept[i] = frame
    if i >= last:
      break
  if len(kept) < len(needed):
    raise VideoDecodeError(path, f"video has fewer frames than index {last} needs")
  return np.stack([kept[int(i)] for i in wanted])


def encode_video(
  path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str | None = None
) -> None:
  """Writes `[T, H, W, 3] uint8` frames as a video file; the container follows the extension.

  Defaults: H.264 (libx264) for `.mp4`, MPEG-4 part 2 for `.avi`. H and W must be even
  (4:2:0 chroma subsampling).
  """
  path = os.fspath(path)
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(
      f"{path}: frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}"
    )
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"{path}: frame height and width must be even, got {frames.shape[1:3]}")
  if codec is None:
    codec = "mpeg4" if path.lower().endswith(".avi") else "libx264"
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=int(round(fps)))
    stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "18", "preset": "veryfast"}
    else:
      stream.bit_rate = 4_000_000
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# ----------------------------------------------------------------------------------------------
# Temporal sampling. Both samplers return `num_samples` sorted indices in [0, num_frames);
# a clip shorter than `num_samples` repeats frames rather than padding with blanks.


def uniform_indices(num_frames: int, num_samples: int) -> np.ndarray:
  """The centre frame of each of `num_samples` equal segments (TSN-style test sampling)."""
  if num_frames < 1 or num_samples < 1:
    raise ValueError(f"need num_frames >= 1 and num_samples >= 1, got {num_frames}, {num_samples}")
  centres = (np.arange(num_samples) + 0.5) * (num_frames / num_samples)
  return np.minimum(centres.astype(np.int64), num_frames - 1)


def random_indices(num_frames: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """One random frame from each of `num_samples` equal segments (TSN-style train sampling)."""
  if num_frames < 1 or num_samples < 1:
    raise ValueError(f"need num_frames >= 1 and num_samples >= 1, got {num_frames}, {num_samples}")
  starts = np.arange(num_samples) * (num_frames / num_samples)
  offsets = rng.random(num_samples) * (num_frames / num_samples)
  return np.minimum((starts + offsets).astype(np.int64), num_frames - 1)


def window_indices(num_frames: int, num_samples: int, centre: int) -> np.ndarray:
  """`num_samples` consecutive frames centred on `centre`, repeating the edge frames."""
  first = centre - num_samples // 2
  return np.clip(np.arange(first, first + num_samples), 0, num_frames - 1)


# ----------------------------------------------------------------------------------------------
# Spatial ops.


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
  """(height, width) from an int (square) or a pair."""
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_and_resize(
  frames: np.ndarray,
  box: tuple[float, float, float, float],
  size: int | tuple[int, int],
  resample: int = Image.BILINEAR,
  flip: bool = False,
  color_matrix: Sequence[float] | None = None,
) -> np.ndarray:
  """Crops every frame to the same `box`, resizes it to `size` (height, width), and optionally
  mirrors it and applies an affine colour map.

  The box may reach outside the frame; outside pixels repeat the nearest edge. One Pillow
  pass per frame does it all in C (crop and resize together, with antialiasing when
  shrinking), which is what keeps the training transform cheap.

  Args:
    frames: `[T, H, W, 3] uint8`.
    box: `(x0, y0, x1, y1)` in pixels, half-open.
    size: output (height, width), or an int for a square.
    resample: a Pillow resampling filter.
    flip: mirror left-right after resizing.
    color_matrix: 12 numbers, the rows of a `[3, 4]` affine map applied to each RGB pixel
      (`out = M[:, :3] @ rgb + M[:, 3]`, clipped to 0..255), as `color_jitter_matrix` makes.
  """
  height, width = _as_size(size)
  x0, y0, x1, y1 = (float(v) for v in box)
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"empty crop box {box}")
  frame_h, frame_w = frames.shape[1:3]
  pad_x = int(np.ceil(max(0.0, -x0, x1 - frame_w)))
  pad_y = int(np.ceil(max(0.0, -y0, y1 - frame_h)))
  if pad_x or pad_y:
    frames = np.pad(frames, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="edge")
    x0, x1, y0, y1 = x0 + pad_x, x1 + pad_x, y0 + pad_y, y1 + pad_y
    frame_h, frame_w = frames.shape[1:3]
  whole = (round(x0), round(y0), round(x1), round(y1)) == (0, 0, frame_w, frame_h)
  out = np.empty((len(frames), height, width, 3), np.uint8)
  if whole and (height, width) == (frame_h, frame_w) and not flip and color_matrix is None:
    out[:] = frames
    return out
  matrix = None if color_matrix is None else tuple(float(m) for m in color_matrix)
  resize = not (whole and (height, width) == (frame_h, frame_w))
  frames = np.ascontiguousarray(frames)
  # Frame by frame, so each image stays in cache through all steps (one tall image of the
  # whole clip is slower); frombuffer/tobytes skip fromarray/asarray's array-interface round
  # trips, a few percent of the clip's time.
  for i in range(len(frames)):
    image = Image.frombuffer("RGB", (frame_w, frame_h), frames[i], "raw", "RGB", 0, 1)
    if resize:
      image = image.resize((width, height), resample, box=(x0, y0, x1, y1))
    if flip:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if matrix is not None:
      image = image.convert("RGB", matrix)
    out[i] = np.frombuffer(image.tobytes(), np.uint8).reshape(height, width, 3)
  return out


def resize(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Resizes every frame to `size` (height, width), bilinear with antialiasing."""
  frame_h, frame_w = frames.shape[1:3]
  return crop_and_resize(frames, (0, 0, frame_w, frame_h), size)


def center_square_box(
  height: int, width: int, fraction: float = 1.0
) -> tuple[float, float, float, float]:
  """A centred square box whose side is `fraction` of the frame's shorter side."""
  side = min(height, width) * fraction
  x0, y0 = (width - side) / 2, (height - side) / 2
  return (x0, y0, x0 + side, y0 + side)


def center_crop(
  frames: np.ndarray, size: int | tuple[int, int], fraction: float = 1.0
) -> np.ndarray:
  """Crops the centred square covering `fraction` of the shorter side, resized to `size`."""
  return crop_and_resize(frames, center_square_box(*frames.shape[1:3], fraction), size)


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.5, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
  """A random box of area `scale` x frame area and aspect `ratio` (Inception-style crop).

  Sampled as torchvision does: ten tries at a box that fits, then the largest centred box
  with a clamped aspect ratio.
  """
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = np.sqrt(target_area * aspect)
    h = np.sqrt(target_area / aspect)
    if w <= width and h <= height:
      x0 = rng.uniform(0, width - w)
      y0 = rng.uniform(0, height - h)
      return (x0, y0, x0 + w, y0 + h)
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, width / ratio[0]
  elif aspect > ratio[1]:
    w, h = height * ratio[1], height
  else:
    w, h = width, height
  x0, y0 = (width - w) / 2, (height - h) / 2
  return (x0, y0, x0 + w, y0 + h)


def random_resized_crop(
  frames: np.ndarray,
  size: int | tuple[int, int],
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.5, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """One random box for the whole clip (so motion stays coherent), resized to `size`."""
  box = random_resized_crop_box(*frames.shape[1:3], rng, scale, ratio)
  return crop_and_resize(frames, box, size)


def horizontal_flip(frames: np.ndarray) -> np.ndarray:
  """Mirrors every frame left-right."""
  return np.ascontiguousarray(frames[:, :, ::-1])


def square_box(box: Sequence[float], margin: float = 0.0) -> tuple[float, float, float, float]:
  """The square around `box`'s centre with side max(w, h) * (1 + margin)."""
  x0, y0, x1, y1 = (float(v) for v in box)
  side = max(x1 - x0, y1 - y0) * (1.0 + margin)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def crop_to_boxes(
  frames: np.ndarray,
  boxes: np.ndarray | Sequence[float],
  size: int | tuple[int, int],
  margin: float = 0.0,
) -> np.ndarray:
  """Crops each frame to its face box (made square, enlarged by `margin`), resized to `size`.

  `boxes` is one box `[4]` for the whole clip or one per frame `[T, 4]`, as
  `(x0, y0, x1, y1)` pixels. Parts of a box outside the frame repeat the edge pixels.
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape == (4,):
    return crop_and_resize(frames, square_box(boxes, margin), size)
  if boxes.shape != (len(frames), 4):
    raise ValueError(f"boxes must be [4] or [{len(frames)}, 4], got {boxes.shape}")
  height, width = _as_size(size)
  out = np.empty((len(frames), height, width, 3), np.uint8)
  for i, (frame, box) in enumerate(zip(frames, boxes)):
    out[i] = crop_and_resize(frame[None], square_box(box, margin), (height, width))[0]
  return out


# ----------------------------------------------------------------------------------------------
# Photometric ops.


def mean_grey(frames: np.ndarray) -> float:
  """Mean grey level of a clip, from a strided subsample of its pixels (cheap, and enough)."""
  sample = frames[:, ::4, ::4].reshape(-1, 3).astype(np.float32)
  return float((sample @ _LUMA).mean())


def color_jitter_matrix(
  rng: np.random.Generator,
  mean_grey_level: float,
  brightness: float = 0.3,
  contrast: float = 0.3,
  saturation: float = 0.3,
) -> np.ndarray:
  """A random brightness, contrast and saturation change as one affine colour map `[3, 4]`.

  Factors are drawn from [1 - s, 1 + s] as torchvision's ColorJitter does, and applied in
  that order: brightness scales, contrast scales around the mean grey level, saturation
  blends each pixel with its grey level. All three are linear in RGB, so together they are
  `out = c b S rgb + (1 - c) m`, with S the saturation matrix and m the brightened mean grey.
  Unlike torchvision, values are clipped once at the end rather than after every step.
  """
  b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
  c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
  s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
  saturate = s * np.eye(3, dtype=np.float32) + (1 - s) * np.outer(np.ones(3), _LUMA)
  offset = (1 - c) * b * mean_grey_level
  return np.concatenate([c * b * saturate, np.full((3, 1), offset)], axis=1).astype(np.float32)


def color_jitter(
  frames: np.ndarray,
  rng: np.random.Generator,
  brightness: float = 0.3,
  contrast: float = 0.3,
  saturation: float = 0.3,
) -> np.ndarray:
  """Random brightness, contrast and saturation, one draw per clip (`color_jitter_matrix`)."""
  matrix = color_jitter_matrix(rng, mean_grey(frames), brightness, contrast, saturation)
  height, width = frames.shape[1:3]
  return crop_and_resize(
    frames, (0, 0, width, height), (height, width), color_matrix=matrix.ravel()
  )
