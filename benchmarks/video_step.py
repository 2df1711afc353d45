"""Training-step time, clips/s and MFU of the video expression models; one JSON line per size.

    python benchmarks/video_step.py                       # CLIP B/16 and tiny, clip_adapter
    python benchmarks/video_step.py --sizes base --batch 32 --steps 20    # on a GPU

Times the framework's own jitted train step (`fdjax.step.jit_train_step`: forward, backward,
optimizer update, frozen-parameter masking, state donation) of the `experiments/dfer/dfew.py`
config of `--variant` at each size: `base` is CLIP ViT-B/16 over `--frames` frames of 224x224
pixels (remat on, as the config sets it), `tiny` the CPU-sized CLIP (32x32 pixels). Batches are
random uint8 clips already on the devices, so the input pipeline is not measured. Reported:
the median step time over `--steps` steps after `--warmup` steps (the first compiles), clips/s
= batch / step time, model FLOPs per clip from `fdjax.tasks.dfer.flops_per_example` (the
analytic count documented there: matmul FLOPs of patch embedding, transformer blocks,
adapters/LoRA, projection and temporal head, training = 3x forward where gradients flow,
remat's recomputation not counted), achieved TFLOP/s, and MFU = achieved / (peak dense bf16
FLOP/s of the device x devices) where the peak is known (`fdjax.trainer.PEAK_FLOPS`; null on
CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_timing import add_step_arguments, common_fields, time_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "dfer", "dfew.py")


def benchmark(
  variant: str,
  size: str,
  frames: int,
  batch: int,
  steps: int,
  warmup: int,
  compute_dtype: str = "auto",
) -> dict:
  from fdjax import config as config_lib
  from fdjax import optim as optim_lib
  from fdjax.tasks import dfer

  config = config_lib.load_config(
    f"{CONFIG}:variant={variant},size={size},frames={frames}",
    [
      ("batch_size", batch),
      ("compilation_cache_dir", ""),
      ("precision.compute_dtype", compute_dtype),
    ],
  )

  def fill(host, rng):
    host["video"] = rng.integers(0, 256, host["video"].shape, dtype=host["video"].dtype)
    host["label"] = rng.integers(0, len(config.data.class_names), batch).astype("int32")

  def count(params):
    trainable, total = optim_lib.count_params(params, config.optim.freeze)
    return {"trainable_params": trainable, "total_params": total}

  model, counts, times, metrics = time_train_step(config, steps, warmup, fill, count)
  fields = common_fields(config, times, dfer.flops_per_example(config), metrics)
  return {
    "benchmark": "video_step",
    "model": f"CLIP {model.variant} {variant}" if config.model.kind == "clip" else variant,
    "size": size,
    "frames": frames,
    "image_size": dfer.image_size(model),
    **counts,
    **fields,
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="clip_adapter", help="dfew.py variant")
  parser.add_argument("--sizes", default="base,tiny", help="comma-separated: base, tiny")
  parser.add_argument("--batch", type=int, default=0, help="clips per step (0: 1 base, 8 tiny)")
  add_step_arguments(parser)
  args = parser.parse_args(argv)
  for size in args.sizes.split(","):
    batch = args.batch or (1 if size == "base" else 8)
    result = benchmark(
      args.variant, size, args.frames, batch, args.steps, args.warmup, args.compute_dtype
    )
    print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
