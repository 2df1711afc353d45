"""The reference FaceDiffuser's own sampler, timed (runs in the reference's virtualenv).

    /work/venvs/facediffuser/bin/python benchmarks/reference/facediffuser_sample.py \
      --source benchmarks/reference/FaceDiffuser --seconds 10 --steps 1000

Imports `FaceDiff` from a checkout of uuembodiedsocialai/FaceDiffuser (`--source`, made by
`setup_facediffuser.sh`) and runs what its `predict.py` runs for VOCASET: `FaceDiff(args,
vertice_dim=15069, latent_dim=256, diffusion_steps=1000, gru_latent_dim=256, num_layers=2)` (its
README's VOCASET command: --feature_dim 256 --gru_dim 256 --diff_steps 1000, its eight training
subjects), in eval mode, and `diffusion.p_sample_loop(model, (1, frames, 15069),
clip_denoised=False, model_kwargs={cond_embed, one_hot, template})` of the `SpacedDiffusion`
that its `utils.create_gaussian_diffusion` builds (cosine betas over 1000 steps, x0 predicted,
fixed-small variance, no respacing; built here with the same arguments, because importing
utils.py reads a data pickle and matplotlib). Its model runs the HuBERT encoder inside every
denoising step, as the reference does. The one change: `HubertModel.from_pretrained(
"facebook/hubert-base-ls960")` would download weights, so it is replaced by the same class built
from the vendored `HubertConfig()` (the hubert-base sizes) with random weights. Inputs are
synthetic: `--seconds` of standard-normal 16 kHz audio (what the reference's processor output
looks like: zero mean, unit variance) and a template of VOCASET's shape; frames are
`int(samples / 16000 * 30) - 1`, as predict.py counts them.

`--steps K` below 1000 runs the last K steps of the chain (the loop's `skip_timesteps`); every
step calls the same model on the same shapes, so `seconds_per_step * 1000` estimates the whole
loop (`ddpm_s` is then marked `extrapolated`). A one-step loop runs first, untimed
(`first_step_s`). One JSON line on stdout.
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
)  # the README's VOCASET --train_subjects
VERTICE_DIM = 5023 * 3
FEATURE_DIM = 256  # --feature_dim (VOCASET)
GRU_DIM = 256  # --gru_dim (VOCASET)
DIFF_STEPS = 1000  # --diff_steps (VOCASET)
SAMPLE_RATE = 16000
FPS = 30


def build(source: str):
  """The reference model (random HuBERT weights) and its Gaussian diffusion."""
  import torch

  sys.path.insert(0, source)
  import models  # the reference's modules
  from diffusion import gaussian_diffusion as gd
  from diffusion.respace import SpacedDiffusion, space_timesteps
  from hubert.configuration_hubert import HubertConfig

  def random_hubert(cls, *args, **kwargs):
    return cls(HubertConfig())

  models.HubertModel.from_pretrained = classmethod(random_hubert)
  args = argparse.Namespace(
    input_fps=50,
    output_fps=FPS,
    diff_steps=DIFF_STEPS,
    device="cpu",
    train_subjects=TRAIN_SUBJECTS,
  )
  torch.manual_seed(0)
  model = models.FaceDiff(
    args,
    vertice_dim=VERTICE_DIM,
    latent_dim=FEATURE_DIM,
    diffusion_steps=DIFF_STEPS,
    gru_latent_dim=GRU_DIM,
    num_layers=2,
  ).eval()
  # utils.create_gaussian_diffusion's arguments.
  diffusion = SpacedDiffusion(
    use_timesteps=space_timesteps(DIFF_STEPS, [DIFF_STEPS]),
    betas=gd.get_named_beta_schedule("cosine", DIFF_STEPS, 1.0),
    model_mean_type=gd.ModelMeanType.START_X,
    model_var_type=gd.ModelVarType.FIXED_SMALL,
    loss_type=gd.LossType.MSE,
    rescale_timesteps=False,
  )
  return model, diffusion


def time_sampling(source: str, seconds: float, steps: int) -> dict:
  import numpy as np
  import torch

  model, diffusion = build(source)
  samples = int(seconds * SAMPLE_RATE)
  rng = np.random.default_rng(0)
  audio = torch.tensor(rng.standard_normal((1, samples)), dtype=torch.float32)
  template = torch.tensor(rng.normal(0.0, 0.05, (1, VERTICE_DIM)), dtype=torch.float32)
  one_hot = torch.nn.functional.one_hot(torch.tensor([0]), 8).float()
  frames = int(samples / SAMPLE_RATE * FPS) - 1  # predict.py's count

  def loop(steps: int):
    with torch.no_grad():
      return diffusion.p_sample_loop(
        model,
        (1, frames, VERTICE_DIM),
        clip_denoised=False,
        model_kwargs={"cond_embed": audio, "one_hot": one_hot, "template": template},
        skip_timesteps=DIFF_STEPS - steps,
        progress=False,
        device="cpu",
      )

  start = time.perf_counter()
  loop(1)  # warm-up: the first call's one-time costs
  first = time.perf_counter() - start
  load_before = os.getloadavg()
  start, start_cpu = time.perf_counter(), time.process_time()
  prediction = loop(steps)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
  assert tuple(prediction.shape) == (1, frames, VERTICE_DIM), prediction.shape
  per_step = elapsed / steps
  return {
    "frames": frames,
    "audio_samples": samples,
    "steps_run": steps,
    "loop_s": elapsed,
    "seconds_per_step": per_step,
    "ddpm_s": per_step * DIFF_STEPS,
    # CPU seconds of this process (all threads): less inflated by other jobs than wall time.
    "loop_cpu_s": cpu,
    "ddpm_cpu_s": cpu / steps * DIFF_STEPS,
    "extrapolated": steps < DIFF_STEPS,
    "first_step_s": first,
    "load_average_before": [round(x, 2) for x in load_before],
    "load_average_after": [round(x, 2) for x in os.getloadavg()],
    "params_total": sum(p.numel() for p in model.parameters()),
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
  parser.add_argument("--source", required=True, help="a checkout of the reference FaceDiffuser")
  parser.add_argument("--seconds", type=float, default=10.0, help="audio length")
  parser.add_argument(
    "--steps", type=int, default=DIFF_STEPS, help="denoising steps run (of the 1000)"
  )
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.source, "models.py")):
    sys.exit(f"{args.source}: no models.py here (run benchmarks/reference/setup_facediffuser.sh)")
  if not 1 <= args.steps <= DIFF_STEPS:
    sys.exit(f"--steps={args.steps}: must be in [1, {DIFF_STEPS}]")

  import torch
  import transformers

  line = {
    "framework": "reference",
    "reference": "uuembodiedsocialai/FaceDiffuser",
    "reference_commit": source_commit(args.source),
    "torch_version": torch.__version__,
    "transformers_version": transformers.__version__,
    "torch_threads": torch.get_num_threads(),
    "method": "ddpm",
    "steps": DIFF_STEPS,
    "batch_size": 1,
    "seconds": args.seconds,
    **time_sampling(args.source, args.seconds, args.steps),
  }
  print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
