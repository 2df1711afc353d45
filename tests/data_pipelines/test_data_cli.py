"""`data synth|build|inspect`: datasets found by import path, progress and reports printed."""

import json
import pickle

import tensorflow_datasets as tfds

from data_pipelines import cli
from data_pipelines.ops import safe_pickle


def test_datasets_are_discovered_from_the_builders_package():
  available = cli.available_datasets()
  assert {"vocaset", "biwi"} <= set(available)
  assert "common" not in available and not any(name.startswith("_") for name in available)


def test_synth_build_inspect_round_trip(tmp_path, capsys):
  raw, data_dir, png = str(tmp_path / "raw"), str(tmp_path / "data"), str(tmp_path / "m.png")
  assert cli.main(["synth", "vocaset", "--out", raw, "--size", "tiny"]) == 0
  assert "wrote synthetic vocaset (tiny)" in capsys.readouterr().out

  assert cli.main(["build", "vocaset", "--raw", raw, "--data_dir", data_dir]) == 0
  captured = capsys.readouterr()
  assert "[vocaset train] 16/16 sequences, 0 skipped" in captured.err  # the progress line
  summary = json.loads(captured.out.strip().splitlines()[-1])
  assert summary["splits"] == {"train": 16, "validation": 2, "test": 2}
  assert len(tfds.data_source("vocaset", data_dir=data_dir, split="test")) == 2

  assert cli.main(["inspect", "vocaset", "--data_dir", data_dir, "--out", png]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["fps"] == 30 and report["sample_rate"] == 16000 and report["num_vertices"] == 5023
  assert report["splits"]["train"]["num_examples"] == 16
  assert report["skipped"] == {"train": 0, "validation": 0, "test": 0}
  with open(png, "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_build_passes_skip_invalid(tmp_path, capsys):
  raw = tmp_path / "raw"
  assert cli.main(["synth", "vocaset", "--out", str(raw)]) == 0
  # A sequence whose audio entry is missing from raw_audio_fixed.pkl.
  raw_audio = safe_pickle.load_pickle(raw / "raw_audio_fixed.pkl")
  del raw_audio["FaceTalk_170725_00137_TA"]["sentence01"]
  (raw / "raw_audio_fixed.pkl").write_bytes(pickle.dumps(raw_audio))
  args = ["build", "vocaset", "--raw", str(raw), "--data_dir", str(tmp_path / "data")]
  assert cli.main([*args, "--skip_invalid"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["splits"]["train"] == 15


def test_unknown_dataset_lists_the_available_ones(capsys):
  assert cli.main(["build", "vocaset2", "--raw", "x", "--data_dir", "y"]) == 2
  error = capsys.readouterr().err
  assert "unknown dataset 'vocaset2'" in error and "biwi" in error and "vocaset" in error
  assert cli.main(["synth", "common", "--out", "x"]) == 2
  assert "unknown synthetic twin 'common'" in capsys.readouterr().err


def test_build_stores_video_frames_at_the_asked_size(tmp_path, capsys):
  raw, data_dir = str(tmp_path / "raw"), str(tmp_path / "data")
  assert cli.main(["synth", "dfew", "--out", raw, "--size", "tiny"]) == 0
  args = ["build", "dfew", "--raw", raw, "--data_dir", data_dir]
  assert cli.main([*args, "--frame_size", "40", "--max_frames", "6"]) == 0
  capsys.readouterr()
  source = tfds.data_source("dfew/40px_6f", data_dir=data_dir, split="fold1_test")
  video = source[0]["video"]
  assert video.shape[1:] == (40, 40, 3) and video.shape[0] <= 6


def test_build_rejects_video_options_for_other_datasets(capsys):
  args = ["build", "vocaset", "--raw", "x", "--data_dir", "y", "--frame_size", "64"]
  assert cli.main(args) == 2
  assert "--frame_size applies to video datasets; vocaset has no frame_size" in (
    capsys.readouterr().err
  )
  assert cli.main(["build", "dfew", "--raw", "x", "--data_dir", "y", "--max_frames", "0"]) == 2
  assert "--max_frames must be positive, got 0" in capsys.readouterr().err
  args = ["build", "dfew", "--raw", "x", "--data_dir", "y", "--windows_per_clip", "2"]
  assert cli.main(args) == 2
  assert "dfew has no windows_per_clip" in capsys.readouterr().err
  args = ["build", "voxceleb2", "--raw", "x", "--data_dir", "y", "--crop_fraction", "1.5"]
  assert cli.main(args) == 2
  assert "--crop_fraction must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_synth_names_the_sizes_a_twin_has(tmp_path, capsys):
  assert cli.main(["synth", "mafw", "--out", str(tmp_path / "raw"), "--size", "large"]) == 2
  error = capsys.readouterr().err
  assert "the synthetic mafw twin has no size 'large'; its sizes: demo, tiny" in error
  assert not (tmp_path / "raw").exists()
