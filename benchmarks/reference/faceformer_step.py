"""The reference FaceFormer's own training step, timed (runs in the reference's virtualenv).

    benchmarks/reference/.venv-faceformer/bin/python benchmarks/reference/faceformer_step.py \
      --source benchmarks/reference/FaceFormer --frames 60,120,300 --training autoregressive

Imports `Faceformer` from a checkout of EvelynFan/FaceFormer (`--source`, made by
`setup_faceformer.sh`) and runs the step its `main.py` trains with: `model(audio, template,
vertice, one_hot, criterion, teacher_forcing=...)` with `nn.MSELoss()`, `loss.backward()`,
`torch.optim.Adam(lr=1e-4)` over the parameters that require gradients, `zero_grad`. The model is
built with `main.py`'s VOCASET arguments (feature_dim 64, vertice_dim 5023*3, period 30, its eight
training subjects). The one change: `Wav2Vec2Model.from_pretrained("facebook/wav2vec2-base-960h")`
would download weights, so it is replaced by the same class built from `Wav2Vec2Config()` (the
wav2vec2-base sizes and training settings: layer drop 0.1, SpecAugment time masks p=0.05) with
random weights; the reference then freezes its conv stack as usual. Inputs are synthetic,
of VOCASET shapes: batch 1 (the reference's only batch size), `frames / 30` seconds of 16 kHz
audio and `frames` frames of 5023 x 3 vertices.

One JSON line per frame count on stdout: the median step time over `--steps` steps after
`--warmup` untimed ones (the first call is timed apart as `first_step_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TRAIN_SUBJECTS = (
  "FaceTalk_170728_03272_TA FaceTalk_170904_00128_TA FaceTalk_170725_00137_TA "
  "FaceTalk_170915_00223_TA FaceTalk_170811_03274_TA FaceTalk_170913_03279_TA "
  "FaceTalk_170904_03276_TA FaceTalk_170912_03278_TA"
)  # main.py's default --train_subjects
VERTICES = 5023
FPS = 30
SAMPLE_RATE = 16000


def build_model(source: str):
  import torch
  from transformers import Wav2Vec2Config

  sys.path.insert(0, source)
  import faceformer  # the reference's module

  def random_wav2vec2(cls, *args, **kwargs):
    return cls(Wav2Vec2Config())

  faceformer.Wav2Vec2Model.from_pretrained = classmethod(random_wav2vec2)
  args = argparse.Namespace(
    dataset="vocaset",
    feature_dim=64,
    vertice_dim=VERTICES * 3,
    period=30,
    device="cpu",
    train_subjects=TRAIN_SUBJECTS,
  )
  torch.manual_seed(0)
  return faceformer.Faceformer(args)


def time_steps(source: str, frames: int, training: str, steps: int, warmup: int) -> dict:
  import numpy as np
  import torch

  model = build_model(source).train()
  criterion = torch.nn.MSELoss()
  optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-4)
  rng = np.random.default_rng(0)
  samples = frames * SAMPLE_RATE // FPS
  audio = torch.tensor(rng.normal(size=(1, samples)), dtype=torch.float32)
  template = torch.tensor(rng.normal(0.0, 0.05, (1, VERTICES * 3)), dtype=torch.float32)
  motion = rng.normal(0.0, 0.002, (1, frames, VERTICES * 3))
  vertice = template[:, None] + torch.tensor(motion, dtype=torch.float32)
  one_hot = torch.nn.functional.one_hot(torch.tensor([0]), 8).float()
  teacher_forcing = training == "teacher_forcing"

  def step() -> float:
    loss = model(audio, template, vertice, one_hot, criterion, teacher_forcing=teacher_forcing)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()

  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup):
    step()
  load_before = os.getloadavg()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {
    "step_time_s": float(np.median(times)),
    "step_time_s_mean": float(np.mean(times)),
    "step_time_s_min": float(np.min(times)),
    "first_step_s": first,
    "load_average_before": [round(x, 2) for x in load_before],
    "load_average_after": [round(x, 2) for x in os.getloadavg()],
    "params_total": sum(p.numel() for p in model.parameters()),
    "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
  }


def source_commit(source: str) -> str | None:
  try:
    return subprocess.run(
      ["git", "-C", source, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", required=True, help="a checkout of EvelynFan/FaceFormer")
  parser.add_argument("--frames", default="60,120,300", help="comma-separated frame counts")
  parser.add_argument(
    "--training", default="teacher_forcing", choices=("teacher_forcing", "autoregressive")
  )
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.source, "faceformer.py")):
    sys.exit(f"{args.source}: no faceformer.py here (run benchmarks/reference/setup_faceformer.sh)")

  import torch
  import transformers

  for frames in (int(f) for f in args.frames.split(",")):
    figures = time_steps(args.source, frames, args.training, args.steps, args.warmup)
    line = {
      "framework": "reference",
      "reference": "EvelynFan/FaceFormer",
      "reference_commit": source_commit(args.source),
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "torch_threads": torch.get_num_threads(),
      "training": args.training,
      "batch_size": 1,
      "frames": frames,
      "audio_samples": frames * SAMPLE_RATE // FPS,
      "steps": args.steps,
      "warmup": args.warmup,
      **figures,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
