"""Launchers for multi-process runs: this host (`local`), SLURM (`slurm`), Kubernetes (`k8s`).

`fdjax launch <launcher> [options] -- <command>` reaches `launch_main`. Every launcher starts
the same command once per process and lets JAX's multi-controller runtime join them
(`fdjax.distributed.initialize`); none of them talks to the processes after the start.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

LAUNCHERS = ("local", "slurm", "k8s")


def launch_main(argv: Sequence[str]) -> int:
  """`fdjax launch local|slurm|k8s [options] -- command ...`; returns the exit status."""
  argv = list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(
      "usage: fdjax launch {local,slurm,k8s} [options] -- command ...\n"
      "  local: N processes on this host (fdjax launch local --help)\n"
      "  slurm: an sbatch job (fdjax launch slurm --help)\n"
      "  k8s:   a Kubernetes JobSet manifest (fdjax launch k8s --help)"
    )
    return 0 if argv else 2
  launcher, rest = argv[0], argv[1:]
  if launcher == "local":
    from launch import local

    return local.main(rest)
  if launcher == "slurm":
    from launch import slurm

    return slurm.main(rest)
  if launcher == "k8s":
    from launch import k8s

    return k8s.main(rest)
  print(f"fdjax launch: unknown launcher {launcher!r}; choose one of {LAUNCHERS}", file=sys.stderr)
  return 2
