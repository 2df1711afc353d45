"""FERV39k: synthetic twin -> TFDS build -> data source / pipeline, in the real dataset's terms."""

import os
import shutil

import numpy as np
import pytest

from data_pipelines import pipeline, video
from data_pipelines.builders import common, ferv39k
from data_pipelines.synthetic import ferv39k as ferv39k_twin

FRAME_SIZE, MAX_FRAMES = 32, 16
CONFIG = f"ferv39k/{FRAME_SIZE}px_{MAX_FRAMES}f"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ferv39k_raw"))
  ferv39k_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("ferv39k_data"))
  return data_dir, ferv39k.build(raw_dir, data_dir, frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)


def _split(raw_dir, part):
  with open(os.path.join(raw_dir, "4_setups", "All_scenes", f"{part}_All.csv")) as f:
    return [line.split() for line in f if line.strip()]


def test_twin_writes_the_release_layout(raw_dir):
  train, test = _split(raw_dir, "train"), _split(raw_dir, "test")
  assert not {c for c, _ in train} & {c for c, _ in test}
  for clip, word in train + test:
    scene, emotion, number = clip.split("/")
    assert emotion == word and word in ferv39k.CLASS_NAMES and len(number) == 4
    assert scene in ("Action", "DailyLife")
    frames = sorted(os.listdir(os.path.join(raw_dir, "2_ClipsforFaceCrop", clip)))
    assert frames[0] == "01.jpg" and len(frames) >= 8


def test_split_sizes_are_those_of_the_split_files(raw_dir, built):
  _, sizes = built
  assert sizes == {"train": len(_split(raw_dir, "train")), "test": len(_split(raw_dir, "test"))}
  assert sizes == {"train": 28, "test": 14}


def test_examples_carry_label_scene_and_key(raw_dir, built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "test")
  expected = dict(_split(raw_dir, "test"))
  got = {}
  for i in range(len(source)):
    example = source[i]
    key = example["key"].decode()
    got[key] = ferv39k.CLASS_NAMES[int(example["label"])]
    assert example["subject"].decode() == key.split("/")[0]
    frames = len(os.listdir(os.path.join(raw_dir, "2_ClipsforFaceCrop", key)))
    assert int(example["num_frames"]) == frames
    assert example["video"].shape == (min(frames, MAX_FRAMES), FRAME_SIZE, FRAME_SIZE, 3)
  assert got == expected


def test_pipeline_yields_16x224x224_clips(built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "train")
  transform = video.make_train_transform(image_size=224)
  batch = next(iter(pipeline.train_dataset(source, transform, batch_size=2, seed=0)))
  assert batch["video"].shape == (2, 16, 224, 224, 3) and batch["video"].dtype == np.uint8
  evaluation = pipeline.eval_dataset(
    pipeline.tfds_source(CONFIG, data_dir, "test"), video.make_eval_transform(), batch_size=14
  )
  (batch,) = list(evaluation)
  assert batch["video"].shape == (14, 16, 112, 112, 3)
  assert np.bincount(batch["label"], minlength=7).tolist() == [2] * 7


def test_a_missing_frame_folder_fails_naming_it_or_is_skipped(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  clip, _ = _split(copy, "test")[0]
  folder = os.path.join(copy, "2_ClipsforFaceCrop", clip)
  shutil.rmtree(folder)
  with pytest.raises(common.InvalidExample, match="does not exist") as info:
    ferv39k.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=4)
  assert info.value.path == folder
  sizes = ferv39k.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=4
  )
  assert sizes == {"train": 28, "test": 13}
  assert ferv39k.inspect(str(tmp_path / "lenient"))["skipped"] == {"train": 0, "test": 1}
