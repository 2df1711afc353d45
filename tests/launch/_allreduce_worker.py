"""A stand-alone multi-process JAX program for the launcher tests (not a test module itself).

Joins the run through `fdjax.distributed.initialize`, sums a global array whose shards come
from every process (the sum crosses processes over gloo), and writes what it saw to
`<out>/process_<i>.json`. Flags make one process slow to start, fail, or hang, so the tests can
check what the launchers do then.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fdjax import distributed


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--timeout-s", type=float, default=60)
  parser.add_argument("--delay-process", type=int, default=-1, help="sleeps before joining")
  parser.add_argument("--delay-s", type=float, default=0)
  parser.add_argument("--fail-process", type=int, default=-1, help="raises after the sum")
  parser.add_argument("--hang", action="store_true", help="others wait forever after the sum")
  args = parser.parse_args()

  process_id = int(os.environ.get(distributed.ENV_PROCESS_ID, os.environ.get("SLURM_PROCID", 0)))
  if process_id == args.delay_process:
    time.sleep(args.delay_s)
  distributed.initialize(args.timeout_s)

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  local = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)  # [L]
  values = jax.make_array_from_process_local_data(sharding, local)  # [D]
  total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(values))

  os.makedirs(args.out, exist_ok=True)
  result = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "local_devices": jax.local_device_count(),
    "global_devices": jax.device_count(),
    "total": total,
    "pid": os.getpid(),
  }
  with open(os.path.join(args.out, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)
  print("worker result", json.dumps(result), flush=True)
  if jax.process_index() == args.fail_process:
    raise RuntimeError(f"process {args.fail_process} fails on purpose")
  if args.hang:
    time.sleep(3600)
  return 0


if __name__ == "__main__":
  sys.exit(main())
