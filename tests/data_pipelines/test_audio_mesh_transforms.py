"""Audio-mesh transforms: aligned training windows, whole sequences, padded eval batches."""

import functools
import math

import numpy as np
import pytest

from data_pipelines import audio_mesh, pipeline

SR, FPS, V = 16000, 30, 4


def _example(num_frames, subject=2, audio_frames=None, offset=0.0):
  """Frame t's vertices all equal t + offset; each audio sample holds its own index."""
  audio_frames = num_frames if audio_frames is None else audio_frames
  template = np.full((V, 3), -1.0, np.float32)
  vertices = (np.arange(num_frames, dtype=np.float32)[:, None, None] + offset) * np.ones((V, 3))
  return {
    "audio": np.arange(math.ceil(audio_frames * SR / FPS), dtype=np.float32),
    "vertices": vertices.astype(np.float32),
    "template": template,
    "subject": np.int32(subject),
    "subject_name": b"someone",
    "sentence": np.int32(3),
    "key": b"someone_sentence03",
  }


def test_train_window_crops_frames_and_the_audio_under_them():
  rng = np.random.default_rng(0)
  out = audio_mesh.train_window(
    _example(40), rng, window_frames=10, fps=FPS, sample_rate=SR, normalize_audio=False
  )
  assert set(out) == {"audio", "audio_mask", "vertices", "template", "frame_mask", "subject"}
  start = int(out["vertices"][0, 0, 0])
  np.testing.assert_array_equal(out["vertices"][:, 0, 0], np.arange(start, start + 10))
  assert out["vertices"].shape == (10, V, 3) and out["vertices"].dtype == np.float32
  assert out["audio"].shape == out["audio_mask"].shape == (math.ceil(10 * SR / FPS),)
  assert out["audio"][0] == math.ceil(start * SR / FPS)  # the first sample of frame `start`
  assert out["audio_mask"].all() and out["frame_mask"].all()
  assert out["subject"].dtype == np.int32 and out["subject"] == 2


def _first_frame(seed):
  out = audio_mesh.train_window(
    _example(14), np.random.default_rng(seed), window_frames=10, fps=FPS
  )
  assert out["frame_mask"].all()
  return int(out["vertices"][0, 0, 0])


def test_train_window_starts_cover_every_position_and_follow_the_rng():
  firsts = [_first_frame(seed) for seed in range(100)]
  assert set(firsts) == {0, 1, 2, 3, 4}  # every start where 10 frames fit in 14
  assert firsts == [_first_frame(seed) for seed in range(100)]


def test_train_window_pads_short_sequences_with_template_and_masks():
  out = audio_mesh.train_window(
    _example(4), np.random.default_rng(0), window_frames=10, fps=FPS, normalize_audio=False
  )
  np.testing.assert_array_equal(out["frame_mask"], np.arange(10) < 4)
  np.testing.assert_array_equal(out["vertices"][:4, 0, 0], np.arange(4))
  assert np.all(out["vertices"][4:] == -1.0)  # the template
  valid = math.ceil(4 * SR / FPS)
  assert out["audio_mask"].sum() == valid and out["audio_mask"][:valid].all()
  assert np.all(out["audio"][valid:] == 0)


def test_audio_is_normalised_over_the_whole_sentence_before_cropping():
  example = _example(40)
  whole = audio_mesh.whole_sequence(example, fps=FPS)["audio"]
  assert abs(whole.mean()) < 1e-4 and whole.std() == pytest.approx(1.0, abs=1e-3)
  window = audio_mesh.train_window(example, np.random.default_rng(1), window_frames=10, fps=FPS)
  first = np.flatnonzero(np.isclose(whole, window["audio"][0], atol=1e-6))
  assert first.size == 1
  np.testing.assert_allclose(whole[first[0] : first[0] + window["audio"].shape[0]], window["audio"])


def test_whole_sequence_cuts_or_pads_audio_to_span_exactly_the_frames():
  longer = audio_mesh.whole_sequence(
    _example(30, audio_frames=30.6), fps=FPS, normalize_audio=False
  )
  assert longer["audio"].shape == (16000,) and longer["audio_mask"].all()
  shorter = audio_mesh.whole_sequence(
    _example(30, audio_frames=29.5), fps=FPS, normalize_audio=False
  )
  assert shorter["audio"].shape == (16000,)
  assert shorter["audio_mask"].sum() == math.ceil(29.5 * SR / FPS)
  assert shorter["frame_mask"].shape == (30,) and shorter["frame_mask"].all()
  assert "key" not in shorter


def test_eval_batch_pads_to_the_longest_and_keeps_masks():
  examples = [
    audio_mesh.whole_sequence(_example(12, subject=0), fps=FPS),
    audio_mesh.whole_sequence(_example(20, subject=-1, audio_frames=19.5), fps=FPS),
  ]
  batch = audio_mesh.eval_batch(examples)
  assert batch["vertices"].shape == (2, 20, V, 3)
  assert batch["audio"].shape == batch["audio_mask"].shape == (2, math.ceil(20 * SR / FPS))
  np.testing.assert_array_equal(batch["frame_mask"][0], np.arange(20) < 12)
  assert batch["frame_mask"][1].all()
  assert batch["audio_mask"][0].sum() == math.ceil(12 * SR / FPS)
  assert batch["audio_mask"][1].sum() == math.ceil(19.5 * SR / FPS)  # its own padding stays masked
  assert np.all(batch["vertices"][0, 12:] == -1.0)  # padded frames hold the template
  np.testing.assert_array_equal(batch["subject"], [0, -1])
  assert batch["template"].shape == (2, V, 3)


def test_train_and_eval_datasets_yield_dense_batches():
  source = [_example(n, subject=n % 3) for n in (8, 15, 22, 30, 31, 40)]
  train = pipeline.train_dataset(
    source,
    functools.partial(audio_mesh.train_window, window_frames=12, fps=FPS),
    batch_size=4,
    seed=0,
  )
  batch = next(iter(train))
  assert batch["vertices"].shape == (4, 12, V, 3) and batch["vertices"].dtype == np.float32
  assert batch["audio"].shape == (4, 6400) and batch["audio_mask"].dtype == bool
  assert batch["frame_mask"].shape == (4, 12) and batch["subject"].dtype == np.int32
  evaluation = pipeline.eval_dataset(
    source,
    functools.partial(audio_mesh.whole_sequence, fps=FPS),
    batch_size=4,
    batch_fn=audio_mesh.eval_batch,
  )
  batches = list(evaluation)
  assert [b["vertices"].shape[:2] for b in batches] == [(4, 30), (2, 40)]
  assert sum(int(b["frame_mask"].sum()) for b in batches) == 8 + 15 + 22 + 30 + 31 + 40
