"""VOCASET: synthetic twin -> TFDS build -> data source / pipeline, in the real dataset's terms."""

import functools
import math
import os
import pickle

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from data_pipelines import audio_mesh, pipeline
from data_pipelines.builders import common, vocaset
from data_pipelines.ops import audio as audio_ops
from data_pipelines.ops import mesh as mesh_ops
from data_pipelines.ops import safe_pickle
from data_pipelines.synthetic import vocaset as vocaset_twin


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocaset_raw"))
  vocaset_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("vocaset_data"))
  return data_dir, vocaset.build(raw_dir, data_dir)


def _load(raw_dir, name):
  return safe_pickle.load_pickle(os.path.join(raw_dir, name))


def test_split_rule_gives_the_published_split_sizes():
  counts = {}
  for subject in vocaset.SUBJECTS:
    for sentence in range(1, 41):
      split = vocaset.split_of(subject, sentence)
      counts[split] = counts.get(split, 0) + 1
  assert counts == {"train": 320, "validation": 40, "test": 40, None: 80}
  assert len(set(vocaset.SUBJECTS)) == 12
  assert vocaset.TEST_SUBJECTS == ("FaceTalk_170809_00138_TA", "FaceTalk_170731_00024_TA")


def test_twin_writes_the_release_layout(raw_dir):
  data_verts = np.load(os.path.join(raw_dir, "data_verts.npy"), mmap_mode="r")
  assert data_verts.dtype == np.float32 and data_verts.shape[1:] == (5023, 3)
  index = _load(raw_dir, "subj_seq_to_idx.pkl")
  raw_audio = _load(raw_dir, "raw_audio_fixed.pkl")
  templates = _load(raw_dir, "templates.pkl")
  assert set(index) == set(raw_audio) == set(templates) == set(vocaset.SUBJECTS)
  assert sum(len(frames) for s in index.values() for frames in s.values()) == len(data_verts)
  rates = {entry["sample_rate"] for s in raw_audio.values() for entry in s.values()}
  assert rates == {22000, 44100}
  for subject, sentences in index.items():
    assert templates[subject].shape == (5023, 3)
    for sentence, frames in sentences.items():
      seconds = len(frames) / 60
      assert 1.0 <= seconds <= 1.4
      entry = raw_audio[subject][sentence]
      assert abs(len(entry["audio"]) / entry["sample_rate"] - seconds) < 1 / 60
  lips = mesh_ops.load_region_mask(os.path.join(raw_dir, "regions", "lips.txt"), 5023)
  upper = mesh_ops.load_region_mask(os.path.join(raw_dir, "regions", "upper_face.txt"), 5023)
  assert 100 < lips.sum() < 500 and upper.sum() > 1000 and not (lips & upper).any()


def test_split_sizes_are_those_of_the_sequences_written(raw_dir, built):
  data_dir, sizes = built
  index = _load(raw_dir, "subj_seq_to_idx.pkl")
  expected = {"train": 0, "validation": 0, "test": 0}
  for subject, sentences in index.items():
    for sentence in sentences:
      split = vocaset.split_of(subject, int(sentence[len("sentence") :]))
      if split:
        expected[split] += 1
  assert sizes == expected == {"train": 16, "validation": 2, "test": 2}
  for split, size in sizes.items():
    assert len(tfds.data_source("vocaset", data_dir=data_dir, split=split)) == size


