"""DFEW: synthetic twin -> TFDS build -> data source / pipeline, in the real dataset's terms."""

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline, video
from data_pipelines.builders import common, dfew
from data_pipelines.synthetic import dfew as dfew_twin

FRAME_SIZE, MAX_FRAMES = 32, 16
CONFIG = f"dfew/{FRAME_SIZE}px_{MAX_FRAMES}f"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dfew_raw"))
  dfew_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("dfew_data"))
  return data_dir, dfew.build(raw_dir, data_dir, frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)


def _read_csv(raw_dir, part, k):
  path = os.path.join(raw_dir, "EmoLabel_DataSplit", f"{part}(single-labeled)", f"set_{k}.csv")
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_twin_writes_the_official_layout(raw_dir):
  tests = []
  for k in range(1, 6):
    train, test = _read_csv(raw_dir, "train", k), _read_csv(raw_dir, "test", k)
    assert list(train[0]) == ["video_name", "label"]
    assert {int(r["label"]) for r in train + test} == set(range(1, 8))
    assert not {r["video_name"] for r in train} & {r["video_name"] for r in test}
    tests.append({int(r["video_name"]) for r in test})
  everything = set().union(*tests)
  assert sum(len(t) for t in tests) == len(everything) == 35  # the test sets partition the clips
  folder = os.path.join(raw_dir, "Clip", "clip_224x224", "00001")
  assert sorted(os.listdir(folder))[0] == "00001_00001.jpg"


def test_list_files_agree_with_the_official_csvs(raw_dir):
  official = dfew.read_official_splits(raw_dir)
  lists = dfew.read_list_splits(raw_dir)
  assert (
    official.keys()
    == lists.keys()
    == {f"fold{k}_{p}" for k in range(1, 6) for p in ("train", "test")}
  )
  for split in official:
    assert [(c.key, c.label) for c in official[split]] == [(c.key, c.label) for c in lists[split]]
    for clip in lists[split]:
      assert clip.num_frames == len(os.listdir(clip.path))


def test_split_sizes_are_five_folds_of_the_clips(built):
  _, sizes = built
  assert sizes == {f"fold{k}_{p}": n for k in range(1, 6) for p, n in (("train", 28), ("test", 7))}


def test_examples_keep_the_clip_and_its_zero_based_label(raw_dir, built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold1_test")
  labels = {
    f"{int(r['video_name']):05d}": int(r["label"]) - 1 for r in _read_csv(raw_dir, "test", 1)
  }
  assert len(source) == 7
  for i in range(len(source)):
    example = source[i]
    key = example["key"].decode()
    assert int(example["label"]) == labels[key]
    frames = len(os.listdir(os.path.join(raw_dir, "Clip", "clip_224x224", key)))
    assert int(example["num_frames"]) == frames
    stored = min(frames, MAX_FRAMES)
    assert example["video"].shape == (stored, FRAME_SIZE, FRAME_SIZE, 3)
    assert example["video"].dtype == np.uint8
    assert len(example["frame_indices"]) == stored and example["frame_indices"].max() < frames


def test_pipeline_yields_16x112x112_clips(built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold2_train")
  train = pipeline.train_dataset(source, video.make_train_transform(), batch_size=4, seed=0)
  batch = next(iter(train))
  assert batch["video"].shape == (4, 16, 112, 112, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(7))
  evaluation = pipeline.eval_dataset(
    pipeline.tfds_source(CONFIG, data_dir, "fold2_test"), video.make_eval_transform(), batch_size=7
  )
  (batch,) = list(evaluation)
  assert sorted(batch["label"].tolist()) == list(range(7))


def test_inspect_reports_counts_and_writes_a_contact_sheet(built, tmp_path):
  data_dir, sizes = built
  report = dfew.inspect(data_dir, str(tmp_path / "sheet.png"))
  assert {s: r["num_examples"] for s, r in report["splits"].items()} == sizes
  assert sum(report["splits"]["fold1_test"]["label_counts"].values()) == 7
  assert report["skipped"] == {split: 0 for split in sizes}
  assert os.path.getsize(tmp_path / "sheet.png") > 1000
  # The apex sheet: a row per class (each of the 7 has clips in fold 1's test split), first
  # frame then apex frames, which differ from the first frame where the expression shows.
  apex = np.asarray(Image.open(report["apex_sheet"]))
  side = report["splits"]["fold1_test"]["features"]["video"][0][1]
  assert report["apex_sheet"] == str(tmp_path / "sheet_apex.png")
  assert report["apex_rows"] == list(dfew.CLASS_NAMES) and apex.shape[0] == 7 * side


def _broken_copy(raw_dir, tmp_path):
  """A copy of the raw set where the first fold-1 test clip has label 9."""
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  rows = _read_csv(copy, "test", 1)
  bad = rows[0]["video_name"]
  for part in ("train", "test"):
    for k in range(1, 6):
      rows = _read_csv(copy, part, k)
      path = os.path.join(copy, "EmoLabel_DataSplit", f"{part}(single-labeled)", f"set_{k}.csv")
      with open(path, "w") as f:
        f.write("video_name,label\n")
        f.writelines(
          f"{r['video_name']},{9 if r['video_name'] == bad else r['label']}\n" for r in rows
        )
  return copy


def test_a_label_out_of_range_fails_naming_the_file_or_is_skipped(raw_dir, tmp_path):
  copy = _broken_copy(raw_dir, tmp_path)
  with pytest.raises(common.InvalidExample, match=r"label 9 .* outside 1\.\.7") as info:
    dfew.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=4)
  assert "set_1.csv" in info.value.path
  sizes = dfew.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=4
  )
  assert sizes["fold1_test"] == 6 and sum(sizes.values()) == 5 * 35 - 5
  skipped = dfew.inspect(str(tmp_path / "lenient"))["skipped"]
  assert sum(skipped.values()) == 5 and skipped["fold1_test"] == 1


def test_a_frame_count_that_disagrees_with_the_list_file_is_invalid(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  shutil.rmtree(os.path.join(copy, "EmoLabel_DataSplit"))  # fall back to the list files
  clip = dfew.read_list_splits(copy)["fold1_test"][0]
  for name in sorted(os.listdir(clip.path))[-3:]:
    os.remove(os.path.join(clip.path, name))
  with pytest.raises(common.InvalidExample, match="frames") as info:
    dfew.build(copy, str(tmp_path / "data"), frame_size=16, max_frames=4)
  assert info.value.path == clip.path


def test_a_build_larger_than_the_shuffle_buffer_needs_no_tensorflow(raw_dir, built, tmp_path):
  # TFDS spills a split bigger than its in-memory shuffle buffer (1 GB) into bucket files via
  # tf.io.gfile; with the buffer at zero bytes every example spills, as on the real datasets.
  import importlib.util

  from tensorflow_datasets.core import shuffle

  assert importlib.util.find_spec("tensorflow") is None  # the path this test is about
  data_dir, sizes = built
  saved = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = 0
  try:
    spilled = dfew.build(raw_dir, str(tmp_path), frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = saved
  assert spilled == sizes
  assert shuffle.tf is not common._TensorFlowForShuffler  # the stand-in is gone afterwards
  for split in ("fold1_train", "fold1_test"):
    a = pipeline.tfds_source(CONFIG, data_dir, split)
    b = pipeline.tfds_source(CONFIG, str(tmp_path), split)
    assert len(a) == len(b) > 0
    for i in range(len(a)):  # the same examples in the same (hash-sorted) order
      np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
      assert a[i]["label"] == b[i]["label"]
