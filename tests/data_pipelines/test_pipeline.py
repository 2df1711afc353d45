"""The Grain plumbing on a real built dataset: process slices and checkpointable iterators."""

import functools
import zlib

import numpy as np
import pytest

from data_pipelines import audio_mesh, pipeline
from data_pipelines.builders import vocaset as vocaset_builder
from data_pipelines.synthetic import vocaset as vocaset_synthetic


@pytest.fixture(scope="module")
def train_source(tmp_path_factory):
  root = tmp_path_factory.mktemp("vocaset")
  vocaset_synthetic.write(str(root / "raw"), size="tiny")
  vocaset_builder.build(str(root / "raw"), str(root / "tfds"))
  return pipeline.tfds_source("vocaset", str(root / "tfds"), "train")


def _key_id(example, rng):
  """The example's identity as a number (batches hold arrays only)."""
  key = example["key"]
  key = key.decode() if isinstance(key, bytes) else str(key)
  return {"key": np.int64(zlib.crc32(key.encode())), "noise": rng.normal(size=(2,))}


def _epoch_keys(source, process_index, process_count, batch_size):
  ds = pipeline.train_dataset(
    source,
    _key_id,
    batch_size=batch_size,
    seed=3,
    process_index=process_index,
    process_count=process_count,
  )
  per_process = batch_size // process_count
  batches = len(source) // process_count // per_process
  iterator = iter(ds)
  return [int(k) for _ in range(batches) for k in next(iterator)["key"]]


def test_two_processes_read_disjoint_slices_that_cover_the_split(train_source):
  all_keys = {int(_key_id(e, np.random.default_rng(0))["key"]) for e in train_source}
  assert len(all_keys) == len(train_source) == 16
  first = _epoch_keys(train_source, 0, 2, batch_size=4)
  second = _epoch_keys(train_source, 1, 2, batch_size=4)
  assert len(first) == len(second) == 8
  assert not set(first) & set(second)
  assert set(first) | set(second) == all_keys


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_yields_the_same_next_batches(train_source, num_workers):
  transform = functools.partial(audio_mesh.train_window, window_frames=10, fps=30.0)
  ds = pipeline.train_dataset(
    train_source, transform, batch_size=4, seed=0, num_workers=num_workers
  )
  original = iter(ds)
  for _ in range(3):
    next(original)
  state = original.get_state()
  expected = [next(original) for _ in range(3)]
  restored = iter(ds)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert expected[0]["vertices"].shape == (4, 10, 5023, 3)
  assert expected[0]["audio"].shape == (4, int(np.ceil(10 * 16000 / 30)))
