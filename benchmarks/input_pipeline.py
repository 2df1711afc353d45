"""Input-pipeline throughput: training examples per second out of the Grain pipelines.

    python benchmarks/input_pipeline.py                       # every pipeline, 0/1/2 workers
    python benchmarks/input_pipeline.py --pipelines video_16x112 --workers 2 --num_batches 40

Measures the pipelines the trainer iterates (`data_pipelines/pipeline.py`, docs/design.md
section 4), from the TFDS array_record files to numpy batches, on the synthetic twins:

- `audio_mesh`: VOCASET layout, 1-second training windows (`fdjax.tasks.audio2mesh.train_data`
  on `experiments/audio2mesh/vocaset.py`, the trainer's own path): audio [B, 16000],
  vertices [B, 30, 5023, 3] float32, template, masks, subject;
- `video_16x112`, `video_16x224`: DFEW layout, the video training transform (`data_pipelines/
  video.py`: TSN-style sampling of 16 frames, random resized crop, flip, colour jitter) on clips
  stored at 128 and 256 pixels (the builders' 112- and 224-ready configs): video
  [B, 16, S, S, 3] uint8, label [B].

Each (pipeline, workers) pair prints one JSON line: examples/s over `--num_batches` batches
after `--warmup_batches` (worker start-up and first reads excluded), the CPU time per example
summed over this process and its worker processes (from /proc; what an idle machine's
throughput follows from: about min(workers, cores) / cpu_s_per_example, or 1 / cpu_s_per_example
with no workers), the load average before and after (other jobs on a shared machine slow the
wall-clock figure), the machine, the date and the command.

The twins are written and built on first use in the cache `fdjax train` uses for them
(`data_pipelines.prepare.default_dirs`; `--data_root` moves it), so built twins are reused:
VOCASET via `data_pipelines.prepare.ensure_dataset`, DFEW via its synthetic writer and builder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import machine  # noqa: E402

from data_pipelines import pipeline, prepare, video
from data_pipelines.builders import _video, dfew
from data_pipelines.synthetic import dfew as dfew_twin

PIPELINES = ("audio_mesh", "video_16x112", "video_16x224")
# Output side -> stored side of the DFEW build that feeds it (the builders' standard configs).
VIDEO_STORED_SIZE = {112: 128, 224: 256}


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of one process so far (0 if it is gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
  """Process ids of all descendants of `pid` (Grain workers and their helpers)."""
  parents: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    parents.setdefault(ppid, []).append(int(name))
  found, stack = [], [pid]
  while stack:
    for child in parents.get(stack.pop(), []):
      found.append(child)
      stack.append(child)
  return found


def process_tree_cpu_seconds() -> dict[int, float] | None:
  """CPU seconds per process of this process and its descendants, or None off Linux."""
  if not os.path.isdir("/proc/self"):
    return None
  pids = [os.getpid(), *_descendants(os.getpid())]
  return {pid: _cpu_seconds(pid) for pid in pids}


def cpu_used(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
  """CPU seconds spent between two snapshots (processes born in between count from zero)."""
  if before is None or after is None:
    return None
  return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


# ----------------------------------------------------------------------------------------------
# The datasets.


def vocaset_config(size: str, batch_size: int, workers: int):
  """The VOCASET experiment's config on its synthetic twin (in the cache `fdjax train` uses)."""
  from experiments.audio2mesh import vocaset

  config = vocaset.get_config("variant=faceformer")
  config.data.synthetic = size
  config.data.raw_dir = config.data.data_dir = ""  # the twin's cache directories
  config.data.num_workers = workers
  config.batch_size = batch_size
  return config


def dfew_source(size: str, stored_size: int, split: str = "fold1_train"):
  """A split of the DFEW twin stored at `stored_size` pixels, written and built if missing."""
  raw_dir, data_dir = prepare.default_dirs("dfew", size)
  config = _video.config_name(stored_size, _video.DEFAULT_MAX_FRAMES)
  if not os.path.isdir(raw_dir) or not os.listdir(raw_dir):
    print(f"writing the synthetic dfew twin ({size}) to {raw_dir}", file=sys.stderr, flush=True)
    dfew_twin.write(raw_dir, size=size, seed=0)
  try:
    _video.find_built("dfew", data_dir, config)
  except FileNotFoundError:
    print(f"building dfew/{config} into {data_dir}", file=sys.stderr, flush=True)
    dfew.build(raw_dir, data_dir, frame_size=stored_size)
  return _video.open_split("dfew", data_dir, split, config)


