"""Pretraining-step time, clips/s and MFU of the masked video autoencoder; one JSON line per size.

    python benchmarks/mae_step.py                                  # ViT-B and tiny, videomae
    python benchmarks/mae_step.py --sizes B --batch 32 --steps 20  # on a GPU

Times the framework's own jitted train step (`fdjax.trainer.build_train_step`: masks drawn on
device, encoder on the visible tokens, decoder, loss, backward, AdamW update, state donation) of
the `experiments/pretrain/voxceleb2.py` config of `--variant` at each size: `B` is ViT-B over
`--frames` frames of 224x224 pixels at 90% masking (remat on, as the config sets it), `tiny` the
CPU-sized model (32x32 pixels). Batches are random uint8 clips already on the devices (with
random face-part maps for `marlin`), so the input pipeline is not measured. Reported: the
median step time over `--steps` steps after `--warmup` steps (the first compiles), clips/s,
model FLOPs per clip from `fdjax.tasks.mae_video.flops_per_example` (matmul FLOPs of the
tubelet embedding, the encoder on the visible tokens, the decoder on all tokens and the heads;
training = 3x forward; remat's recomputation not counted), achieved TFLOP/s, and MFU =
achieved / (peak dense bf16 FLOP/s of the device x devices) where the peak is known
(`fdjax.trainer.PEAK_FLOPS`; null on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import cpu_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "pretrain", "voxceleb2.py")


def benchmark(
  variant: str, size: str, frames: int, batch: int, steps: int, warmup: int, compute_dtype: str
) -> dict:
  from fdjax import config as config_lib
  from fdjax import masking, trainer
  from fdjax import sharding as sharding_lib
  from fdjax import step as step_lib
  from fdjax.tasks import load_task, mae_video

  config = config_lib.load_config(
    f"{CONFIG}:variant={variant},size={size}",
    [
      ("batch_size", batch),
      ("data.num_frames", frames),
      ("compilation_cache_dir", ""),
      ("precision.compute_dtype", compute_dtype),
    ],
  )
  task = load_task(config.task)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  sharding_lib.check_batch_size(config.batch_size, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model, state, _, train_step = trainer.build_train_step(config, task, mesh, rules)
    total = sum(x.size for x in jax.tree.leaves(state.params))
    encoder = sum(x.size for x in jax.tree.leaves(state.params["encoder"]))
    rng = np.random.default_rng(0)
    host = task.dummy_batch(config, batch)
    host["video"] = rng.integers(0, 256, host["video"].shape, dtype=np.uint8)
    if "face_parts" in host:
      host["face_parts"] = rng.integers(0, 7, host["face_parts"].shape).astype(np.uint8)
    sharding = sharding_lib.batch_sharding(mesh, rules)
    device_batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
    times = []
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = train_step(state, device_batch)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - start)
  step_time = float(np.median(times))
  flops = mae_video.flops_per_example(config)
  achieved = flops * batch / step_time
  peak = trainer.peak_flops_per_device()
  grid = model.encoder.grid(frames)
  masked = masking.num_masked(config.mask.kind, grid, config.mask.ratio, tuple(config.mask.window))
  return {
    "benchmark": "mae_step",
    "model": f"VideoMAE {size} {variant}",
    "size": size,
    "frames": frames,
    "image_size": model.encoder.image_size,
    "mask": config.mask.kind,
    "tokens": int(np.prod(grid)),
    "visible_tokens": int(np.prod(grid)) - masked,
    "batch": batch,
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "compute_dtype": str(np.dtype(step_lib.resolve_compute_dtype(config.precision.compute_dtype))),
    "remat": bool(config.model.remat),
    "params": int(total),
    "encoder_params": int(encoder),
    "steps_timed": steps,
    "step_time_s": round(step_time, 4),
    "step_time_min_s": round(float(np.min(times)), 4),
    "clips_per_s": round(batch / step_time, 3),
    "flops_per_clip": flops,
    "achieved_tflops_per_s": round(achieved / 1e12, 4),
    "mfu": None if peak is None else round(achieved / (peak * jax.device_count()), 4),
    "loss": float(metrics["loss"]),
    "host": cpu_model(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="videomae", help="marlin, mae_dfer or videomae")
  parser.add_argument("--sizes", default="B,tiny", help="comma-separated: tiny, S, B, L")
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--batch", type=int, default=0, help="clips per step (0: 1, or 8 tiny)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
  parser.add_argument(
    "--compute_dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU/TPU)"
  )
  args = parser.parse_args(argv)
  for size in args.sizes.split(","):
    batch = args.batch or (8 if size == "tiny" else 1)
    result = benchmark(
      args.variant, size, args.frames, batch, args.steps, args.warmup, args.compute_dtype
    )
    print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
