"""BIWI: synthetic twin -> TFDS build -> data source, and the bad-input rules (docs/design.md
section 6)."""

import math
import os
import pickle

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from data_pipelines.builders import biwi, common
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import safe_pickle
from data_pipelines.synthetic import biwi as biwi_twin


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("biwi_raw"))
  biwi_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("biwi_data"))
  return data_dir, biwi.build(raw_dir, data_dir)


def test_split_rule_gives_the_published_split_sizes():
  counts = {}
  for subject in biwi.SUBJECTS:
    for sentence in range(1, 41):
      split = biwi.split_of(subject, sentence)
      counts[split] = counts.get(split, 0) + 1
  assert counts == {"train": 192, "validation": 24, "test": 24, "test_b": 320}
  assert len(biwi.SUBJECTS) == 14 and len(biwi.TEST_B_SUBJECTS) == 8


def test_twin_writes_the_per_sequence_layout(raw_dir):
  stems = sorted(f[:-4] for f in os.listdir(os.path.join(raw_dir, "vertices_npy")))
  assert stems == sorted(f[:-4] for f in os.listdir(os.path.join(raw_dir, "wav")))
  assert len(stems) == 26
  vertices = np.load(os.path.join(raw_dir, "vertices_npy", "F2_e01.npy"))
  assert vertices.dtype == np.float32 and vertices.shape[1] == 70110
  info = soundfile.info(os.path.join(raw_dir, "wav", "F2_e01.wav"))
  assert info.samplerate == 16000 and info.channels == 1
  assert info.frames == round(vertices.shape[0] * 16000 / 25)
  templates = safe_pickle.load_pickle(os.path.join(raw_dir, "templates.pkl"))
  assert sorted(templates) == sorted(biwi.SUBJECTS)
  assert all(t.shape == (23370, 3) for t in templates.values())


def test_split_sizes_are_those_of_the_sequences_written(raw_dir, built):
  data_dir, sizes = built
  expected = {}
  for filename in os.listdir(os.path.join(raw_dir, "vertices_npy")):
    subject, sentence = filename[:-4].split("_e")
    split = biwi.split_of(subject, int(sentence))
    expected[split] = expected.get(split, 0) + 1
  assert sizes == expected == {"train": 6, "validation": 6, "test": 6, "test_b": 8}
  for split, size in sizes.items():
    assert len(tfds.data_source("biwi", data_dir=data_dir, split=split)) == size


def test_examples_have_the_documented_features(built):
  data_dir, _ = built
  for split in ("train", "test_b"):
    for example in tfds.data_source("biwi", data_dir=data_dir, split=split):
      num_frames = example["vertices"].shape[0]
      assert example["vertices"].shape == (num_frames, 23370, 3)
      assert example["vertices"].dtype == example["audio"].dtype == np.float32
      assert example["template"].shape == (23370, 3)
      assert abs(example["audio"].shape[0] * 25 / 16000 - num_frames) <= 1
      name = example["subject_name"].decode()
      if split == "train":
        assert example["subject"] == biwi.TRAIN_SUBJECTS.index(name)
        assert 1 <= example["sentence"] <= 32
      else:
        assert example["subject"] == -1 and name in biwi.TEST_B_SUBJECTS
      assert example["key"].decode() == f"{name}_e{example['sentence']:02d}"


