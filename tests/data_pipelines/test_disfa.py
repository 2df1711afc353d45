"""DISFA: synthetic twin -> TFDS build -> data source / pipeline; intensity thresholding."""

import os
import shutil

import numpy as np
import pytest

from data_pipelines import pipeline, video
from data_pipelines.builders import common, disfa
from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic import disfa as disfa_twin

FRAME_SIZE, MAX_FRAMES = 32, 16
CONFIG = f"disfa/{FRAME_SIZE}px_{MAX_FRAMES}f"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("disfa_raw"))
  disfa_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("disfa_data"))
  return data_dir, disfa.build(raw_dir, data_dir, frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)


def _intensity(raw_dir, subject, au):
  path = os.path.join(raw_dir, "ActionUnit_Labels", subject, f"{subject}_au{au}.txt")
  return np.loadtxt(path, delimiter=",", dtype=int)


def test_the_protocol_covers_27_subjects_in_three_disjoint_parts():
  subjects = [s for part in disfa.PARTS for s in part]
  assert len(subjects) == len(set(subjects)) == 27 and disfa.PARTS == disfa_twin.PARTS
  assert disfa.AUS == (1, 2, 4, 6, 9, 12, 25, 26) and set(disfa.AUS) <= set(disfa_twin.CODED_AUS)


def test_twin_writes_videos_and_per_au_label_files(raw_dir):
  videos = sorted(os.listdir(os.path.join(raw_dir, "Videos_LeftCamera")))
  assert videos[0] == "LeftVideoSN002_comp.avi" and len(videos) == 6
  path = os.path.join(raw_dir, "Videos_LeftCamera", videos[0])
  assert video_ops.video_fps(path) == 20
  frames = video_ops.decode_video(path)
  assert frames.shape == (40, 48, 64, 3)
  for au in disfa_twin.CODED_AUS:
    table = _intensity(raw_dir, "SN002", au)
    assert (
      table.shape == (40, 2)
      and table[0, 0] == 1
      and 0 <= table[:, 1].min() <= table[:, 1].max() <= 5
    )


def test_every_subject_is_filmed_before_one_plain_lab_backdrop(raw_dir):
  # DISFA films everyone before one backdrop under frontal light: the top corners of a frame
  # (beside the head) are the backdrop, plain and alike across subjects; the in-the-wild
  # scenes of the expression twins vary.
  def corners(subject):
    path = os.path.join(raw_dir, "Videos_LeftCamera", f"LeftVideo{subject}_comp.avi")
    frame = video_ops.decode_video(path)[0].astype(np.float32) / 255.0
    return np.stack([frame[:4, :4], frame[:4, -4:]])  # [2, 4, 4, 3]

  patches = [corners(part[0]) for part in disfa_twin.PARTS]
  colours = np.array([p.mean((0, 1, 2)) for p in patches])  # per subject
  assert np.ptp(colours, axis=0).max() < 0.15  # one lab
  assert all(np.abs(p[0] - p[1]).mean() < 0.03 for p in patches)  # plain


def test_split_sizes_follow_the_subject_partition(built):
  _, sizes = built
  # 6 subjects (2 per part), 40 frames each -> windows of 16, 16 and 8 frames.
  assert sizes == {f"fold{k}_{p}": n for k in (1, 2, 3) for p, n in (("train", 12), ("test", 6))}


def test_labels_are_intensity_thresholded_at_two(raw_dir, built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold3_test")
  subjects = set()
  for i in range(len(source)):
    example = source[i]
    subject = example["subject"].decode()
    subjects.add(subject)
    start, length = int(example["start_frame"]), int(example["num_frames"])
    intensity = np.stack([_intensity(raw_dir, subject, au)[:, 1] for au in disfa.AUS], 1)
    window = intensity[start - 1 : start - 1 + length].astype(np.float32)
    np.testing.assert_array_equal(example["frame_intensity"], window)
    np.testing.assert_array_equal(example["frame_aus"], (window >= 2).astype(np.float32))
    np.testing.assert_array_equal(example["aus"], example["frame_aus"][length // 2])
    assert example["video"].shape == (length, FRAME_SIZE, FRAME_SIZE, 3)
    assert float(example["fps"]) == 20.0
  assert subjects == set(disfa.PARTS[2][:2])


def test_pipeline_yields_au_windows(built):
  data_dir, _ = built
  source = pipeline.tfds_source(CONFIG, data_dir, "fold1_train")
  batch = next(
    iter(pipeline.train_dataset(source, video.make_train_transform(), batch_size=4, seed=0))
  )
  assert batch["video"].shape == (4, 16, 112, 112, 3) and batch["aus"].shape == (4, 8)
  evaluation = pipeline.eval_dataset(
    pipeline.tfds_source(CONFIG, data_dir, "fold1_test"), video.make_eval_transform(), batch_size=6
  )
  (batch,) = list(evaluation)
  assert batch["aus"].shape == (6, 8) and batch["aus"].dtype == np.float32


def test_labels_shorter_than_the_video_fail_naming_it_or_are_skipped(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  subject = disfa.PARTS[0][0]
  for au in disfa_twin.CODED_AUS:
    path = os.path.join(copy, "ActionUnit_Labels", subject, f"{subject}_au{au}.txt")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-5]) + "\n")
  video_path = os.path.join(copy, "Videos_LeftCamera", f"LeftVideo{subject}_comp.avi")
  with pytest.raises(common.InvalidExample, match="40 frames but the labels") as info:
    disfa.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=16)
  assert info.value.path == video_path
  sizes = disfa.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=16
  )
  assert sizes["fold1_test"] == 3 and sizes["fold2_train"] == 9
  assert sum(disfa.inspect(str(tmp_path / "lenient"))["skipped"].values()) == 3


def test_an_intensity_outside_zero_to_five_is_invalid(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  path = os.path.join(copy, "ActionUnit_Labels", "SN003", "SN003_au12.txt")
  lines = open(path).read().splitlines()
  lines[4] = "5,7"
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(common.InvalidExample, match="outside 0..5") as info:
    disfa.build(copy, str(tmp_path / "data"), frame_size=16, max_frames=16)
  assert info.value.path == path
