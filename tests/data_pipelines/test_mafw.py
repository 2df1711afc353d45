"""MAFW: synthetic twin -> TFDS build -> data source / pipeline; truncated mp4 handling."""

import os
import shutil

import numpy as np
import pytest

from data_pipelines import pipeline, video
from data_pipelines.builders import common, mafw
from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic import mafw as mafw_twin

FRAME_SIZE, MAX_FRAMES = 32, 16
CONFIG = f"mafw/{FRAME_SIZE}px_{MAX_FRAMES}f"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mafw_raw"))
  mafw_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("mafw_data"))
  return data_dir, mafw.build(raw_dir, data_dir, frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)


def _split_lines(raw_dir, k, part):
  path = os.path.join(
    raw_dir, "Train & Test Set", "single", "no_caption", f"set_{k}", f"{part}.txt"
  )
  with open(path) as f:
    return [line.split() for line in f if line.strip()]


def test_twin_writes_the_release_layout(raw_dir):
  assert mafw_twin.CLASS_NAMES == mafw.CLASS_NAMES and len(mafw.CLASS_NAMES) == 11
  tests = []
  for k in range(1, 6):
    train, test = _split_lines(raw_dir, k, "train"), _split_lines(raw_dir, k, "test")
    assert {word for _, word in train + test} == set(mafw.CLASS_NAMES)
    assert not {n for n, _ in train} & {n for n, _ in test}
    tests.append({n for n, _ in test})
  assert sum(len(t) for t in tests) == len(set().union(*tests)) == 55
  clip = os.path.join(raw_dir, "data", "clips", "00001.mp4")
  assert video_ops.video_fps(clip) == 25
  assert video_ops.decode_video(clip).shape[1:] == (48, 64, 3)  # whole frames, wider than tall


def test_split_sizes_are_five_folds_of_the_clips(built):
  _, sizes = built
  assert sizes == {f"fold{k}_{p}": n for k in range(1, 6) for p, n in (("train", 44), ("test", 11))}


def test_examples_keep_label_frame_count_and_rate(raw_dir, built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold3_test")
  words = {name[: -len(".mp4")]: word for name, word in _split_lines(raw_dir, 3, "test")}
  seen = set()
  for i in range(len(source)):
    example = source[i]
    key = example["key"].decode()
    seen.add(key)
    assert mafw.CLASS_NAMES[int(example["label"])] == words[key]
    frames = len(video_ops.decode_video(os.path.join(raw_dir, "data", "clips", f"{key}.mp4")))
    assert int(example["num_frames"]) == frames
    assert example["video"].shape == (min(frames, MAX_FRAMES), FRAME_SIZE, FRAME_SIZE, 3)
    assert float(example["fps"]) == 25.0
  assert seen == set(words)


def test_pipeline_yields_16x112x112_clips(built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold1_train")
  batch = next(
    iter(pipeline.train_dataset(source, video.make_train_transform(), batch_size=4, seed=1))
  )
  assert batch["video"].shape == (4, 16, 112, 112, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(11))


def test_truncated_mp4_fails_naming_the_file_or_is_skipped(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  name, _ = _split_lines(copy, 1, "test")[0]
  path = os.path.join(copy, "data", "clips", name)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 3])
  with pytest.raises(common.InvalidExample, match="cannot decode video") as info:
    mafw.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=4)
  assert info.value.path == path and path in str(info.value)
  sizes = mafw.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=4
  )
  assert sizes["fold1_test"] == 10 and sum(sizes.values()) == 5 * 55 - 5
  skipped = mafw.inspect(str(tmp_path / "lenient"))["skipped"]
  assert skipped["fold1_test"] == 1 and sum(skipped.values()) == 5


def test_an_unknown_label_word_is_invalid(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  path = os.path.join(copy, "Train & Test Set", "single", "no_caption", "set_2", "test.txt")
  lines = open(path).read().splitlines()
  lines[0] = lines[0].split()[0] + " boredom"
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(common.InvalidExample, match="'boredom'") as info:
    mafw.build(copy, str(tmp_path / "data"), frame_size=16, max_frames=4)
  assert info.value.path == f"{path}:1"
