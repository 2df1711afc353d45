"""Per-example video transforms: shapes and dtypes of docs/design.md section 3, sampling,
determinism."""

import pickle

import numpy as np
import pytest

from data_pipelines import pipeline, video
from data_pipelines.ops import video as video_ops


def _clip_example(num_frames=32, size=128, label=3, seed=0):
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 255, (num_frames, size, size, 3), dtype=np.uint8)
  frames[:, :, :, 0] = np.arange(num_frames, dtype=np.uint8)[:, None, None]  # frame index in red
  frames.setflags(write=False)  # TFDS sources hand out read-only arrays
  return {"video": frames, "label": label, "num_frames": num_frames, "key": b"00001"}


def _au_example(num_frames=32, size=64, num_aus=12):
  example = _clip_example(num_frames, size)
  del example["label"]
  frame_aus = np.zeros((num_frames, num_aus), np.float32)
  frame_aus[np.arange(num_frames), np.arange(num_frames) % num_aus] = 1.0
  example["frame_aus"] = frame_aus
  example["aus"] = frame_aus[num_frames // 2]
  return example


@pytest.mark.parametrize("image_size", [112, 224])
def test_train_transform_gives_the_documented_clip(image_size):
  out = video.train_transform(_clip_example(), np.random.default_rng(0), image_size=image_size)
  assert set(out) == {"video", "label"}
  assert out["video"].shape == (16, image_size, image_size, 3)
  assert out["video"].dtype == np.uint8 and out["video"].flags["C_CONTIGUOUS"]
  assert out["label"].dtype == np.int32 and out["label"] == 3


def test_train_transform_is_reproducible_and_random_across_rngs():
  example = _clip_example()
  a = video.train_transform(example, np.random.default_rng(5))
  b = video.train_transform(example, np.random.default_rng(5))
  c = video.train_transform(example, np.random.default_rng(6))
  np.testing.assert_array_equal(a["video"], b["video"])
  assert not np.array_equal(a["video"], c["video"])


def test_train_sampling_spans_the_clip_in_order_and_pads_short_clips():
  # No crop, flip or jitter: the red channel then reads back the frame index.
  plain = dict(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, brightness=0, contrast=0, saturation=0
  )
  rng = np.random.default_rng(0)
  out = video.train_transform(_clip_example(32), rng, image_size=128, **plain)
  frames = out["video"][:, 0, 0, 0].astype(int)
  assert np.all(np.diff(frames) > 0) and np.all(frames // 2 == np.arange(16))
  short = video.train_transform(_clip_example(5), rng, image_size=128, **plain)
  frames = short["video"][:, 0, 0, 0].astype(int)
  assert (
    short["video"].shape[0] == 16 and set(frames) <= set(range(5)) and np.all(np.diff(frames) >= 0)
  )


def test_flip_mirrors_the_clip():
  example = _clip_example()
  plain = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0)
  flipped = video.train_transform(
    example, np.random.default_rng(1), flip_prob=1.0, image_size=128, **plain
  )
  straight = video.train_transform(
    example, np.random.default_rng(1), flip_prob=0.0, image_size=128, **plain
  )
  np.testing.assert_array_equal(flipped["video"], straight["video"][:, :, ::-1])


def test_eval_transform_is_uniform_sampling_and_a_centre_crop():
  example = _clip_example()
  out = video.eval_transform(example)
  assert out["video"].shape == (16, 112, 112, 3) and out["label"] == 3
  indices = video_ops.uniform_indices(32, 16)
  expected = video_ops.center_crop(example["video"][indices], 112, 0.875)
  np.testing.assert_array_equal(out["video"], expected)
  np.testing.assert_array_equal(
    video.eval_transform(example, np.random.default_rng(9))["video"], expected
  )
  big = video.eval_transform(example, image_size=224, num_frames=8)
  assert big["video"].shape == (8, 224, 224, 3)


def test_action_unit_windows_take_consecutive_frames_and_the_centre_label():
  example = _au_example(32)
  out = video.eval_transform(example)
  assert set(out) == {"video", "aus"} and out["aus"].dtype == np.float32
  np.testing.assert_array_equal(out["aus"], example["frame_aus"][16])
  plain = dict(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, brightness=0, contrast=0, saturation=0
  )
  for seed in range(5):
    out = video.train_transform(example, np.random.default_rng(seed), image_size=64, **plain)
    frames = out["video"][:, 0, 0, 0].astype(int)
    assert np.all(np.diff(frames) <= 1) and np.all(
      np.diff(frames) >= 0
    )  # consecutive, edges repeat
    centre = frames[8]
    np.testing.assert_array_equal(out["aus"], example["frame_aus"][centre])


def test_transforms_batch_through_the_grain_pipeline():
  source = [_clip_example(n, 128, label=n % 7, seed=n) for n in (8, 20, 32, 40)]
  train = pipeline.train_dataset(source, video.make_train_transform(), batch_size=2, seed=0)
  batch = next(iter(train))
  assert batch["video"].shape == (2, 16, 112, 112, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32
  evaluation = pipeline.eval_dataset(source, video.make_eval_transform(), batch_size=3)
  batches = list(evaluation)
  assert [len(b["label"]) for b in batches] == [3, 1]
  assert np.concatenate([b["label"] for b in batches]).tolist() == [1, 6, 4, 5]


def test_bound_transforms_pickle_for_worker_processes():
  transform = pickle.loads(pickle.dumps(video.make_train_transform(num_frames=8, image_size=64)))
  out = transform(_clip_example(), np.random.default_rng(0))
  assert out["video"].shape == (8, 64, 64, 3)


def test_an_empty_clip_is_refused():
  example = _clip_example()
  example["video"] = example["video"][:0]
  with pytest.raises(ValueError, match="no frames"):
    video.eval_transform(example)
