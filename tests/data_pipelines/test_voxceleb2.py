"""VoxCeleb2: synthetic twin -> TFDS build -> data source; speech drives the mouth, splits are
identity-disjoint, part maps line up with the frames, and bad clips are named (section 6)."""

import contextlib
import io
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest

from data_pipelines import cli, pipeline, prepare
from data_pipelines.builders import common, voxceleb2
from data_pipelines.ops import video as video_ops
from data_pipelines.synthetic import face_render
from data_pipelines.synthetic import voxceleb2 as vox_twin

FRAME_SIZE, MAX_FRAMES, WINDOWS = 32, 8, 2
CONFIG = f"voxceleb2/{FRAME_SIZE}px_{MAX_FRAMES}f_{WINDOWS}w"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vox_raw"))
  vox_twin.write(path, size="tiny", seed=0)
  return path


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  """The twin built as `fdjax data build voxceleb2 ... --windows_per_clip 2` builds it."""
  data_dir = str(tmp_path_factory.mktemp("vox_data"))
  args = ["build", "voxceleb2", "--raw", raw_dir, "--data_dir", data_dir]
  args += ["--frame_size", str(FRAME_SIZE), "--max_frames", str(MAX_FRAMES)]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main([*args, "--windows_per_clip", str(WINDOWS)]) == 0
  return data_dir, json.loads(printed.getvalue().strip().splitlines()[-1])["splits"]


def _clips(raw_dir):
  return [c for clips in voxceleb2.list_clips(raw_dir).values() for c in clips]


def _source(data_dir, split):
  return pipeline.tfds_source(CONFIG, data_dir, split)


def test_twin_writes_the_release_layout_with_parts_and_ground_truth(raw_dir):
  clips = _clips(raw_dir)
  assert len(clips) == 5 * 2  # 4 dev + 1 test identities, one video of two clips each
  for clip in clips:
    relative = os.path.relpath(clip.path, raw_dir)
    assert re.fullmatch(r"(dev|test)/mp4/id\d{5}/[\w-]{11}/\d{5}\.mp4", relative), relative
    frames = video_ops.decode_video(clip.path)
    with np.load(clip.parts_path) as archive:
      parts = archive["parts"]
    assert parts.dtype == np.uint8 and parts.shape == frames.shape[:3]
    with open(clip.path.removesuffix(".mp4") + ".json") as f:
      truth = json.load(f)
    assert truth["fps"] == 25 and truth["sample_rate"] == 16000 and truth["av_lag_frames"] == 0
    for key, shape in (("mouth_open", (len(frames),)), ("head_pose", (len(frames), 6))):
      assert np.shape(truth[key]) == shape
    audio = video_ops.decode_audio(clip.path)
    assert abs(len(audio) - len(frames) * 640) <= 640 + voxceleb2.AAC_FRAME


def test_speech_opens_the_mouth_by_a_talking_amount(raw_dir):
  loudness, opening = [], []
  for clip in _clips(raw_dir):
    with open(clip.path.removesuffix(".mp4") + ".json") as f:
      truth = json.load(f)
    audio = video_ops.decode_audio(clip.path)
    frames = len(truth["mouth_open"])
    audio = np.pad(audio, (0, frames * 640))[: frames * 640].reshape(frames, 640)
    loudness += np.log(np.sqrt((audio**2).mean(1)) + 1e-4).tolist()
    opening += truth["mouth_open"]
  opening = np.array(opening)
  assert np.corrcoef(loudness, opening)[0, 1] > 0.6
  # Wider than closed lips, narrower than a gasp (AU25 + AU26 at full: 0.17 head half-heights).
  assert 0.04 < opening.max() < 0.12 and np.mean(opening < 0.005) > 0.05


def test_splits_are_identity_disjoint_and_test_is_the_test_folder(raw_dir, built):
  data_dir, sizes = built
  assert sizes == {"train": 12, "validation": 4, "test": 4}  # two windows per clip
  identities = {
    split: {e["identity"].decode() for e in _source(data_dir, split)} for split in sizes
  }
  assert len(identities["train"]) == 3 and len(identities["validation"]) == 1
  assert not identities["train"] & identities["validation"]
  assert not identities["test"] & (identities["train"] | identities["validation"])
  assert identities["test"] == set(os.listdir(os.path.join(raw_dir, "test", "mp4")))


def test_examples_are_consecutive_frames_with_their_audio_and_parts(raw_dir, built):
  data_dir, _ = built
  paths = {c.clip_id: c for c in _clips(raw_dir)}
  source = _source(data_dir, "validation")
  for i in range(len(source)):
    example = source[i]
    clip = paths[example["clip_id"].decode()]
    start = int(example["start_frame"])
    assert example["key"].decode() == f"{clip.clip_id}@{start}"
    video, parts, audio = example["video"], example["face_parts"], example["audio"]
    assert video.shape == (MAX_FRAMES, FRAME_SIZE, FRAME_SIZE, 3) and video.dtype == np.uint8
    assert parts.shape == (MAX_FRAMES, FRAME_SIZE, FRAME_SIZE) and parts.dtype == np.uint8
    assert bool(example["has_face_parts"]) and float(example["fps"]) == 25.0
    assert audio.dtype == np.float32 and audio.shape == (MAX_FRAMES * 640,)
    frames = video_ops.decode_video(clip.path)
    assert int(example["num_frames"]) == len(frames)
    window = slice(start, start + MAX_FRAMES)
    np.testing.assert_array_equal(video, video_ops.center_crop(frames[window], FRAME_SIZE))
    np.testing.assert_array_equal(audio, video_ops.decode_audio(clip.path)[start * 640 :][:5120])
    with np.load(clip.parts_path) as archive:
      raw_parts = archive["parts"][window]
    np.testing.assert_array_equal(parts, voxceleb2.crop_parts(raw_parts, FRAME_SIZE, 1.0))


