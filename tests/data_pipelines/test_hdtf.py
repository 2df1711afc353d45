"""HDTF: synthetic twin -> TFDS build -> data source; speech drives the mouth with the documented
lag, splits are identity-disjoint, windows carry their frames, audio and ground truth, and bad
clips are named (section 6)."""

import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest

from data_pipelines import cli, pipeline, prepare
from data_pipelines.builders import common, hdtf
from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic import hdtf as hdtf_twin
from fdjax.render.mesh import write_video

FRAME_SIZE, MAX_FRAMES = 32, 16
CONFIG = f"hdtf/{FRAME_SIZE}px_{MAX_FRAMES}f"
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hdtf_raw"))
  hdtf_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("hdtf_data"))
  return data_dir, hdtf.build(raw_dir, data_dir, frame_size=FRAME_SIZE, max_frames=MAX_FRAMES)


def _clips(raw_dir):
  return [c for clips in hdtf.list_clips(raw_dir).values() for c in clips]


def _truth(clip):
  with open(clip.truth_path) as f:
    return json.load(f)


def _loudness(audio: np.ndarray, frames: int) -> np.ndarray:
  """Per-frame log RMS of the audio."""
  audio = np.pad(audio, (0, frames * SAMPLES_PER_FRAME))[: frames * SAMPLES_PER_FRAME]
  return np.log(np.sqrt((audio.reshape(frames, -1) ** 2).mean(1)) + 1e-4)


def test_twin_writes_the_processed_layout_with_ground_truth(raw_dir):
  splits = hdtf.list_clips(raw_dir)
  assert set(splits) == {"train", "validation", "test"}
  for clips in splits.values():
    assert len({c.identity for c in clips}) == 2  # the twin's guarantee: two per split
  for clip in _clips(raw_dir):
    assert re.fullmatch(r"(RD|WDA|WRA)_[A-Za-z0-9]+_\d{3}\.mp4", os.path.basename(clip.path))
    assert clip.clip_id.startswith(clip.identity + "_")
    frames = video_ops.decode_video(clip.path)
    assert frames.shape[1:] == (64, 64, 3) and 50 <= len(frames) <= 75  # 2-3 s at 25 fps
    assert video_ops.video_fps(clip.path) == 25.0
    truth = _truth(clip)
    assert truth["fps"] == 25 and truth["sample_rate"] == 16000
    assert truth["av_lag_frames"] == hdtf_twin.AV_LAG_FRAMES == 0
    for key, shape in (("mouth_open", (len(frames),)), ("head_pose", (len(frames), 6))):
      assert np.shape(truth[key]) == shape
    assert np.shape(truth["blink"]) == (len(frames),)
    audio = video_ops.decode_audio(clip.path)
    assert abs(len(audio) - len(frames) * SAMPLES_PER_FRAME) <= SAMPLES_PER_FRAME + 1024


def test_the_mouth_follows_the_audio_loudness_at_the_documented_lag(raw_dir):
  loudness, opening = [], []
  for clip in _clips(raw_dir):
    truth = _truth(clip)
    loudness.append(_loudness(video_ops.decode_audio(clip.path), len(truth["mouth_open"])))
    opening.append(np.array(truth["mouth_open"]))

  def correlation(lag):  # mouth[t] against loudness[t - lag]
    pairs = [
      (a[max(0, -lag) : len(a) - max(0, lag)], m[max(0, lag) : len(m) - max(0, -lag)])
      for a, m in zip(loudness, opening)
    ]
    return np.corrcoef(
      np.concatenate([a for a, _ in pairs]), np.concatenate([m for _, m in pairs])
    )[0, 1]

  by_lag = {lag: correlation(lag) for lag in range(-4, 5)}
  assert max(by_lag, key=by_lag.get) == hdtf_twin.AV_LAG_FRAMES
  assert by_lag[hdtf_twin.AV_LAG_FRAMES] > 0.6
  assert by_lag[hdtf_twin.AV_LAG_FRAMES] > by_lag[4] + 0.2  # a shifted mouth is clearly worse
  everything = np.concatenate(opening)
  assert everything.max() > 0.04 and np.mean(everything < 0.005) > 0.05  # speaks and pauses


def test_heads_stay_frontal_and_nearly_still_and_eyes_blink(raw_dir):
  poses = [np.array(_truth(c)["head_pose"]) for c in _clips(raw_dir)]
  for pose in poses:
    assert np.abs(pose[:, :3]).max() < 0.35  # within 20 degrees of frontal
    assert pose[:, :3].std(0).max() < 0.03  # drift of about a degree within a clip
    assert pose[:, 3:5].std(0).max() < 0.01
  blink = np.concatenate([_truth(c)["blink"] for c in _clips(raw_dir)])
  assert 0.0 <= blink.min() and blink.max() <= 1.0 and np.mean(blink > 0.5) > 0.005


