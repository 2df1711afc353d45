"""Motion diffusion sampling: seconds to sample 10 s of VOCASET motion, jit and exported artifact,
and the reference FaceDiffuser's own sampler on the same CPU. One JSON line per measurement.

    python benchmarks/diffusion_sampling.py                          # DDIM-50 and DDPM-1000
    python benchmarks/diffusion_sampling.py --models diffspeaker --small   # quick
    bash benchmarks/reference/setup_facediffuser.sh                  # once: the reference's venv
    python benchmarks/diffusion_sampling.py --frameworks jax reference --reference_steps 5

`jax`, per model of `--models`: `experiments/audio2mesh/vocaset.py:variant=diffspeaker`
(transformer denoiser, DDIM over 50 steps) and `variant=facediffuser` (GRU denoiser, ancestral
DDPM over all 1000 steps), wav2vec2-base encoder (`--small`: the tiny one), with random weights
(the zero-initialised output layer redrawn, so no product is trivially zero), batch 1, `--seconds`
of audio (10 s: 160000 samples, 300 mesh frames of 5023 x 3 vertices), seed 0, guidance scales
from the config (1, 1: the unguided loop). Timed, each after an ahead-of-time compile (timed apart
as `compile_s`), by the median of `--iters` calls taken in turn:

- `encoder_s`: the audio encoder alone (it runs once per sequence, outside the sampling loop);
- `loop_s`: the denoising loop alone (`DiffusionDecoder.generate` on the encoded features), and
  `loop_rtf` = loop_s / audio seconds (the target for DDIM-50: <= 0.1); with `--x_t_loop` also
  `loop_x_t_s`, the loop with the chain on x_t (`projected_sampling=False`);
- `jit_s`: the task's whole `predict` (encoder, then the loop) jitted in-process;
- `artifact_s`: the same function exported as `fdjax export` writes it (symbolic batch and audio
  length, weights embedded), deserialized and called with jax alone; `artifact_over_jit`.

`reference` (`reference/facediffuser_sample.py`, run in the virtualenv that
`reference/setup_facediffuser.sh` makes): uuembodiedsocialai/FaceDiffuser's own model and
1000-step `p_sample_loop` at its VOCASET configuration with random weights, which re-runs its
HuBERT encoder inside every step. `--reference_steps K` < 1000 times K steps and reports
`ddpm_s` = 1000 x the seconds per step (`extrapolated`: true); its line carries `jax_speedup`,
its ddpm_s over fdjax's facediffuser `jit_s` (both include the encoder), when both ran, and
`jax_cpu_speedup`, the same in CPU seconds. `--sampling_steps N` runs N steps in place of the
config's (on a loaded machine DDPM-1000 takes long): the jax line then adds
`published_steps_s` = encoder_s + loop_s x (config's steps / N), `extrapolated`: true, and the
speedups use it.

Each `NAME_s` has a `NAME_cpu_s` beside it: the CPU seconds of this process during the call
(all threads), a figure that load from other processes inflates less than the wall time; and
`loop_cpu_rtf` = loop_cpu_s / audio seconds. Every line has the machine (`hostinfo.machine`),
the load averages before and after, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fdjax import config as config_lib
from fdjax import export
from fdjax.tasks import load_task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import machine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(os.path.dirname(HERE), "experiments", "audio2mesh", "vocaset.py")


def random_params(config, task, model) -> dict:
  """Initialised parameters with every all-zero array (the output layers) redrawn."""
  rngs = {"params": jax.random.key(config.seed), "dropout": jax.random.key(config.seed + 1)}
  params = nn.meta.unbox(task.init_fn(model, rngs, task.dummy_batch(config, 1))["params"])
  rng = np.random.default_rng(config.seed)

  def redraw(p):
    p = np.asarray(p)
    return rng.normal(0.0, 0.02, p.shape).astype(p.dtype) if not p.any() else p

  return jax.tree.map(redraw, jax.device_get(params))


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _timed(calls: dict, iters: int) -> dict[str, float]:
  """Median seconds per call of each compiled call (`NAME_s`), and the median CPU seconds of
  this process during it (`NAME_cpu_s`, all threads: on a loaded machine the wall time of a
  quiet one is about this over the cores used), taken in turn so that load from other
  processes falls on all of them alike."""
  times = {name: [] for name in calls}
  cpu = {name: [] for name in calls}
  for _ in range(iters):
    for name, call in calls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  seconds = {f"{name}_s": float(np.median(t)) for name, t in times.items()}
  seconds.update({f"{name}_cpu_s": float(np.median(t)) for name, t in cpu.items()})
  return seconds


def run_jax(model_name: str, args) -> dict:
  spec = f"{CONFIG}:variant={model_name}" + (",encoder=tiny" if args.small else "")
  config = config_lib.load_config(spec, list(args.override))
  published_steps = config.model.decoder.sampling_steps
  if args.sampling_steps:
    config = config_lib.load_config(
      spec, [*args.override, f"--config.model.decoder.sampling_steps={args.sampling_steps}"]
    )
  if model_name == "facediffuser" and args.reference_width:
    # FaceDiffuser's VOCASET command sets --feature_dim 256 --gru_dim 256; fdjax's variant
    # trains at 128 on a CPU. Compared at the reference's own width.
    config = config.as_configdict()
    config.model.decoder.d_model = args.reference_width
    config = ml_collections.FrozenConfigDict(config)
  task = load_task(config.task)
  model = task.build_model(config)
  dec = config.model.decoder
  params = random_params(config, task, model)
  samples = round(args.seconds * config.data.sample_rate)
  frames = int(samples * config.data.fps // config.data.sample_rate)
  predict, specs = task.predict_fn(config, model)
  rng = np.random.default_rng(0)
  inputs = {
    "audio": rng.standard_normal((1, samples)).astype(np.float32),
    "template": rng.normal(0.0, 0.05, (1, model.decoder.num_vertices, 3)).astype(np.float32),
    "style": np.zeros(1, np.int32),
    "seed": np.zeros(1, np.int32),
    "audio_guidance_scale": np.full(1, dec.audio_guidance_scale, np.float32),
    "style_guidance_scale": np.full(1, dec.style_guidance_scale, np.float32),
  }
  scales = np.stack([inputs["audio_guidance_scale"], inputs["style_guidance_scale"]], axis=-1)

  def encode(params, audio):
    return model.apply(
      {"params": params}, audio, None, False, frames, None, method=lambda m, *a: m._encode(*a)
    )

  def loop(params, features, template, style, seed, scales, module=model):
    return module.apply(
      {"params": params},
      features,
      template,
      style,
      seed=seed,
      guidance_scales=scales,
      method=lambda m, *a, **k: m.decoder.generate(*a, **k)[0],
    )

  compile_s = {}

  def compiled(name, fn, *arguments, **named):
    start = time.perf_counter()
    out = jax.jit(fn).lower(*arguments, **named).compile()
    compile_s[name] = round(time.perf_counter() - start, 2)
    return out

  device_params = jax.device_put(params)
  encoder = compiled("encoder", encode, device_params, inputs["audio"])
  features = jax.block_until_ready(encoder(device_params, inputs["audio"]))
  loop_args = (inputs["template"], inputs["style"], inputs["seed"], scales)
  sampler = compiled("loop", loop, device_params, features, *loop_args)
  calls = {
    "encoder": lambda: encoder(device_params, inputs["audio"]),
    "loop": lambda: sampler(device_params, features, *loop_args),
  }
  if args.x_t_loop:
    # The same loop with the chain on x_t (two V*3-wide projections per step).
    on_x_t = model.clone(decoder=model.decoder.clone(projected_sampling=False))
    direct = compiled(
      "loop_x_t",
      lambda *a: loop(*a, module=on_x_t),
      device_params,
      features,
      *loop_args,
    )
    calls["loop_x_t"] = lambda: direct(device_params, features, *loop_args)
  whole = compiled("jit", predict, device_params, **inputs)
  with tempfile.TemporaryDirectory() as directory:
    constraints = list(task.symbolic_constraints(config))
    exported, weights = export.export_function(predict, specs, params, constraints=constraints)
    export.write_artifact(directory, {"predict": exported}, weights, constraints=constraints)
    artifact_bytes = os.path.getsize(os.path.join(directory, "model.jaxexport"))
    with open(os.path.join(directory, "model.jaxexport"), "rb") as f:
      deserialized = jax.export.deserialize(bytearray(f.read()))
  artifact = compiled("artifact", deserialized.call, **inputs)
  load_before = _load()
  calls["jit"] = lambda: whole(device_params, **inputs)
  calls["artifact"] = lambda: artifact(**inputs)
  seconds = _timed(calls, args.iters if dec.sampling_steps <= 100 else args.long_iters)
  np.testing.assert_allclose(
    np.asarray(artifact(**inputs)), np.asarray(whole(device_params, **inputs)), atol=1e-4
  )
  line = {
    "framework": "jax",
    "model": model_name,
    "encoder": config.model.encoder.variant,
    "decoder_variant": dec.variant,
    "method": dec.sampling_method,
    "steps": dec.sampling_steps,
    "guidance_scales": [dec.audio_guidance_scale, dec.style_guidance_scale],
    "batch_size": 1,
    "seconds": args.seconds,
    "frames": frames,
    "audio_samples": samples,
    "num_vertices": model.decoder.num_vertices,
    "denoiser_width": model.decoder.denoiser.d_model,
    "denoiser_params": int(sum(np.size(p) for p in jax.tree.leaves(params["decoder"]["denoiser"]))),
    **{k: round(v, 4) for k, v in seconds.items()},
    "loop_s_per_step": round(seconds["loop_s"] / dec.sampling_steps, 5),
    "loop_rtf": round(seconds["loop_s"] / args.seconds, 4),
    "loop_cpu_rtf": round(seconds["loop_cpu_s"] / args.seconds, 4),
    "rtf": round(seconds["jit_s"] / args.seconds, 4),
    "artifact_over_jit": round(seconds["artifact_s"] / seconds["jit_s"], 3),
    "artifact_mb": round(artifact_bytes / 1e6, 2),
    "compile_s": compile_s,
    "iters": args.iters if dec.sampling_steps <= 100 else args.long_iters,
    "load_average_before": load_before,
    "load_average_after": _load(),
    "jax_version": jax.__version__,
    "backend": jax.devices()[0].platform,
  }
  if dec.sampling_steps != published_steps:
    # The loop's cost is linear in its steps and the encoder runs once: the whole predict at
    # the published steps, estimated from the steps run.
    factor = published_steps / dec.sampling_steps
    for unit in ("s", "cpu_s"):
      estimate = seconds[f"encoder_{unit}"] + factor * seconds[f"loop_{unit}"]
      line[f"published_steps_{unit}"] = round(estimate, 3)
    line.update(published_steps=published_steps, extrapolated=True)
  return line


def run_reference(args) -> dict:
  """The reference FaceDiffuser's own sampler (`reference/facediffuser_sample.py`) in its venv."""
  if not os.path.isfile(args.reference_python):
    raise SystemExit(
      f"{args.reference_python}: no reference virtualenv; make it with bash benchmarks/"
      "reference/setup_facediffuser.sh (or pass --reference_python)"
    )
  command = [
    args.reference_python,
    os.path.join(HERE, "reference", "facediffuser_sample.py"),
    f"--source={args.reference_source}",
    f"--seconds={args.seconds}",
    f"--steps={args.reference_steps}",
  ]
  out = subprocess.run(command, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"the reference sampler failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
  command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
  common = {"benchmark": "diffusion_sampling", "overrides": list(args.override)}
  lines = []
  jax_lines = {}
  for framework in args.frameworks:
    if framework == "jax":
      figures = [run_jax(name, args) for name in args.models]
    else:
      figures = [run_reference(args)]
      if "facediffuser" in jax_lines:
        jax_line, reference = jax_lines["facediffuser"], figures[0]
        # fdjax's whole predict at DDPM-1000, measured or (--sampling_steps) estimated.
        wall = jax_line.get("published_steps_s", jax_line["jit_s"])
        cpu = jax_line.get("published_steps_cpu_s", jax_line["jit_cpu_s"])
        reference["jax_speedup"] = round(reference["ddpm_s"] / wall, 2)
        reference["jax_cpu_speedup"] = round(reference["ddpm_cpu_s"] / cpu, 2)
    for line in figures:
      line = {
        **common,
        **line,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
      }
      print(json.dumps(line), flush=True)
      if framework == "jax":
        jax_lines[line["model"]] = line
      lines.append(line)
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--frameworks",
    nargs="+",
    choices=("jax", "reference"),
    default=["jax"],
    help="jax: fdjax's sampler, jit and artifact; reference: FaceDiffuser's own in its venv",
  )
  parser.add_argument(
    "--models",
    nargs="+",
    choices=("diffspeaker", "facediffuser"),
    default=["diffspeaker", "facediffuser"],
    help="the vocaset.py variants: diffspeaker (DDIM-50), facediffuser (DDPM-1000)",
  )
  parser.add_argument("--small", action="store_true", help="tiny encoder (quick CPU runs)")
  parser.add_argument("--seconds", type=float, default=10.0, help="audio length, seconds")
  parser.add_argument(
    "--sampling_steps",
    type=int,
    default=0,
    help="steps to run instead of the config's (0); the line then also estimates the whole "
    "predict at the config's steps (published_steps_s: encoder + loop scaled, extrapolated)",
  )
  parser.add_argument(
    "--reference_width",
    type=int,
    default=256,
    help="facediffuser's GRU and embedding width (d_model): 256 is FaceDiffuser's own VOCASET "
    "setting, which its sampler runs with; 0 keeps the experiment's (128)",
  )
  parser.add_argument("--iters", type=int, default=3, help="timed calls per variant")
  parser.add_argument(
    "--long_iters", type=int, default=1, help="timed calls per variant above 100 sampling steps"
  )
  parser.add_argument(
    "--x_t_loop",
    action="store_true",
    help="also time the loop with the chain on x_t (projected_sampling=False) as loop_x_t_s",
  )
  parser.add_argument(
    "--reference_python",
    default=os.path.join(HERE, "reference", ".venv-facediffuser", "bin", "python"),
    help="the reference's virtualenv (benchmarks/reference/setup_facediffuser.sh makes it)",
  )
  parser.add_argument(
    "--reference_source",
    default=os.path.join(HERE, "reference", "FaceDiffuser"),
    help="a checkout of uuembodiedsocialai/FaceDiffuser",
  )
  parser.add_argument(
    "--reference_steps",
    type=int,
    default=1000,
    help="reference steps timed (below 1000: its DDPM-1000 time is extrapolated)",
  )
  parser.add_argument(
    "--override", action="append", default=[], help="--config.x=y overrides (every model)"
  )
  return parser.parse_args(argv)


if __name__ == "__main__":
  run(parse_args())
