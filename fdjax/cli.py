"""The `fdjax` command: train, eval, and the subcommands other modules implement.

    fdjax train --config experiments/audio2mesh/vocaset.py:variant=faceformer \
        --config.optim.lr=3e-4 --workdir runs/x
    fdjax eval --config ... --workdir runs/x [--step N] [--params raw|ema]
    fdjax data synth|build|inspect ...       (data_pipelines.cli)
    fdjax render ... / fdjax render avatar ... (fdjax.render)
    fdjax export ...                         (fdjax.export)
    fdjax launch local|slurm|k8s ...         (launch)
    fdjax sweep ... / fdjax sweep report DIR (fdjax.sweep)
    fdjax fit flame --meshes SEQ --out PARAMS.npz (fdjax.fit)
    fdjax stabilize --mesh_seq SEQ --out OUT --workdir W (fdjax.stabilize)
    fdjax eval-video --generated DIR [--real DIR] ... (fdjax.metrics.evaluate_video)
    fdjax generate --portrait IMG --audio WAV --workdir W --out clip.mp4 (fdjax.generate)

Subcommands are imported only when used, so `fdjax data ...` does not pay for JAX start-up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

USAGE = (
  "usage: fdjax {train,eval,data,render,export,serve,explain,launch,sweep,fit,stabilize,"
  "eval-video,generate} ...  (fdjax CMD --help)"
)

# Subcommands implemented elsewhere: name -> (module, function taking argv).
DELEGATED = {
  "data": ("data_pipelines.cli", "main"),
  "render": ("fdjax.render", "main"),
  "export": ("fdjax.export", "main"),
  "serve": ("fdjax.serve", "main"),
  "launch": ("launch", "launch_main"),
  "sweep": ("fdjax.sweep", "sweep_main"),
  "explain": ("fdjax.explain", "main"),
  "fit": ("fdjax.fit", "main"),
  "stabilize": ("fdjax.stabilize", "main"),
  "eval-video": ("fdjax.metrics.evaluate_video", "main"),
  "generate": ("fdjax.generate", "main"),
}


def _train_parser(prog: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=prog,
    description="Config overrides follow as --config.key.sub=value (type-checked).",
  )
  parser.add_argument(
    "--config",
    required=prog == "fdjax train",
    help="path/to/config.py[:key=value,...] (eval: defaults to <workdir>/config.json)",
  )
  parser.add_argument("--workdir", required=True, help="checkpoints, logs and config.json")
  return parser


def _parse(prog: str, argv: list[str], extra=None) -> tuple[argparse.Namespace, list[str]]:
  parser = _train_parser(prog)
  if extra:
    extra(parser)
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)}")
  return args, rest


def _prepare(args, overrides):
  """Loads the config, sets the workdir, joins the multi-process runtime if there is one."""
  from absl import flags

  from fdjax import config as config_lib
  from fdjax import distributed

  # Grain worker processes read absl flags; outside absl.app they must be marked parsed.
  flags.FLAGS.mark_as_parsed()
  if args.config is None:
    args.config = os.path.join(args.workdir, "config.json")
  config = config_lib.load_config(args.config, [*overrides, ("workdir", args.workdir)])
  distributed.initialize(config.distributed_timeout_s)
  return config


def train_main(argv: list[str]) -> int:
  args, overrides = _parse(
    "fdjax train",
    argv,
    lambda p: p.add_argument("--folds", default=None, help="cross-validation: all, or 1,2,3"),
  )
  config = _prepare(args, overrides)
  if args.folds:
    from fdjax import folds

    return folds.run_folds(config, args.workdir, args.folds)
  from fdjax import trainer
  from fdjax.checkpoint import CheckpointRestoreError

  try:
    result = trainer.train_and_evaluate(config, args.workdir)
  except (trainer.NonFiniteError, CheckpointRestoreError) as e:
    print(f"fdjax train: {e}", file=sys.stderr)
    return 1
  if result.preempted:
    print(f"fdjax train: preempted at step {result.step}; restart on the same workdir to resume")
  return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument(
    "--params",
    choices=("raw", "ema"),
    default=None,
    help="which parameters to evaluate (default: ema when the run keeps an EMA, else raw)",
  )


def eval_main(argv: list[str]) -> int:
  args, overrides = _parse("fdjax eval", argv, _eval_arguments)
  config = _prepare(args, overrides)
  from fdjax import trainer

  try:
    trainer.select_params(config, args.params)
  except ValueError as e:
    print(f"fdjax eval: {e}", file=sys.stderr)
    return 2
  metrics = trainer.evaluate_checkpoint(config, args.workdir, step=args.step, params=args.params)
  for name, value in metrics.items():
    print(f"{name}: {value}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "train":
    return train_main(rest)
  if command == "eval":
    return eval_main(rest)
  if command in DELEGATED:
    module_name, function = DELEGATED[command]
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name != module_name:
        raise
      print(f"fdjax {command}: not available in this installation ({e})", file=sys.stderr)
      return 2
    return int(getattr(module, function)(rest) or 0)
  print(f"fdjax: unknown command {command!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