# ----------------------------------------------------------------------------------------------
# Measurement.


def measure(dataset, batch_size: int, num_batches: int, warmup_batches: int) -> dict:
  """Examples/s and CPU per example of `num_batches` batches after `warmup_batches`."""
  iterator = iter(dataset)
  for _ in range(warmup_batches):
    next(iterator)
  load_before = os.getloadavg()
  cpu_before = process_tree_cpu_seconds()
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  cpu = cpu_used(cpu_before, process_tree_cpu_seconds())
  load_after = os.getloadavg()
  examples = batch_size * num_batches
  shapes = {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in batch.items()}
  del batch  # releases the worker's shared memory before the workers stop
  iterator.close()  # stops the worker processes before the next configuration starts
  return {
    "examples_per_s": round(examples / elapsed, 2),
    "seconds": round(elapsed, 3),
    "cpu_ms_per_example": None if cpu is None else round(1e3 * cpu / examples, 3),
    "load_average_before": [round(x, 2) for x in load_before],
    "load_average_after": [round(x, 2) for x in load_after],
    "batch": shapes,
  }


def run(args: argparse.Namespace) -> list[dict]:
  if args.data_root:
    os.environ["FDJAX_DATA_ROOT"] = os.path.abspath(os.path.expanduser(args.data_root))
  command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
  results = []
  for name in args.pipelines:
    for workers in args.workers:
      if name == "audio_mesh":
        from fdjax.tasks import audio2mesh

        batch_size = args.audio_batch_size
        config = vocaset_config(args.vocaset_size, batch_size, workers)
        prepare.ensure_dataset(config.data)
        dataset = audio2mesh.train_data(config, process_index=0, process_count=1)
        extra = {"dataset": f"vocaset synthetic twin ({args.vocaset_size}), train split"}
      else:
        image_size = int(name.rsplit("x", 1)[1])
        batch_size = args.video_batch_size
        stored = VIDEO_STORED_SIZE[image_size]
        source = dfew_source(args.dfew_size, stored)
        transform = video.make_train_transform(num_frames=16, image_size=image_size)
        dataset = pipeline.train_dataset(
          source, transform, batch_size=batch_size, seed=0, num_workers=workers
        )
        stored_frames = np.mean([len(source[i]["video"]) for i in range(min(len(source), 64))])
        extra = {
          "dataset": f"dfew synthetic twin ({args.dfew_size}), fold1_train, {len(source)} clips "
          f"stored at {stored} px, {stored_frames:.1f} stored frames per clip on average (the "
          f"real DFEW: {_video.DEFAULT_MAX_FRAMES})"
        }
      figures = measure(dataset, batch_size, args.num_batches, args.warmup_batches)
      line = {
        "benchmark": "input_pipeline",
        "pipeline": name,
        "workers": workers,
        "examples_per_s": figures.pop("examples_per_s"),
        "batch_size": batch_size,
        "num_batches": args.num_batches,
        **figures,
        **extra,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
      }
      print(json.dumps(line), flush=True)
      results.append(line)
  return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
  parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument(
    "--data_root",
    default="",
    help="where the synthetic twins are cached (default: $FDJAX_DATA_ROOT, else "
    "~/.cache/fdjax/datasets: the twins `fdjax train` builds are reused)",
  )
  parser.add_argument("--vocaset_size", default="demo", choices=("tiny", "demo"))
  parser.add_argument("--dfew_size", default="tiny", choices=("tiny", "demo"))
  parser.add_argument("--audio_batch_size", type=int, default=8, help="the experiment's batch")
  parser.add_argument("--video_batch_size", type=int, default=32)
  parser.add_argument("--num_batches", type=int, default=20)
  parser.add_argument("--warmup_batches", type=int, default=3)
  return parser.parse_args(argv)


if __name__ == "__main__":
  run(parse_args())
