"""`crop_and_resize` equals plain per-frame Pillow calls bit for bit, on random geometry.

The op converts between numpy and Pillow at the buffer level for speed; this pins its output to
the straightforward Pillow pipeline it stands for (boxes inside the frame; edge padding for
boxes outside it is tested in test_video_ops.py).
"""

import numpy as np
import pytest
from PIL import Image

from data_pipelines.ops import video as video_ops

FILTERS = (Image.BILINEAR, Image.BICUBIC, Image.NEAREST, Image.LANCZOS)


def _pillow_reference(frames, box, size, resample, flip, matrix):
  """Each frame: fromarray -> resize with box -> mirror -> colour matrix -> asarray."""
  height, width = (size, size) if isinstance(size, int) else size
  out = []
  for frame in frames:
    image = Image.fromarray(frame).resize((width, height), resample, box=box)
    if flip:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if matrix is not None:
      image = image.convert("RGB", tuple(float(m) for m in matrix))
    out.append(np.asarray(image))
  return np.stack(out)


@pytest.mark.parametrize("seed", range(4))
def test_crop_and_resize_equals_per_frame_pillow(seed):
  rng = np.random.default_rng(seed)
  for _ in range(40):
    num_frames, frame_h, frame_w = (int(v) for v in rng.integers((1, 4, 4), (5, 60, 60)))
    frames = rng.integers(0, 256, (num_frames, frame_h, frame_w, 3), dtype=np.uint8)
    if rng.random() < 0.3:
      frames = frames[:, ::-1]  # not contiguous
    if rng.random() < 0.3:
      frames.setflags(write=False)  # as TFDS sources hand them out
    box = video_ops.random_resized_crop_box(frame_h, frame_w, rng)
    size = int(rng.integers(1, 70)) if rng.random() < 0.5 else tuple(rng.integers(1, 70, 2))
    flip = bool(rng.random() < 0.5)
    matrix = None
    if rng.random() < 0.7:
      matrix = video_ops.color_jitter_matrix(rng, 100.0, 0.5, 0.5, 0.5).ravel()
    resample = FILTERS[int(rng.integers(len(FILTERS)))]
    out = video_ops.crop_and_resize(frames, box, size, resample, flip, matrix)
    expected = _pillow_reference(frames, box, size, resample, flip, matrix)
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"] and out.flags["WRITEABLE"]
    np.testing.assert_array_equal(out, expected)