def test_examples_have_the_documented_features(built):
  data_dir, _ = built
  info = tfds.builder("vocaset", data_dir=data_dir).info
  assert info.metadata["fps"] == 30 and info.metadata["sample_rate"] == 16000
  assert info.metadata["train_subjects"] == list(vocaset.TRAIN_SUBJECTS)
  for split, subjects in (
    ("train", vocaset.TRAIN_SUBJECTS),
    ("validation", vocaset.VALIDATION_SUBJECTS),
    ("test", vocaset.TEST_SUBJECTS),
  ):
    source = tfds.data_source("vocaset", data_dir=data_dir, split=split)
    names = set()
    for example in source:
      num_frames = example["vertices"].shape[0]
      assert example["vertices"].dtype == np.float32
      assert example["vertices"].shape == (num_frames, 5023, 3)
      assert example["template"].shape == (5023, 3) and example["template"].dtype == np.float32
      assert example["audio"].dtype == np.float32 and example["audio"].ndim == 1
      assert abs(example["audio"].shape[0] * 30 / 16000 - num_frames) <= 1
      assert 15 <= num_frames <= 43  # 1.0-1.4 s at 30 fps
      name = example["subject_name"].decode()
      names.add(name)
      if split == "train":
        assert example["subject"] == vocaset.TRAIN_SUBJECTS.index(name)
      else:
        assert example["subject"] == -1 and 21 <= example["sentence"] <= 40
      assert example["key"].decode() == f"{name}_sentence{example['sentence']:02d}"
    assert names == set(subjects)


def test_vertices_are_every_second_capture_frame_and_audio_is_resampled(raw_dir, built):
  data_dir, _ = built
  data_verts = np.load(os.path.join(raw_dir, "data_verts.npy"), mmap_mode="r")
  index = _load(raw_dir, "subj_seq_to_idx.pkl")
  raw_audio = _load(raw_dir, "raw_audio_fixed.pkl")
  for example in list(tfds.data_source("vocaset", data_dir=data_dir, split="test")):
    subject, sentence = example["subject_name"].decode(), f"sentence{example['sentence']:02d}"
    rows = [index[subject][sentence][f] for f in sorted(index[subject][sentence])]
    np.testing.assert_array_equal(example["vertices"], data_verts[rows][::2])
    entry = raw_audio[subject][sentence]
    expected = audio_ops.resample(entry["audio"], entry["sample_rate"], 16000)
    np.testing.assert_array_equal(example["audio"], expected)


def test_per_sequence_form_builds_the_same_dataset(raw_dir, built, tmp_path):
  """FaceFormer's preprocessing layout: vertices_npy/<subject>_sentenceXX.npy and wav/."""
  data_dir, sizes = built
  per_sequence = tmp_path / "per_sequence"
  (per_sequence / "vertices_npy").mkdir(parents=True)
  (per_sequence / "wav").mkdir()
  os.link(os.path.join(raw_dir, "templates.pkl"), per_sequence / "templates.pkl")
  data_verts = np.load(os.path.join(raw_dir, "data_verts.npy"), mmap_mode="r")
  raw_audio = _load(raw_dir, "raw_audio_fixed.pkl")
  for subject, sentences in _load(raw_dir, "subj_seq_to_idx.pkl").items():
    for sentence, frames in sentences.items():
      stem = f"{subject}_{sentence}"
      rows = [frames[f] for f in sorted(frames)]
      np.save(per_sequence / "vertices_npy" / f"{stem}.npy", data_verts[rows].reshape(-1, 15069))
      entry = raw_audio[subject][sentence]
      soundfile.write(
        per_sequence / "wav" / f"{stem}.wav", entry["audio"], entry["sample_rate"], "FLOAT"
      )
  other_dir = str(tmp_path / "data")
  assert vocaset.build(str(per_sequence), other_dir) == sizes
  packed = tfds.data_source("vocaset", data_dir=data_dir, split="validation")
  unpacked = tfds.data_source("vocaset", data_dir=other_dir, split="validation")
  for a, b in zip(packed, unpacked):
    assert a["key"] == b["key"]
    np.testing.assert_array_equal(a["vertices"], b["vertices"])
    np.testing.assert_allclose(a["audio"], b["audio"], atol=1e-6)


