"""Video ops: decoding (PyAV, Pillow), temporal sampling, crops, flips and colour jitter."""

import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.ops import video as video_ops


def _gradient_clip(num_frames=12, height=48, width=64):
  """A smooth moving pattern that survives lossy coding: `[T, H, W, 3] uint8`."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  frames = []
  for t in range(num_frames):
    r = 128 + 100 * np.sin((xs + 3 * t) / 9)
    g = 128 + 100 * np.cos((ys - 2 * t) / 11)
    b = np.full_like(xs, 40 + 10 * t)
    frames.append(np.stack([r, g, b], -1))
  return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def _write_folder(folder, frames, names):
  os.makedirs(folder, exist_ok=True)
  for frame, name in zip(frames, names):
    Image.fromarray(frame).save(os.path.join(folder, name))


def test_frame_folder_is_read_in_frame_number_order(tmp_path):
  frames = _gradient_clip(11)
  names = [f"clip_{i}.png" for i in range(1, 12)]  # clip_10 sorts before clip_2 as text
  _write_folder(tmp_path / "clip", frames, names)
  (tmp_path / "clip" / "notes.txt").write_text("not a frame")
  files = video_ops.list_frame_files(tmp_path / "clip")
  assert [os.path.basename(f) for f in files] == names
  np.testing.assert_array_equal(video_ops.read_frame_folder(tmp_path / "clip"), frames)
  picked = video_ops.read_frame_folder(tmp_path / "clip", indices=[10, 0, 0])
  np.testing.assert_array_equal(picked, frames[[10, 0, 0]])


def test_jpeg_frames_decode_close_to_the_original(tmp_path):
  frames = _gradient_clip(3)
  _write_folder(tmp_path / "c", frames, ["00001_00001.jpg", "00001_00002.jpg", "00001_00003.jpg"])
  decoded = video_ops.read_frame_folder(tmp_path / "c")
  assert decoded.shape == frames.shape and decoded.dtype == np.uint8
  assert np.abs(decoded.astype(int) - frames).mean() < 4


def test_reduced_scale_jpeg_decoding_keeps_the_requested_side(tmp_path):
  Image.fromarray(_gradient_clip(1, 400, 300)[0]).save(tmp_path / "big.jpg")
  assert video_ops.read_image(tmp_path / "big.jpg").shape == (400, 300, 3)
  small = video_ops.read_image(tmp_path / "big.jpg", min_side=64)
  assert min(small.shape[:2]) >= 64 and small.shape[0] < 400


def test_broken_frames_and_missing_folders_name_the_path(tmp_path):
  with pytest.raises(video_ops.VideoDecodeError, match="does not exist") as info:
    video_ops.list_frame_files(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(info.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(video_ops.VideoDecodeError, match="no .jpg/.png frames"):
    video_ops.list_frame_files(tmp_path / "empty")
  _write_folder(tmp_path / "bad", _gradient_clip(2), ["1.jpg", "2.jpg"])
  (tmp_path / "bad" / "2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(video_ops.VideoDecodeError) as info:
    video_ops.read_frame_folder(tmp_path / "bad")
  assert str(tmp_path / "bad" / "2.jpg") in str(info.value)


@pytest.mark.parametrize("name,fps", [("clip.mp4", 25), ("clip.avi", 20)])
def test_video_round_trip_keeps_frames_size_and_rate(tmp_path, name, fps):
  frames = _gradient_clip(12)
  path = str(tmp_path / name)
  video_ops.encode_video(path, frames, fps)
  decoded = video_ops.decode_video(path)
  assert decoded.shape == frames.shape and decoded.dtype == np.uint8
  assert np.abs(decoded.astype(int) - frames).mean() < 8
  assert video_ops.video_fps(path) == pytest.approx(fps)
  np.testing.assert_array_equal(video_ops.decode_video(path, [5, 1, 5]), decoded[[5, 1, 5]])
  with pytest.raises(video_ops.VideoDecodeError, match="fewer frames"):
    video_ops.decode_video(path, [12])


def test_truncated_mp4_raises_an_error_naming_the_file(tmp_path):
  path = str(tmp_path / "clip.mp4")
  video_ops.encode_video(path, _gradient_clip(12), 25)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(video_ops.VideoDecodeError) as info:
    video_ops.decode_video(path)
  assert path in str(info.value) and "cannot decode video" in str(info.value)


def test_encode_refuses_odd_frame_sizes(tmp_path):
  with pytest.raises(ValueError, match="even"):
    video_ops.encode_video(str(tmp_path / "x.mp4"), np.zeros((2, 9, 8, 3), np.uint8), 25)


def test_uniform_indices_take_segment_centres_and_repeat_for_short_clips():
  np.testing.assert_array_equal(video_ops.uniform_indices(10, 5), [1, 3, 5, 7, 9])
  np.testing.assert_array_equal(video_ops.uniform_indices(16, 16), np.arange(16))
  short = video_ops.uniform_indices(3, 8)
  assert len(short) == 8 and set(short) == {0, 1, 2} and np.all(np.diff(short) >= 0)
  np.testing.assert_array_equal(video_ops.uniform_indices(1, 4), [0, 0, 0, 0])


def test_random_indices_draw_one_frame_per_segment():
  rng = np.random.default_rng(0)
  draws = np.stack([video_ops.random_indices(64, 16, rng) for _ in range(200)])
  assert draws.shape == (200, 16)
  segment = np.arange(16) * 4
  assert np.all(draws >= segment) and np.all(draws < segment + 4)
  assert len(np.unique(draws[:, 0])) == 4  # every frame of a segment gets drawn
  short = video_ops.random_indices(5, 16, rng)
  assert len(short) == 16 and short.max() <= 4 and np.all(np.diff(short) >= 0)
  again = video_ops.random_indices(64, 16, np.random.default_rng(7))
  np.testing.assert_array_equal(again, video_ops.random_indices(64, 16, np.random.default_rng(7)))


def test_window_indices_are_consecutive_and_repeat_edge_frames():
  np.testing.assert_array_equal(video_ops.window_indices(32, 4, 10), [8, 9, 10, 11])
  np.testing.assert_array_equal(video_ops.window_indices(32, 4, 0), [0, 0, 0, 1])
  np.testing.assert_array_equal(video_ops.window_indices(3, 5, 2), [0, 1, 2, 2, 2])


def test_crop_and_resize_matches_pillow_and_keeps_identity():
  frames = _gradient_clip(3)
  box = (5.5, 4.0, 45.5, 36.0)
  out = video_ops.crop_and_resize(frames, box, (20, 30))
  expected = np.asarray(Image.fromarray(frames[1]).resize((30, 20), Image.BILINEAR, box=box))
  assert out.shape == (3, 20, 30, 3)
  np.testing.assert_array_equal(out[1], expected)
  np.testing.assert_array_equal(video_ops.crop_and_resize(frames, (0, 0, 64, 48), (48, 64)), frames)
  np.testing.assert_array_equal(video_ops.resize(frames, (48, 64)), frames)


def test_crop_and_resize_flips_and_applies_a_colour_matrix():
  frames = _gradient_clip(2)
  plain = video_ops.crop_and_resize(frames, (8, 8, 40, 40), 16)
  flipped = video_ops.crop_and_resize(frames, (8, 8, 40, 40), 16, flip=True)
  np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
  halve = [0.5, 0, 0, 10, 0, 0.5, 0, 10, 0, 0, 0.5, 10]
  dimmed = video_ops.crop_and_resize(frames, (8, 8, 40, 40), 16, color_matrix=halve)
  assert np.abs(dimmed.astype(float) - (plain * 0.5 + 10)).max() <= 1


def test_boxes_outside_the_frame_repeat_edge_pixels():
  frame = np.zeros((1, 10, 10, 3), np.uint8)
  frame[:, :, 0] = 200  # a bright left column
  out = video_ops.crop_and_resize(frame, (-10, 0, 10, 10), (10, 20))
  assert out.shape == (1, 10, 20, 3)
  assert np.all(out[0, :, :10] == 200)  # the padding repeats the edge column


def test_center_crop_takes_the_middle_square():
  frames = _gradient_clip(2, 48, 64)
  np.testing.assert_array_equal(video_ops.center_crop(frames, 48), frames[:, :, 8:56])
  np.testing.assert_array_equal(video_ops.center_crop(frames, 24, 0.5), frames[:, 12:36, 20:44])
  assert video_ops.center_square_box(100, 200, 0.5) == (75.0, 25.0, 125.0, 75.0)


def test_random_resized_crop_box_respects_scale_ratio_and_frame():
  rng = np.random.default_rng(0)
  for _ in range(300):
    x0, y0, x1, y1 = video_ops.random_resized_crop_box(128, 96, rng, (0.3, 0.9), (0.75, 4 / 3))
    w, h = x1 - x0, y1 - y0
    assert 0 <= x0 and 0 <= y0 and x1 <= 96 + 1e-6 and y1 <= 128 + 1e-6
    assert 0.3 - 1e-6 <= w * h / (128 * 96) <= 0.9 + 1e-6
    assert 0.75 - 1e-6 <= w / h <= 4 / 3 + 1e-6
  # An impossible request falls back to the largest centred box of a clamped aspect.
  box = video_ops.random_resized_crop_box(10, 100, rng, (0.99, 1.0), (1.0, 1.0))
  assert box == (45.0, 0.0, 55.0, 10.0)
  out = video_ops.random_resized_crop(_gradient_clip(4), 32, rng)
  assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8


def test_horizontal_flip_mirrors_every_frame():
  frames = _gradient_clip(3)
  flipped = video_ops.horizontal_flip(frames)
  np.testing.assert_array_equal(flipped[:, :, 0], frames[:, :, -1])
  assert flipped.flags["C_CONTIGUOUS"]


def test_crop_to_boxes_follows_a_moving_face():
  frames = np.zeros((3, 60, 80, 3), np.uint8)
  boxes = np.array([[10, 10, 30, 30], [40, 20, 60, 40], [55, 35, 75, 55]], float)
  for frame, (x0, y0, x1, y1) in zip(frames, boxes.astype(int)):
    frame[y0:y1, x0:x1] = 255
  crops = video_ops.crop_to_boxes(frames, boxes, 16)
  # Bilinear filtering blends the outermost output pixels with what lies just outside.
  assert crops.shape == (3, 16, 16, 3) and crops[:, 1:-1, 1:-1].min() == 255
  with_margin = video_ops.crop_to_boxes(frames, boxes, 16, margin=1.0)
  assert with_margin[:, 8, 8].min() == 255 and with_margin[:, 0, 0].max() == 0
  one_box = video_ops.crop_to_boxes(frames, boxes[0], 16)
  assert one_box[0, 1:-1, 1:-1].min() == 255 and one_box[1].max() == 0
  assert video_ops.square_box((0, 0, 10, 20)) == (-5.0, 0.0, 15.0, 20.0)
  with pytest.raises(ValueError, match="boxes must be"):
    video_ops.crop_to_boxes(frames, boxes[:2], 16)


def test_color_jitter_matrix_is_brightness_contrast_saturation():
  rng = np.random.default_rng(0)
  assert np.allclose(
    video_ops.color_jitter_matrix(rng, 100.0, 0, 0, 0), np.c_[np.eye(3), [0, 0, 0]]
  )
  matrix = video_ops.color_jitter_matrix(np.random.default_rng(1), 80.0, 0.4, 0.4, 0.4)
  grey = np.array([50.0, 50.0, 50.0])
  out = matrix[:, :3] @ grey + matrix[:, 3]
  assert np.allclose(out, out[0])  # grey stays grey: saturation leaves it alone
  frames = _gradient_clip(2)
  np.testing.assert_array_equal(video_ops.color_jitter(frames, rng, 0, 0, 0), frames)
  washed = video_ops.color_jitter(frames, np.random.default_rng(2), 0, 0, 1.0)
  spread = lambda x: x.astype(float).std(axis=-1).mean()  # noqa: E731
  assert spread(washed) != pytest.approx(spread(frames))
  brighter = [video_ops.color_jitter(frames, np.random.default_rng(s), 0.5, 0, 0) for s in range(8)]
  means = [b.mean() for b in brighter]
  assert min(means) < frames.mean() < max(means)
