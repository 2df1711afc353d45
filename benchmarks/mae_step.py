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
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_timing import add_step_arguments, common_fields, time_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "pretrain", "voxceleb2.py")


def benchmark(
  variant: str, size: str, frames: int, batch: int, steps: int, warmup: int, compute_dtype: str
) -> dict:
  import jax

  from fdjax import config as config_lib
  from fdjax import masking
  from fdjax.tasks import mae_video

  config = config_lib.load_config(
    f"{CONFIG}:variant={variant},size={size}",
    [
      ("batch_size", batch),
      ("data.num_frames", frames),
      ("compilation_cache_dir", ""),
      ("precision.compute_dtype", compute_dtype),
    ],
  )

  def fill(host, rng):
    host["video"] = rng.integers(0, 256, host["video"].shape, dtype=np.uint8)
    if "face_parts" in host:
      host["face_parts"] = rng.integers(0, 7, host["face_parts"].shape).astype(np.uint8)

  def count(params):
    return {
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "encoder_params": int(sum(x.size for x in jax.tree.leaves(params["encoder"]))),
    }

  model, counts, times, metrics = time_train_step(config, steps, warmup, fill, count)
  fields = common_fields(config, times, mae_video.flops_per_example(config), metrics)
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
    **counts,
    **fields,
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="videomae", help="marlin, mae_dfer or videomae")
  parser.add_argument("--sizes", default="B,tiny", help="comma-separated: tiny, S, B, L")
  parser.add_argument("--batch", type=int, default=0, help="clips per step (0: 1, or 8 tiny)")
  add_step_arguments(parser)
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
