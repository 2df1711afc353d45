"""BP4D: synthetic twin -> TFDS build -> data source / pipeline; subject-exclusive AU folds."""

import csv
import glob
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline, video
from data_pipelines.builders import _video, bp4d, common
from data_pipelines.synthetic import bp4d as bp4d_twin

FRAME_SIZE, MAX_FRAMES = 32, 8
CONFIG = f"bp4d/{FRAME_SIZE}px_{MAX_FRAMES}f"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bp4d_raw"))
  bp4d_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("bp4d_data"))
  return data_dir, bp4d.build(raw_dir, data_dir, frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)


def _coding(path):
  """{frame number: [12 codes]} of one occurrence CSV, read independently of the builder."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return {int(r["0"]): [int(r[str(au)]) for au in bp4d.AUS] for r in rows}


def test_the_protocol_covers_41_subjects_in_three_disjoint_parts():
  subjects = [s for part in bp4d.PARTS for s in part]
  assert len(subjects) == len(set(subjects)) == 41 and [len(p) for p in bp4d.PARTS] == [14, 14, 13]
  assert bp4d.PARTS == bp4d_twin.PARTS and bp4d.AUS == bp4d_twin.AUS
  assert bp4d.AUS == (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


def test_twin_writes_frames_and_occurrence_coding(raw_dir):
  files = sorted(glob.glob(os.path.join(raw_dir, "AUCoding", "AU_OCC", "*.csv")))
  assert len(files) == 6 * 2  # two subjects per part, two tasks
  header = open(files[0]).readline().strip().split(",")
  assert header == [str(n) for n in range(100)]
  for path in files:
    subject, task = os.path.basename(path)[:-4].split("_")
    coding = _coding(path)
    assert set(np.ravel(list(coding.values()))) <= {0, 1, 9}
    images = os.listdir(os.path.join(raw_dir, "BP4D-training", subject, task))
    numbers = {int(name[:-4]) for name in images}
    assert set(coding) < numbers  # coded frames have images; not every image is coded


def test_a_subjects_tasks_share_one_lab_session_and_subjects_differ_only_a_little(raw_dir):
  # BP4D films everyone before one backdrop under frontal light: the top corners of a frame
  # (beside the head) are the backdrop; the in-the-wild scenes of the expression twins vary.
  def corners(subject, task):
    frame_dir = os.path.join(raw_dir, "BP4D-training", subject, task)
    first = sorted(os.listdir(frame_dir))[0]
    frame = np.asarray(Image.open(os.path.join(frame_dir, first)), np.float32) / 255.0
    return np.stack([frame[:4, :4], frame[:4, -4:]])  # [2, 4, 4, 3]

  subjects = [part[0] for part in bp4d_twin.PARTS]
  patches = {s: [corners(s, t) for t in ("T1", "T2")] for s in subjects}
  for first, second in patches.values():
    assert np.abs(first - second).mean() < 0.02  # the same session, but for noise and JPEG
  colours = np.array([p[0].mean((0, 1, 2)) for p in patches.values()])  # per subject
  assert np.ptp(colours, axis=0).max() < 0.15  # one lab
  assert all(np.abs(p[0][0] - p[0][1]).mean() < 0.02 for p in patches.values())  # plain


def _expected_windows(raw_dir):
  """Examples per subject, from the raw coding: drop frames with a 9, cut at gaps and every 8."""
  counts = {}
  for path in glob.glob(os.path.join(raw_dir, "AUCoding", "AU_OCC", "*.csv")):
    subject = os.path.basename(path).split("_")[0]
    numbers = np.array(sorted(n for n, codes in _coding(path).items() if 9 not in codes))
    counts[subject] = counts.get(subject, 0) + len(_video.windows(numbers, MAX_FRAMES))
  return counts


def test_split_sizes_follow_the_subject_partition(raw_dir, built):
  _, sizes = built
  per_subject = _expected_windows(raw_dir)
  expected = {}
  for k, part in enumerate(bp4d.PARTS, start=1):
    test = sum(n for s, n in per_subject.items() if s in part)
    expected[f"fold{k}_train"] = sum(per_subject.values()) - test
    expected[f"fold{k}_test"] = test
  assert sizes == expected


def test_folds_are_subject_exclusive_and_labels_match_the_coding(raw_dir, built):
  data_dir, _ = built
  for k in (1, 2, 3):
    train = pipeline.tfds_source(CONFIG, data_dir, f"fold{k}_train")
    test = pipeline.tfds_source(CONFIG, data_dir, f"fold{k}_test")
    train_subjects = {train[i]["subject"].decode() for i in range(len(train))}
    test_subjects = {test[i]["subject"].decode() for i in range(len(test))}
    assert not train_subjects & test_subjects
    assert test_subjects <= set(bp4d.PARTS[k - 1])
  source = pipeline.tfds_source(CONFIG, data_dir, "fold1_test")
  for i in range(len(source)):
    example = source[i]
    subject, task = example["subject"].decode(), example["task"].decode()
    coding = _coding(os.path.join(raw_dir, "AUCoding", "AU_OCC", f"{subject}_{task}.csv"))
    start, length = int(example["start_frame"]), int(example["num_frames"])
    expected = np.array([coding[start + t] for t in range(length)], np.float32)
    np.testing.assert_array_equal(example["frame_aus"], expected)
    np.testing.assert_array_equal(example["aus"], expected[length // 2])
    assert example["video"].shape == (length, FRAME_SIZE, FRAME_SIZE, 3) and length <= MAX_FRAMES
    assert float(example["fps"]) == 25.0


def test_pipeline_yields_au_windows(built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold2_train")
  batch = next(
    iter(pipeline.train_dataset(source, video.make_train_transform(), batch_size=4, seed=0))
  )
  assert batch["video"].shape == (4, 16, 112, 112, 3) and batch["video"].dtype == np.uint8
  assert batch["aus"].shape == (4, 12) and batch["aus"].dtype == np.float32
  assert set(np.unique(batch["aus"])) <= {0.0, 1.0}


def test_inspect_reports_au_base_rates(built, tmp_path):
  data_dir, sizes = built
  report = bp4d.inspect(data_dir, str(tmp_path / "sheet.png"))
  assert report["aus"] == list(bp4d.AUS)
  rates = report["splits"]["fold1_train"]["au_base_rate"]
  assert len(rates) == 12 and 0 < np.mean(rates) < 1
  assert os.path.isfile(tmp_path / "sheet.png")
  # The apex sheet has a row per AU present in the sampled windows, frames of that AU.
  apex = np.asarray(Image.open(report["apex_sheet"]))
  rows = report["apex_rows"]
  assert rows and set(rows) <= {f"AU{a}" for a in bp4d.AUS}, rows
  side = report["splits"]["fold1_train"]["features"]["video"][0][1]
  assert apex.shape[0] == len(rows) * side


def test_bad_codes_and_missing_frames_fail_naming_the_file_or_are_skipped(raw_dir, built, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  subject = bp4d.PARTS[0][0]
  csv_path = os.path.join(copy, "AUCoding", "AU_OCC", f"{subject}_T1.csv")
  lines = open(csv_path).read().splitlines()
  cells = lines[3].split(",")
  cells[12] = "5"  # AU12 coded 5: not an occurrence code
  lines[3] = ",".join(cells)
  open(csv_path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(common.InvalidExample, match="outside 0/1/9") as info:
    bp4d.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=8)
  assert info.value.path == csv_path
  sizes = bp4d.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=8
  )
  skipped = bp4d.inspect(str(tmp_path / "lenient"))["skipped"]
  assert skipped == {
    "fold1_train": 0,
    "fold1_test": 1,
    "fold2_train": 1,
    "fold2_test": 0,
    "fold3_train": 1,
    "fold3_test": 0,
  }
  coding = _coding(os.path.join(raw_dir, "AUCoding", "AU_OCC", f"{subject}_T1.csv"))
  numbers = np.array(sorted(n for n, codes in coding.items() if 9 not in codes))
  assert sizes["fold1_test"] == built[1]["fold1_test"] - len(_video.windows(numbers, 8))
  shutil.copy(os.path.join(raw_dir, "AUCoding", "AU_OCC", f"{subject}_T1.csv"), csv_path)
  first = min(_coding(csv_path))
  os.remove(os.path.join(copy, "BP4D-training", subject, "T1", f"{first:04d}.jpg"))
  with pytest.raises(common.InvalidExample, match="have no image") as info:
    bp4d.build(copy, str(tmp_path / "strict2"), frame_size=16, max_frames=8)
  assert info.value.path == csv_path