def test_splits_are_by_identity_hash_and_disjoint(raw_dir, built):
  data_dir, sizes = built
  expected = {}
  for clip in _clips(raw_dir):
    frames = len(_truth(clip)["mouth_open"])
    expected[clip.split] = expected.get(clip.split, 0) + frames // MAX_FRAMES
  assert sizes == expected
  identities = {}
  for split in sizes:
    identities[split] = {
      e["identity"].decode() for e in pipeline.tfds_source(CONFIG, data_dir, split)
    }
    assert all(hdtf.identity_split(i) == split for i in identities[split])
  assert not identities["train"] & identities["validation"]
  assert not identities["test"] & (identities["train"] | identities["validation"])


def test_windows_are_consecutive_frames_with_their_audio_and_ground_truth(raw_dir, built):
  data_dir, _ = built
  clips = {c.clip_id: c for c in _clips(raw_dir)}
  source = pipeline.tfds_source(CONFIG, data_dir, "test")
  starts = {}
  for i in range(len(source)):
    example = source[i]
    clip = clips[example["clip_id"].decode()]
    start = int(example["start_frame"])
    starts.setdefault(clip.clip_id, []).append(start)
    assert example["key"].decode() == f"{clip.clip_id}@{start}"
    assert example["identity"].decode() == clip.identity
    video, audio = example["video"], example["audio"]
    assert video.shape == (MAX_FRAMES, FRAME_SIZE, FRAME_SIZE, 3) and video.dtype == np.uint8
    assert audio.dtype == np.float32 and audio.shape == (MAX_FRAMES * SAMPLES_PER_FRAME,)
    frames = video_ops.decode_video(clip.path)
    assert int(example["num_frames"]) == len(frames) and float(example["fps"]) == 25.0
    window = slice(start, start + MAX_FRAMES)
    np.testing.assert_array_equal(video, video_ops.center_crop(frames[window], FRAME_SIZE))
    raw_audio = video_ops.decode_audio(clip.path)[start * SAMPLES_PER_FRAME :]
    np.testing.assert_array_equal(audio, raw_audio[: MAX_FRAMES * SAMPLES_PER_FRAME])
    truth = _truth(clip)
    assert bool(example["has_ground_truth"])
    for key in ("mouth_open", "head_pose", "blink"):
      np.testing.assert_allclose(example[key], np.float32(truth[key])[window])
  for clip_id, found in starts.items():  # every whole window, from frame 0, none overlapping
    frames = len(_truth(clips[clip_id])["mouth_open"])
    assert sorted(found) == list(range(0, frames - MAX_FRAMES + 1, MAX_FRAMES))


def test_window_starts():
  assert hdtf.window_starts(250, 100) == [0, 100]
  assert hdtf.window_starts(200, 100) == [0, 100]
  assert hdtf.window_starts(60, 100) == [0]  # a short clip is one window of all its frames


def _copy(raw_dir, tmp_path):
  """A copy of the twin with every clip also as the identity's clip 001, so that each split
  keeps good clips when the test spoils the 000s."""
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  splits = hdtf.list_clips(copy)
  for clip in [c for clips in splits.values() for c in clips]:
    for suffix in (".mp4", ".json"):
      shutil.copy(clip.path.replace(".mp4", suffix), clip.path.replace("_000.mp4", "_001" + suffix))
  return copy, splits


