"""`data` commands: write a synthetic twin, build a dataset, inspect a built dataset.

    data synth <dataset> --out RAW_DIR [--size tiny|demo|large] [--seed N]
    data build <dataset> --raw RAW_DIR --data_dir DIR [--skip_invalid]
        [--frame_size PIXELS] [--max_frames N]     (video datasets)
        [--windows_per_clip N] [--crop_fraction F]  (voxceleb2)
    data inspect <dataset> --data_dir DIR [--out PNG]

`fdjax data ...` hands its arguments to `main`. Datasets are found by import path, with no
registry to edit: `data_pipelines.synthetic.<dataset>.write(out_dir, size, seed)` and
`data_pipelines.builders.<dataset>.build(raw_dir, data_dir, skip_invalid)` /
`.inspect(data_dir, out_png)`; video builders also take `frame_size` and `max_frames` (the
stored frames; a size other than the default makes its own builder config, e.g. `256px_32f`,
which `config.data.builder_config` selects). A new dataset is a new builder module (and its twin).
Twins list their sizes in a module-level `SIZES` (or `_SIZES`) dict; every twin has `tiny` and
`demo`, some also `large`, and asking a twin for a size it lacks names the sizes it has.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import time
from types import ModuleType

from data_pipelines import builders, synthetic

_NOT_DATASETS = {"common"}  # shared helpers among the builder modules
_MODEL_TWINS = {"head_model"}  # synthetic stand-ins for model files: `synth` only, no builder
SIZES = ("tiny", "demo", "large")  # what `--size` accepts; each twin has some of them


def twin_sizes(module: ModuleType) -> list[str] | None:
  """The sizes a synthetic twin module writes (its `SIZES` or `_SIZES` keys), None if unlisted."""
  sizes = getattr(module, "SIZES", None) or getattr(module, "_SIZES", None)
  return sorted(sizes) if isinstance(sizes, dict) else None


def available_datasets() -> list[str]:
  """Builder modules under `data_pipelines/builders` (private and shared modules excluded)."""
  return sorted(
    m.name
    for m in pkgutil.iter_modules(builders.__path__)
    if not m.name.startswith("_") and m.name not in _NOT_DATASETS
  )


class UnknownDataset(ValueError):
  """The named dataset has no module of the kind a command needs."""


def _dataset_module(package: ModuleType, dataset: str, function: str) -> ModuleType:
  datasets = available_datasets()
  if package is synthetic:
    twins = {m.name for m in pkgutil.iter_modules(synthetic.__path__)}
    datasets = sorted([d for d in datasets if d in twins] + [m for m in _MODEL_TWINS if m in twins])
  if dataset not in datasets:
    kind = "synthetic twin" if package is synthetic else "dataset"
    raise UnknownDataset(f"unknown {kind} {dataset!r}; available: {', '.join(datasets) or 'none'}")
  module = importlib.import_module(f"{package.__name__}.{dataset}")
  if not callable(getattr(module, function, None)):
    raise UnknownDataset(f"{module.__name__} has no {function}() function")
  return module


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="data", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  synth = commands.add_parser("synth", help="write a synthetic twin in the raw on-disk layout")
  synth.add_argument("dataset")
  synth.add_argument("--out", required=True, help="raw directory to write")
  synth.add_argument("--size", default="tiny", choices=SIZES)
  synth.add_argument("--seed", type=int, default=0)
  build = commands.add_parser("build", help="build the TFDS (array_record) dataset")
  build.add_argument("dataset")
  build.add_argument("--raw", required=True, help="raw directory (the download or a twin)")
  build.add_argument("--data_dir", required=True, help="TFDS data directory to write")
  build.add_argument(
    "--skip_invalid", action="store_true", help="skip and count invalid examples (else fail)"
  )
  build.add_argument(
    "--frame_size", type=int, default=None, help="video datasets: stored frame side in pixels"
  )
  build.add_argument(
    "--max_frames", type=int, default=None, help="video datasets: frames kept per clip"
  )
  build.add_argument(
    "--windows_per_clip",
    type=int,
    default=None,
    help="voxceleb2: windows of max_frames frames taken from each clip",
  )
  build.add_argument(
    "--crop_fraction",
    type=float,
    default=None,
    help="voxceleb2: side of the centred square crop kept, share of the frame (0, 1]",
  )
  inspect = commands.add_parser("inspect", help="counts, shapes, statistics and a plot")
  inspect.add_argument("dataset")
  inspect.add_argument("--data_dir", required=True)
  inspect.add_argument("--out", default=None, help="PNG to write (mesh motion / frames)")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one `data` command; returns the process exit status."""
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  start = time.monotonic()
  try:
    module = _dataset_module(
      synthetic if args.command == "synth" else builders,
      args.dataset,
      {"synth": "write", "build": "build", "inspect": "inspect"}[args.command],
    )
  except UnknownDataset as e:
    print(f"data {args.command}: {e}", file=sys.stderr)
    return 2
  if args.command == "synth":
    sizes = twin_sizes(module)
    if sizes is not None and args.size not in sizes:
      print(
        f"data synth: the synthetic {args.dataset} twin has no size {args.size!r}; "
        f"its sizes: {', '.join(sizes)}",
        file=sys.stderr,
      )
      return 2
    module.write(args.out, size=args.size, seed=args.seed)
    print(
      f"wrote synthetic {args.dataset} ({args.size}) to {args.out} "
      f"in {time.monotonic() - start:.1f}s"
    )
  elif args.command == "build":
    video_options = {
      name: value
      for name, value in (
        ("frame_size", args.frame_size),
        ("max_frames", args.max_frames),
        ("windows_per_clip", args.windows_per_clip),
        ("crop_fraction", args.crop_fraction),
      )
      if value is not None
    }
    accepted = inspect.signature(module.build).parameters
    for name in video_options:
      if name not in accepted:
        kind = "video datasets" if name in ("frame_size", "max_frames") else "some video datasets"
        print(
          f"data build: --{name} applies to {kind}; {args.dataset} has no {name}",
          file=sys.stderr,
        )
        return 2
      value = video_options[name]
      if value <= 0 or (name == "crop_fraction" and value > 1):
        limits = "in (0, 1]" if name == "crop_fraction" else "positive"
        print(f"data build: --{name} must be {limits}, got {value}", file=sys.stderr)
        return 2
    sizes = module.build(args.raw, args.data_dir, skip_invalid=args.skip_invalid, **video_options)
    print(
      json.dumps(
        {"dataset": args.dataset, "splits": sizes, "seconds": round(time.monotonic() - start, 1)}
      )
    )
  else:
    print(json.dumps(module.inspect(args.data_dir, args.out), indent=2, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
