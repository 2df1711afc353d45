"""Grain input pipelines: from a random-access source to batches of numpy arrays.

Every dataset family (audio-mesh, video, the tests' toy task) feeds the trainer through the same
plumbing, following docs/design.md section 4:

    source -> seeded global shuffle -> slice by process -> repeat -> per-example transform
           -> batch of the per-process size -> worker processes and prefetch

The order of examples depends only on the seed and the process slice, never on the number of
workers, and the returned `grain.IterDataset` yields iterators whose state (`get_state` /
`set_state`) goes into checkpoints, so a resumed run sees exactly the batches an uninterrupted
run would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

Example = dict[str, Any]
Transform = Callable[[Example, np.random.Generator], Example]


def tfds_source(name: str, data_dir: str, split: str):
  """A random-access TFDS source (array_record) for `split` of dataset `name` in `data_dir`."""
  import tensorflow_datasets as tfds  # Imported here: importing TFDS is slow.

  return tfds.data_source(name, data_dir=data_dir, split=split)


def _check_per_process_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(
      f"batch_size={batch_size} (global) does not divide by the {process_count} processes"
    )
  return batch_size // process_count


def train_dataset(
  source: Sequence[Example] | grain.MapDataset,
  transform: Transform | None,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  shuffle: bool = True,
  batch_fn: Callable[[Sequence[Example]], Example] | None = None,
  prefetch_buffer_size: int = 4,
) -> grain.IterDataset:
  """An endless, reshuffled-every-epoch stream of per-process training batches.

  Args:
    source: random-access examples (a TFDS data source, a list, or a `grain.MapDataset`).
    transform: `transform(example, rng) -> example`, run per example with an rng derived from
      `seed` and the example's position in the stream (so augmentation is reproducible).
    batch_size: the *global* batch size; each process yields `batch_size / process_count`.
    seed: decides the shuffle order of every epoch and the per-example rngs.
    process_index, process_count: this process's slice of every epoch.
    num_workers: worker processes for the per-example work (0: in this process).
    shuffle: shuffle globally each epoch (off only for tests and debugging).
    batch_fn: how to collate a list of examples (default: stack every key).
    prefetch_buffer_size: batches read ahead per worker/thread.

  Returns:
    A `grain.IterDataset`; `iter()` of it is checkpointable.
  """
  per_process = _check_per_process_batch(batch_size, process_count)
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  if len(ds) < process_count:
    raise ValueError(f"the source has {len(ds)} examples, fewer than {process_count} processes")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Shuffled positions are sliced before repeating, so each epoch's permutation is split
  # disjointly between processes and every process sees a fresh permutation each epoch.
  ds = ds[process_index::process_count].repeat(None)
  if transform is not None:
    ds = ds.random_map(transform, seed=seed + 1)
  ds = ds.batch(per_process, drop_remainder=True, batch_fn=batch_fn)
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch_buffer_size)
  )
  if num_workers > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def _mark_flags_parsed() -> None:
  """Grain's workers read absl flags; outside `absl.app` nobody has parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def eval_dataset(
  source: Sequence[Example] | grain.MapDataset,
  transform: Callable[[Example], Example] | None,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  batch_fn: Callable[[Sequence[Example]], Example] | None = None,
) -> grain.IterDataset:
  """One pass over this process's slice of `source`, in order, batches of `batch_size`.

  The last batch may be smaller; `batch_size` is per process here, since evaluation runs over
  whole sequences and each process reports metrics over the examples it saw.
  """
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(batch_size, drop_remainder=False, batch_fn=batch_fn)
  return ds.to_iter_dataset()


def pad_to_longest(examples: Sequence[Example], pad_keys: Mapping[str, str]) -> Example:
  """Stacks examples into a batch, padding variable-length keys with zeros.

  Args:
    examples: dicts with the same keys.
    pad_keys: `{key: mask_key}`: each `key` is padded along its first axis to the longest in the
      batch, and a bool array `mask_key` of shape [B, L] marks the valid positions. Keys not
      named are stacked as they are (they must agree in shape).

  Returns:
    The batch dict.
  """
  batch: Example = {}
  for key in examples[0]:
    values = [np.asarray(e[key]) for e in examples]
    if key not in pad_keys:
      batch[key] = np.stack(values)
      continue
    longest = max(v.shape[0] for v in values)
    out = np.zeros((len(values), longest, *values[0].shape[1:]), dtype=values[0].dtype)
    mask = np.zeros((len(values), longest), dtype=bool)
    for i, v in enumerate(values):
      out[i, : v.shape[0]] = v
      mask[i, : v.shape[0]] = True
    batch[key] = out
    batch[pad_keys[key]] = mask
  return batch