def test_pipeline_yields_training_windows_and_whole_sequence_eval_batches(built):
  data_dir, _ = built
  train = pipeline.train_dataset(
    pipeline.tfds_source("vocaset", data_dir, "train"),
    functools.partial(audio_mesh.train_window, window_frames=30, fps=30),
    batch_size=4,
    seed=0,
  )
  batch = next(iter(train))
  assert batch["vertices"].shape == (4, 30, 5023, 3) and batch["vertices"].dtype == np.float32
  assert batch["audio"].shape == batch["audio_mask"].shape == (4, 16000)
  assert batch["template"].shape == (4, 5023, 3) and batch["frame_mask"].shape == (4, 30)
  assert batch["subject"].dtype == np.int32 and set(batch["subject"]) <= set(range(8))
  test = pipeline.eval_dataset(
    pipeline.tfds_source("vocaset", data_dir, "test"),
    functools.partial(audio_mesh.whole_sequence, fps=30),
    batch_size=2,
    batch_fn=audio_mesh.eval_batch,
  )
  (batch,) = list(test)
  longest = batch["vertices"].shape[1]
  assert batch["audio"].shape == (2, math.ceil(longest * 16000 / 30))
  assert batch["frame_mask"].any(axis=1).all() and batch["frame_mask"][:, 0].all()
  np.testing.assert_array_equal(batch["subject"], [-1, -1])


def _log_band_features(audio, num_frames, context=2):
  """Log energies in 16 bands per frame, with +-2 frames of context: what a listener hears."""
  hop = 16000 / 30
  size = int(2 * hop)
  padded = np.pad(audio, (size, size))
  starts = np.round((np.arange(num_frames) + 0.5) * hop + size / 2).astype(int)
  power = np.abs(np.fft.rfft(padded[starts[:, None] + np.arange(size)] * np.hanning(size))) ** 2
  frequencies = np.fft.rfftfreq(size, 1 / 16000)
  edges = np.geomspace(100, 7000, 17)
  bands = np.stack(
    [power[:, (frequencies >= a) & (frequencies < b)].sum(-1) for a, b in zip(edges, edges[1:])],
    -1,
  )
  x = np.log(bands + 1e-6)
  shifted = [np.roll(x, k, axis=0) for k in range(-context, context + 1)]
  return np.concatenate([*shifted, np.ones((num_frames, 1))], -1)


def test_a_model_that_listens_beats_template_and_mean_motion(raw_dir, built):
  """The twin's lip motion is a function of the audio: ridge regression on band energies
  should beat, by far, every predictor that ignores the audio."""
  data_dir, _ = built
  lips = mesh_ops.load_region_mask(os.path.join(raw_dir, "regions", "lips.txt"), 5023)

  def arrays(split):
    features, motion = [], []
    for example in tfds.data_source("vocaset", data_dir=data_dir, split=split):
      num_frames = example["vertices"].shape[0]
      features.append(_log_band_features(example["audio"], num_frames))
      motion.append((example["vertices"] - example["template"])[:, lips].reshape(num_frames, -1))
    return np.concatenate(features), np.concatenate(motion)

  x_train, y_train = arrays("train")
  x_test, y_test = arrays("test")
  weights = np.linalg.solve(x_train.T @ x_train + np.eye(x_train.shape[1]), x_train.T @ y_train)

  def lip_vertex_error(prediction):
    squared = ((prediction - y_test).reshape(len(y_test), -1, 3) ** 2).sum(-1)
    return squared.max(-1).mean()

  template = lip_vertex_error(np.zeros_like(y_test))
  mean_motion = lip_vertex_error(np.broadcast_to(y_train.mean(0), y_test.shape))
  listening = lip_vertex_error(x_test @ weights)
  assert listening < 0.3 * mean_motion and mean_motion < template


