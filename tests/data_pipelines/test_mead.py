"""MEAD with FLAME parameters: synthetic twin -> TFDS build -> data source, the parameters decoded
through the head model, emotion in the upper face and mouth corners, and the bad-input rules
(docs/design.md section 6).

One small twin (`tests/mead_data.py`, shared with the experiment's test) with two corrupted
parameter files serves every test: it is built once with `skip_invalid`."""

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from mead_data import CORRUPTED

from data_pipelines import audio_mesh
from data_pipelines.builders import common, mead
from fdjax.models import flame


@pytest.fixture(scope="module")
def raw_dir(small_mead):
  return small_mead[0]


@pytest.fixture(scope="module")
def built(small_mead):
  return small_mead[1], small_mead[2]


def test_twin_writes_mead_layout_with_parameters_per_clip(raw_dir):
  clips = [
    os.path.relpath(os.path.join(root, f), raw_dir)
    for root, _, files in os.walk(raw_dir)
    for f in files
    if f.endswith(".npz") and "/flame/" in os.path.join(root, f)
  ]
  assert len(clips) == 2 * 22  # neutral at level 1, seven emotions at levels 1-3
  assert os.path.exists(os.path.join(raw_dir, mead.HEAD_MODEL))
  with np.load(os.path.join(raw_dir, "M037/flame/angry/level_3/001.npz")) as clip:
    assert clip["expression"].shape[1] == 50 and clip["jaw_pose"].shape[1] == 3
    assert clip["shape"].shape == (100,)
  assert os.path.exists(os.path.join(raw_dir, "M037/audio/angry/level_3/001.wav"))


def test_build_skips_the_spoiled_files_naming_them_and_keeps_the_rest(raw_dir, built):
  _, sizes = built
  assert sizes == {"train": 21, "test": 21}
  for relative, reason in zip(CORRUPTED, ("not a readable .npz", "missing 'expression'")):
    path = os.path.join(raw_dir, relative)
    with pytest.raises(common.InvalidExample, match=reason) as raised:
      mead.read_parameters(path)
    assert str(raised.value).startswith(path) and "\n" not in str(raised.value)


def test_examples_carry_emotion_intensity_and_decoded_parameters(raw_dir, built):
  data_dir, _ = built
  source = tfds.data_source("mead", data_dir=data_dir, split="test")
  keys = {e["key"].decode() for e in source}
  assert "M037_angry_level_3_001" in keys and "M037_sad_level_1_001" not in keys
  example = next(e for e in source if e["key"] == b"M037_angry_level_3_001")
  assert int(example["emotion"]) == mead.EMOTIONS.index("angry")
  assert int(example["intensity"]) == 2 and int(example["subject"]) == -1
  parameters = example["flame"]
  frames = len(example["vertices"])
  assert parameters["expression"].shape == (frames, 50) and parameters["pose"].shape == (frames, 15)
  model = flame.load_flame(os.path.join(raw_dir, mead.HEAD_MODEL))
  forward = jax.jit(lambda *a: flame.flame_forward(model, *a).vertices)
  expected = forward(parameters["shape"][None], parameters["expression"], parameters["pose"])
  np.testing.assert_allclose(example["vertices"], expected, atol=1e-6)
  neutral = forward(parameters["shape"][None], np.zeros((1, 50)), np.zeros((1, 15)))[0]
  np.testing.assert_allclose(example["template"], neutral, atol=1e-6)
  assert abs(len(example["audio"]) / 16000 * 25 - frames) <= 1
  # The transforms carry the labels and the parameters, windowed with the frames.
  window = audio_mesh.train_window(example, np.random.default_rng(0), window_frames=25, fps=25)
  assert window["flame"]["expression"].shape == (25, 50) and window["emotion"] == 1
  batch = audio_mesh.eval_batch([audio_mesh.whole_sequence(e, fps=25) for e in list(source)[:3]])
  assert batch["flame"]["pose"].shape[:2] == batch["vertices"].shape[:2]


def test_emotion_shows_in_the_upper_face_and_mouth_corners_and_speech_in_the_lips(raw_dir, built):
  data_dir, _ = built
  source = tfds.data_source("mead", data_dir=data_dir, split="test")
  upper = np.loadtxt(os.path.join(raw_dir, "regions/upper_face.txt"), dtype=int)
  lips = np.loadtxt(os.path.join(raw_dir, "regions/lips.txt"), dtype=int)

  def upper_offset_mm(key):
    e = next(e for e in source if e["key"] == key.encode())
    return 1000 * np.linalg.norm((e["vertices"] - e["template"])[:, upper].mean(0), axis=-1).mean()

  neutral = upper_offset_mm("M037_neutral_level_1_001")
  emotions = [e for e in mead.EMOTIONS if e not in ("neutral", "sad")]  # M037 sad 1: spoiled
  levels = [
    np.mean([upper_offset_mm(f"M037_{e}_level_{k}_001") for e in emotions]) for k in (1, 2, 3)
  ]
  print(f"upper-face offset over the clip (mm): neutral {neutral:.2f}, levels 1-3 {levels}")
  assert neutral < levels[0] < levels[1] < levels[2] and levels[2] > 3 * neutral
  lip_motion = [1000 * (e["vertices"][:, lips] - e["template"][lips]).std(0).mean() for e in source]
  assert min(lip_motion) > 0.2  # every clip talks


@pytest.mark.parametrize(
  "content, reason",
  [
    (b"PK\x03\x04 not a zip", "not a readable .npz"),
    (None, "non-finite"),
    ("frames", "jaw_pose has shape"),
    ("pickle", "not a readable .npz"),
  ],
)
def test_bad_parameter_files_are_one_line_errors_naming_the_file(tmp_path, content, reason):
  path = str(tmp_path / "clip.npz")
  good = {"shape": np.zeros(100), "expression": np.zeros((5, 50)), "jaw_pose": np.zeros((5, 3))}
  if content is None:
    good["expression"][2, 3] = np.nan
    np.savez(path, **good)
  elif content == "frames":
    np.savez(path, **{**good, "jaw_pose": np.zeros((4, 3))})
  elif content == "pickle":
    np.savez(path, **{**good, "shape": np.array([{"a": 1}], dtype=object)})
  else:
    (tmp_path / "clip.npz").write_bytes(content)
  with pytest.raises(common.InvalidExample) as raised:
    mead.read_parameters(path)
  message = str(raised.value)
  assert path in message and reason in message and "\n" not in message, message


def test_inspect_describes_the_nested_parameters(built):
  data_dir, _ = built
  report = mead.inspect(data_dir)
  assert report["features"]["flame"]["pose"].startswith("(None, 15) float32")
  assert report["splits"]["test"]["num_examples"] == 21