def test_inspect_reports_counts_shapes_and_plots_motion(built, tmp_path):
  data_dir, sizes = built
  png = str(tmp_path / "motion.png")
  report = biwi.inspect(data_dir, png)
  assert {s: v["num_examples"] for s, v in report["splits"].items()} == sizes
  assert report["fps"] == 25 and report["sample_rate"] == 16000 and report["num_vertices"] == 23370
  assert report["features"]["vertices"].startswith("(None, 23370, 3)")
  train = report["splits"]["train"]
  assert train["audio_frame_mismatch_max"] <= 1 and 1 < train["motion_mm_p99"] < 30
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- Bad inputs ------------------------------------------------------------------------------


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _link_good(raw_dir, out_dir, stems):
  for sub in ("vertices_npy", "wav"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  if not os.path.exists(os.path.join(out_dir, "templates.pkl")):
    os.link(os.path.join(raw_dir, "templates.pkl"), os.path.join(out_dir, "templates.pkl"))
  for stem in stems:
    os.link(*(os.path.join(d, "vertices_npy", f"{stem}.npy") for d in (raw_dir, out_dir)))
    os.link(*(os.path.join(d, "wav", f"{stem}.wav") for d in (raw_dir, out_dir)))


def _good_pair(raw_dir, stem):
  vertices = np.load(os.path.join(raw_dir, "vertices_npy", f"{stem}.npy"))
  audio, sample_rate = soundfile.read(os.path.join(raw_dir, "wav", f"{stem}.wav"), dtype="float32")
  return vertices, audio, sample_rate


def _write(out_dir, stem, vertices=None, audio=None, sample_rate=16000):
  """Writes fresh files (never through a hard link into the shared twin)."""
  if vertices is not None:
    np.save(os.path.join(out_dir, "vertices_npy", f"{stem}.npy"), vertices)
  if audio is not None:
    soundfile.write(os.path.join(out_dir, "wav", f"{stem}.wav"), audio, sample_rate)


def _empty_wav(raw_dir, out_dir, marker):
  vertices, _, _ = _good_pair(raw_dir, "F3_e01")
  _write(out_dir, "F3_e01", vertices, np.zeros(0, np.float32))
  return "wav/F3_e01.wav", "audio is empty"


def _zero_byte_wav(raw_dir, out_dir, marker):
  vertices, _, _ = _good_pair(raw_dir, "F4_e01")
  _write(out_dir, "F4_e01", vertices)
  open(os.path.join(out_dir, "wav", "F4_e01.wav"), "wb").close()
  return "wav/F4_e01.wav", "audio cannot be read"


def _nan_vertices(raw_dir, out_dir, marker):
  vertices, audio, rate = _good_pair(raw_dir, "M3_e01")
  vertices[5, 300:303] = np.nan
  _write(out_dir, "M3_e01", vertices, audio, rate)
  return "vertices_npy/M3_e01.npy", "vertices has 3 non-finite value(s)"


def _wrong_vertex_count(raw_dir, out_dir, marker):
  vertices, audio, rate = _good_pair(raw_dir, "M4_e01")
  _write(out_dir, "M4_e01", vertices[:, : 5023 * 3], audio, rate)
  return "vertices_npy/M4_e01.npy", "vertices has shape (26, 5023, 3), expected"


def _length_mismatch(raw_dir, out_dir, marker):
  vertices, audio, rate = _good_pair(raw_dir, "M5_e01")
  _write(out_dir, "M5_e01", vertices, audio[: len(audio) // 2], rate)
  return "wav/M5_e01.wav", "audio/mesh length mismatch"


def _pickled_vertices(raw_dir, out_dir, marker):
  _, audio, rate = _good_pair(raw_dir, "M3_e33")
  evil = np.array([_Exploit(marker)], dtype=object)
  np.save(os.path.join(out_dir, "vertices_npy", "M3_e33.npy"), evil, allow_pickle=True)
  _write(out_dir, "M3_e33", audio=audio, sample_rate=rate)
  return "vertices_npy/M3_e33.npy", "vertices cannot be read"


def _missing_wav(raw_dir, out_dir, marker):
  vertices, _, _ = _good_pair(raw_dir, "M4_e37")
  _write(out_dir, "M4_e37", vertices)
  return "wav/M4_e37.wav", "audio file is missing"


def _badly_named(raw_dir, out_dir, marker):
  vertices, audio, rate = _good_pair(raw_dir, "F2_e01")
  _write(out_dir, "F2_take1", vertices, audio, rate)
  return "vertices_npy/F2_take1.npy", "naming scheme"


_BROKEN = [
  _empty_wav,
  _zero_byte_wav,
  _nan_vertices,
  _wrong_vertex_count,
  _length_mismatch,
  _pickled_vertices,
  _missing_wav,
  _badly_named,
]


@pytest.mark.parametrize("make_broken", _BROKEN, ids=lambda f: f.__name__.strip("_"))
def test_each_broken_input_fails_the_build_naming_file_and_reason(raw_dir, tmp_path, make_broken):
  out_dir = str(tmp_path / "raw")
  _link_good(raw_dir, out_dir, [])
  marker = tmp_path / "marker"
  relative_path, reason = make_broken(raw_dir, out_dir, marker)
  with pytest.raises(common.InvalidExample) as error:
    biwi.build(out_dir, str(tmp_path / "data"))
  assert error.value.path == os.path.join(out_dir, relative_path)
  assert reason in error.value.reason
  assert str(error.value).startswith(os.path.join(out_dir, relative_path))
  assert not marker.exists()


def _resampled_to_44k1(raw_dir, out_dir):
  """A good sequence whose wav is at 44.1 kHz: it must be resampled, not refused."""
  vertices, audio, _ = _good_pair(raw_dir, "F2_e01")
  _write(out_dir, "F2_e01", vertices, audio_ops.resample(audio, 16000, 44100), 44100)
  return audio


def test_wav_at_44k1_is_resampled_to_16k(raw_dir, tmp_path):
  out_dir = str(tmp_path / "raw")
  _link_good(raw_dir, out_dir, [])
  original = _resampled_to_44k1(raw_dir, out_dir)
  assert biwi.build(out_dir, str(tmp_path / "data")) == {"train": 1}
  (example,) = list(tfds.data_source("biwi", data_dir=str(tmp_path / "data"), split="train"))
  wav, rate = audio_ops.read_audio(os.path.join(out_dir, "wav", "F2_e01.wav"))
  assert rate == 44100
  np.testing.assert_array_equal(example["audio"], audio_ops.resample(wav, 44100, 16000))
  assert example["audio"].shape[0] == math.ceil(wav.shape[0] * 160 / 441)
  # 16 kHz -> 44.1 kHz -> 16 kHz keeps the waveform (up to the filters' edge near 8 kHz).
  assert np.corrcoef(example["audio"][: len(original)], original)[0, 1] > 0.99


def test_skip_invalid_builds_the_good_examples_and_counts_the_rest(raw_dir, tmp_path, capsys):
  out_dir = str(tmp_path / "raw")
  _link_good(raw_dir, out_dir, ["F3_e33", "F4_e37", "F1_e01"])
  _resampled_to_44k1(raw_dir, out_dir)
  marker = tmp_path / "marker"
  for make_broken in _BROKEN:
    make_broken(raw_dir, out_dir, marker)
  data_dir = str(tmp_path / "data")
  sizes = biwi.build(out_dir, data_dir, skip_invalid=True)
  assert sizes == {"train": 1, "validation": 1, "test": 1, "test_b": 1}
  out = capsys.readouterr().out
  assert f"skipped {len(_BROKEN)} invalid example(s)" in out
  assert "split 'train': skipped 6 invalid example(s)" in out
  assert "audio/mesh length mismatch" in out
  skipped = tfds.builder("biwi", data_dir=data_dir).info.metadata["skipped"]
  assert skipped == {"train": 6, "validation": 1, "test": 1, "test_b": 0}
  assert not marker.exists()


def test_a_template_pickle_that_runs_code_stops_the_build_and_never_runs(raw_dir, tmp_path):
  out_dir = str(tmp_path / "raw")
  _link_good(raw_dir, out_dir, ["F2_e01"])
  marker = tmp_path / "marker"
  templates_path = os.path.join(out_dir, "templates.pkl")
  os.unlink(templates_path)
  with open(templates_path, "wb") as f:
    pickle.dump({"F2": _Exploit(marker)}, f)
  for skip_invalid in (False, True):  # a shared file is not an example: never skipped
    with pytest.raises(safe_pickle.UnsafePickleError) as error:
      biwi.build(out_dir, str(tmp_path / "data"), skip_invalid=skip_invalid)
    assert str(error.value).startswith(templates_path) and "system" in error.value.refused
  assert not marker.exists()