def _small_packed_raw(raw_dir, out_dir, keep):
  """A packed raw directory holding only the sequences in `keep` ({subject: [sentence]})."""
  os.makedirs(out_dir)
  data_verts = np.load(os.path.join(raw_dir, "data_verts.npy"), mmap_mode="r")
  index = _load(raw_dir, "subj_seq_to_idx.pkl")
  raw_audio = _load(raw_dir, "raw_audio_fixed.pkl")
  rows, new_index, new_audio = [], {}, {}
  for subject, sentences in keep.items():
    for sentence in sentences:
      frames = index[subject][sentence]
      new_index.setdefault(subject, {})[sentence] = {
        f: len(rows) + i for i, f in enumerate(sorted(frames))
      }
      rows += [frames[f] for f in sorted(frames)]
      new_audio.setdefault(subject, {})[sentence] = raw_audio[subject][sentence]
  np.save(os.path.join(out_dir, "data_verts.npy"), data_verts[rows])
  for name, content in (("subj_seq_to_idx.pkl", new_index), ("raw_audio_fixed.pkl", new_audio)):
    with open(os.path.join(out_dir, name), "wb") as f:
      pickle.dump(content, f)
  os.link(os.path.join(raw_dir, "templates.pkl"), os.path.join(out_dir, "templates.pkl"))
  return new_index, new_audio


_KEEP = {
  "FaceTalk_170725_00137_TA": ["sentence01", "sentence21"],
  "FaceTalk_170728_03272_TA": ["sentence01"],
  "FaceTalk_170811_03275_TA": ["sentence21"],
  "FaceTalk_170809_00138_TA": ["sentence21"],
}


def test_broken_packed_sequences_fail_naming_the_entry_or_are_skipped(raw_dir, tmp_path, capsys):
  broken = str(tmp_path / "broken")
  index, raw_audio = _small_packed_raw(raw_dir, broken, _KEEP)
  data_verts = np.load(os.path.join(broken, "data_verts.npy"), mmap_mode="r+")
  nan_rows = list(index["FaceTalk_170725_00137_TA"]["sentence21"].values())
  data_verts[nan_rows[3]] = np.nan
  data_verts.flush()
  del data_verts
  del raw_audio["FaceTalk_170725_00137_TA"]["sentence01"]
  with open(os.path.join(broken, "raw_audio_fixed.pkl"), "wb") as f:
    pickle.dump(raw_audio, f)

  with pytest.raises(common.InvalidExample) as error:
    vocaset.build(broken, str(tmp_path / "fail"))
  assert error.value.path.endswith("raw_audio_fixed.pkl#FaceTalk_170725_00137_TA/sentence01")
  assert "no audio" in error.value.reason

  sizes = vocaset.build(broken, str(tmp_path / "skip"), skip_invalid=True)
  assert sizes == {"train": 1, "validation": 1, "test": 1}
  assert "skipped 2 invalid example(s)" in capsys.readouterr().out


def test_nan_vertices_in_the_packed_array_name_the_sequence(raw_dir, tmp_path):
  broken = str(tmp_path / "broken")
  index, _ = _small_packed_raw(raw_dir, broken, {"FaceTalk_170811_03275_TA": ["sentence21"]})
  data_verts = np.load(os.path.join(broken, "data_verts.npy"), mmap_mode="r+")
  data_verts[2, 100] = np.inf
  data_verts.flush()
  del data_verts
  with pytest.raises(common.InvalidExample) as error:
    vocaset.build(broken, str(tmp_path / "data"))
  assert error.value.path.endswith("data_verts.npy#FaceTalk_170811_03275_TA/sentence21")
  assert "non-finite" in error.value.reason


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_stops_the_build_and_never_runs(raw_dir, tmp_path):
  broken = str(tmp_path / "broken")
  _small_packed_raw(raw_dir, broken, _KEEP)
  marker = tmp_path / "marker"
  audio_path = os.path.join(broken, "raw_audio_fixed.pkl")
  with open(audio_path, "wb") as f:
    pickle.dump({"FaceTalk_170725_00137_TA": {"sentence01": _Exploit(marker)}}, f)
  for skip_invalid in (False, True):  # a shared file is not an example: never skipped
    with pytest.raises(safe_pickle.UnsafePickleError) as error:
      vocaset.build(broken, str(tmp_path / "data"), skip_invalid=skip_invalid)
    assert audio_path in str(error.value) and "system" in error.value.refused
  assert not marker.exists()