def test_bad_clips_fail_naming_the_file_or_are_skipped_and_counted(raw_dir, tmp_path):
  copy, splits = _copy(raw_dir, tmp_path)
  corrupt, silent = splits["train"]
  wrong_fps, bad_truth = splits["validation"]
  with open(corrupt.path, "r+b") as f:
    f.truncate(200)
  frames = video_ops.decode_video(silent.path)
  write_video(frames, silent.path, 25)  # no audio stream
  write_video(video_ops.decode_video(wrong_fps.path), wrong_fps.path, 30, np.zeros(32000), 16000)
  truth = _truth(bad_truth)
  truth["mouth_open"] = truth["mouth_open"][:-3]
  with open(bad_truth.truth_path, "w") as f:
    json.dump(truth, f)
  reasons = {
    corrupt.path: "cannot",
    silent.path: "no audio stream",
    wrong_fps.path: "frame rate is 30 fps",
    bad_truth.truth_path: r"'mouth_open' \(frames first\) has shape",
  }
  builder = hdtf.Hdtf(config="64px_100f", data_dir=str(tmp_path / "unused"))
  for clip in (corrupt, silent, wrong_fps, bad_truth):
    with pytest.raises((common.InvalidExample, video_ops.VideoDecodeError)) as raised:
      builder._load(clip)
    path = raised.value.path
    assert path in reasons and re.search(reasons[path], str(raised.value)), str(raised.value)
    assert "\n" not in str(raised.value)
  with pytest.raises(common.InvalidExample) as raised:
    hdtf.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=8)
  assert raised.value.path == corrupt.path
  # Real HDTF has no ground truth: the test clips lose theirs, and say so.
  for clip in hdtf.list_clips(copy)["test"]:  # the 000s and their 001 copies
    os.remove(clip.truth_path)
  sizes = hdtf.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=8
  )
  frames = {c.identity: len(_truth(c)["mouth_open"]) for c in _clips(raw_dir)}
  expected = {
    split: 2 * sum(frames[c.identity] // 8 for c in clips) for split, clips in splits.items()
  }
  for clip in (corrupt, silent, wrong_fps, bad_truth):  # each split keeps its good 001 copies
    expected[clip.split] -= frames[clip.identity] // 8
  assert sizes == expected
  report = hdtf.inspect(str(tmp_path / "lenient"))
  assert report["skipped"] == {"train": 2, "validation": 2, "test": 0}
  example = pipeline.tfds_source("hdtf/16px_8f", str(tmp_path / "lenient"), "test")[0]
  assert not example["has_ground_truth"]
  assert example["mouth_open"].shape == (8,) and not example["mouth_open"].any()
  assert example["head_pose"].shape == (8, 6) and not example["head_pose"].any()


def test_bad_names_and_truth_files_are_named(raw_dir, tmp_path):
  clip = _clips(raw_dir)[0]
  frames = len(_truth(clip)["mouth_open"])
  odd = tmp_path / "names"
  odd.mkdir()
  shutil.copy(clip.path, odd / "interview.mp4")
  with pytest.raises(ValueError, match=r"interview\.mp4: not an HDTF clip name"):
    hdtf.list_clips(str(odd))
  with pytest.raises(FileNotFoundError, match="no HDTF clips"):
    hdtf.list_clips(str(tmp_path))
  stem = tmp_path / "WDA_Someone_000"
  copy = hdtf.Clip(str(stem) + ".mp4", "train", "WDA_Someone", "WDA_Someone_000")
  for content, message in (
    ("{not json", "not a readable ground-truth .json"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"mouth_open": [0.0] * frames, "blink": [0.0] * frames}), "no 'head_pose'"),
    (json.dumps({**_truth(clip), "fps": 30}), "ground truth is at 30 fps"),
    (json.dumps({**_truth(clip), "head_pose": [[0.0] * 5] * frames}), r"'head_pose'.*expected"),
  ):
    with open(copy.truth_path, "w") as f:
      f.write(content)
    with pytest.raises(common.InvalidExample, match=message) as raised:
      hdtf.read_truth(copy, frames, 25.0)
    assert raised.value.path == copy.truth_path


def test_cli_synth_build_inspect(tmp_path, capsys):
  raw, data_dir, png = str(tmp_path / "raw"), str(tmp_path / "data"), str(tmp_path / "hdtf.png")
  assert cli.main(["synth", "hdtf", "--out", raw, "--size", "tiny"]) == 0
  assert "wrote synthetic hdtf (tiny)" in capsys.readouterr().out
  args = ["build", "hdtf", "--raw", raw, "--data_dir", data_dir]
  assert cli.main([*args, "--frame_size", "24", "--max_frames", "25"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(summary["splits"]) == {"train", "validation", "test"}
  assert cli.main(["inspect", "hdtf", "--data_dir", data_dir, "--out", png]) == 0
  report = json.loads(capsys.readouterr().out)
  train = report["splits"]["train"]
  assert train["features"]["video"] == [[25, 24, 24, 3], "uint8"]
  assert train["features"]["head_pose"] == [[25, 6], "float32"]
  assert train["identities"] == 2 and train["with_ground_truth"] == train["num_examples"]
  assert 0.04 < train["mouth_open_range"][1] < 0.15
  with open(png, "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_a_task_opens_the_twin_built_on_first_use(tmp_path, monkeypatch):
  monkeypatch.setenv("FDJAX_DATA_ROOT", str(tmp_path))
  data = ml_collections.ConfigDict(
    {"name": "hdtf", "raw_dir": "", "data_dir": "", "synthetic": "tiny", "skip_invalid": False}
  )
  _, data_dir = prepare.ensure_dataset(data)
  assert data_dir.startswith(str(tmp_path))
  source = pipeline.tfds_source("hdtf", data_dir, "train")
  # The default config: windows of 100 frames at 64 px; the tiny clips (2-3 s) are one each.
  assert len(source) == 2 and source[0]["video"].shape[1:] == (64, 64, 3)
  assert source[0]["audio"].shape == (len(source[0]["video"]) * SAMPLES_PER_FRAME,)


def test_the_twin_sizes_hold_at_least_two_identities_per_split():
  for size in hdtf_twin.SIZES.values():
    assert set(size.identities) == set(hdtf.SPLITS) and min(size.identities.values()) >= 2
  names = hdtf_twin.identities(hdtf_twin.SIZES["demo"])
  assert len({n for n, _ in names}) == len(names) == 32
  assert all(hdtf.identity_split(n) == s for n, s in names)