def test_part_maps_line_up_with_the_stored_frames(built):
  data_dir, _ = built
  examples = list(_source(data_dir, "train"))

  def lip_contrast(shift: int) -> float:
    """How much redder the mouth pixels are than the skin's, the maps moved `shift` rows."""
    colour = {}
    for part in (face_render.PART_SKIN, face_render.PART_MOUTH):
      pixels = [e["video"][np.roll(e["face_parts"], shift, axis=1) == part] for e in examples]
      colour[part] = np.concatenate(pixels).astype(float).mean(0)
    return float(np.subtract(*(colour[p][0] / colour[p][1] for p in sorted(colour)[::-1])))

  aligned = lip_contrast(0)
  assert aligned > 0.1  # lips are redder than the skin around them
  assert aligned > 1.5 * max(lip_contrast(-2), lip_contrast(2))  # and only where the map says


def _copy(raw_dir, tmp_path):
  copy = str(tmp_path / "raw")
  shutil.copytree(raw_dir, copy)
  return copy, voxceleb2.list_clips(copy)


def test_a_corrupt_mp4_fails_naming_the_file_or_is_skipped(raw_dir, tmp_path):
  copy, splits = _copy(raw_dir, tmp_path)
  bad = splits["train"][0]
  with open(bad.path, "r+b") as f:
    f.truncate(200)
  with pytest.raises(common.InvalidExample) as raised:
    voxceleb2.build(copy, str(tmp_path / "strict"), frame_size=16, max_frames=4)
  assert raised.value.path == bad.path and "\n" not in str(raised.value)
  # Without part maps (the real release) the examples say so and carry none.
  for clip in [c for clips in splits.values() for c in clips]:
    os.remove(clip.parts_path)
  sizes = voxceleb2.build(
    copy, str(tmp_path / "lenient"), skip_invalid=True, frame_size=16, max_frames=4
  )
  assert sizes == {"train": 5, "validation": 2, "test": 2}
  example = pipeline.tfds_source("voxceleb2/16px_4f", str(tmp_path / "lenient"), "test")[0]
  assert not example["has_face_parts"] and example["face_parts"].shape == (0, 16, 16)
  assert voxceleb2.inspect(str(tmp_path / "lenient"))["skipped"]["train"] == 1


def test_a_parts_map_of_the_wrong_shape_or_ids_is_named(raw_dir, tmp_path):
  clip = _clips(raw_dir)[0]
  frames = video_ops.decode_video(clip.path)
  copy = voxceleb2.Clip(str(tmp_path / "00001.mp4"), "train", "id1", "v", "00001")
  np.savez_compressed(copy.parts_path, parts=np.zeros((len(frames), 10, 10), np.uint8))
  with pytest.raises(common.InvalidExample, match=r"face-part map has shape") as raised:
    voxceleb2.read_parts(copy, frames.shape[:3])
  assert raised.value.path == copy.parts_path
  np.savez_compressed(copy.parts_path, parts=np.full(frames.shape[:3], 9, np.uint8))
  with pytest.raises(common.InvalidExample, match=r"face-part id 9"):
    voxceleb2.read_parts(copy, frames.shape[:3])


def test_cli_synth_build_inspect(tmp_path, capsys):
  raw, data_dir, png = str(tmp_path / "raw"), str(tmp_path / "data"), str(tmp_path / "vox.png")
  assert cli.main(["synth", "voxceleb2", "--out", raw, "--size", "tiny"]) == 0
  assert "wrote synthetic voxceleb2 (tiny)" in capsys.readouterr().out
  args = ["build", "voxceleb2", "--raw", raw, "--data_dir", data_dir]
  assert cli.main([*args, "--frame_size", "24", "--max_frames", "4"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["splits"] == {"train": 6, "validation": 2, "test": 2}
  assert cli.main(["inspect", "voxceleb2", "--data_dir", data_dir, "--out", png]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["face_parts"] == list(face_render.FACE_PARTS)
  assert report["splits"]["train"]["features"]["face_parts"] == [[4, 24, 24], "uint8"]
  assert report["splits"]["test"]["with_face_parts"] == 2
  with open(png, "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_a_task_opens_the_twin_built_on_first_use(tmp_path, monkeypatch):
  monkeypatch.setenv("FDJAX_DATA_ROOT", str(tmp_path))
  data = ml_collections.ConfigDict(
    {"name": "voxceleb2", "raw_dir": "", "data_dir": "", "synthetic": "tiny", "skip_invalid": False}
  )
  _, data_dir = prepare.ensure_dataset(data)
  assert data_dir.startswith(str(tmp_path))
  source = pipeline.tfds_source("voxceleb2", data_dir, "train")
  assert len(source) == 6 and source[0]["video"].shape[1:] == (128, 128, 3)


def test_the_design_doc_lists_the_part_ids_and_twin_sizes():
  with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "design.md")) as f:
    text = " ".join(f.read().split())
  assert ", ".join(face_render.FACE_PARTS) + " = 0..6" in text
  large = vox_twin.SIZES["large"]
  assert f"`large` ({large.dev_identities + large.test_identities} identities at 224 px)" in text
  assert large.side == 224
