"""Audio2mesh training step: step time, frames/s and MFU, and the PyTorch reference beside it.

    python benchmarks/audio2mesh_step.py                          # wav2vec2-base + FaceFormer
    python benchmarks/audio2mesh_step.py --small --steps 3        # tiny encoder, quick on a CPU
    python benchmarks/audio2mesh_step.py --frameworks jax --check_flops
    bash benchmarks/reference/setup_faceformer.sh                 # once: the reference's venv
    python benchmarks/audio2mesh_step.py --batch_size 1 --frames 60,120,300,600 \
      --frameworks jax reference --training autoregressive       # the reference's configuration

`--frames` times whole sequences of each length (one sequence per example) instead of the
config's one-second windows; with `--batch_size 1` this is the reference's own configuration.
`--training` sets the FaceFormer decoder's training mode (teacher_forcing, autoregressive,
scheduled_sampling) on the JAX side and, for `reference`, the reference's `teacher_forcing`
argument.

`reference`: EvelynFan/FaceFormer's own `Faceformer` module and training step
(`reference/faceformer_step.py`, run as a subprocess in the virtualenv that
`reference/setup_faceformer.sh` makes: transformers 4.6.1 as the reference pins it), with a
randomly initialised wav2vec2-base in place of the pretrained download; batch 1 only. Its
differences from the JAX step are the reference's own: MSE on vertices only (no velocity
term), no gradient clipping, layer drop 0.1 that skips layers (the JAX step computes a
dropped layer and discards it), constant learning rate.

`jax`: the trainer's own step (`fdjax.step.jit_train_step` on `fdjax.state.create_train_state`,
a mesh of all devices, the task's loss from `fdjax.tasks.task_loss_fn`, the experiment's
optimizer and frozen parameters) for `experiments/audio2mesh/vocaset.py:variant=faceformer`
with random weights, on synthetic in-memory batches of VOCASET shapes: `--batch_size`
1-second windows (16000 samples of 16 kHz audio, 30 frames of 5023 x 3 vertices). It reports
the median step time over `--steps` timed steps after `--warmup` (the first call, which
compiles, is timed apart as `compile_s`), mesh frames and examples per second, and MFU:
`fdjax.tasks.audio2mesh.flops_per_example` x batch / step time / (peak x devices), with the
peak from `fdjax.trainer.PEAK_FLOPS`. On a CPU no peak is defined: `mfu` is null and
`achieved_flops_per_s` is the figure. `--check_flops` also counts the matmul and convolution
FLOPs in the lowered step itself (StableHLO, encoder layers unrolled) as
`hlo_matmul_flops_per_example`, to check the analytic count against the model.

`torch`: a re-implementation, in current `transformers`, of the PyTorch path the reference
implementation (FaceFormer) trains: `transformers`'
`Wav2Vec2Model` of the same sizes (its conv stack frozen where the config freezes it, as for
wav2vec2-base), its CNN features linearly interpolated to the mesh frames before the feature
projection and transformer, then a FaceFormer decoder (`torch.nn.TransformerDecoder`, periodic
positional encoding, ALiBi-style causal bias, alignment memory mask, style embedding,
zero-initialised output), teacher-forced; the same loss (vertex + velocity MSE in mm),
global-norm clipping at the config's `clip_norm`, Adam; forward + backward + update per step,
float32. Its layer drop is off: the JAX step computes every layer (and selects), so a
layer-dropping torch step would do about a tenth less work.

One JSON line per framework; the torch line carries `jax_speedup` (torch step time / JAX step
time) when both ran. `compile_s` is the first call, compilation included (the config's
persistent compilation cache, when warm, makes it short).

FLOP count (`flops_per_example`'s docstring has the rules): for the default configuration one
training window costs 21.49 GFLOP: the forward is 10.46 (conv stack 4.90, feature projection
0.02, positional conv 0.28, transformer 5.13, decoder 0.12); the frozen conv stack counts once,
the feature projection and the motion embedding (inputs that are data) twice, the rest three
times. The StableHLO count of the lowered step is 21.53 GFLOP: within 0.3 %, the rest being the
loss's reductions over vertices (lowered as dots) and the one extra frame the even-sized
positional conv computes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import machine  # noqa: E402

from fdjax import config as config_lib
from fdjax import optim as optim_lib
from fdjax import sharding as sharding_lib
from fdjax import step as step_lib
from fdjax import trainer
from fdjax.tasks import load_task

DEFAULT_CONFIG = "experiments/audio2mesh/vocaset.py:variant=faceformer"
MM_PER_METRE = 1000.0


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the task's shapes with plausible values: normalised audio, small motion."""
  rng = np.random.default_rng(seed)
  task = load_task(config.task)
  batch = task.dummy_batch(config, batch_size)
  template = rng.normal(0.0, 0.05, batch["template"].shape).astype(np.float32)  # [B, V, 3]
  motion = rng.normal(0.0, 0.002, batch["vertices"].shape).astype(np.float32)  # [B, T, V, 3]
  batch.update(
    audio=rng.normal(size=batch["audio"].shape).astype(np.float32),
    template=template,
    vertices=template[:, None] + motion,
    subject=rng.integers(0, config.model.decoder.num_styles, batch_size).astype(np.int32),
  )
  return batch


def timed_steps(run_step, steps: int, warmup: int) -> dict:
  """Times the first call (compilation) apart, then `warmup` calls, then `steps` timed ones."""
  start = time.perf_counter()
  run_step()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    run_step()
  load_before = os.getloadavg()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  return {
    "step_time_s": float(np.median(times)),
    "step_time_s_mean": float(np.mean(times)),
    "step_time_s_min": float(np.min(times)),
    "compile_s": compile_s,
    "load_average_before": [round(x, 2) for x in load_before],
    "load_average_after": [round(x, 2) for x in os.getloadavg()],
  }


# ----------------------------------------------------------------------------------------------
# JAX: the trainer's step.


def hlo_matmul_flops(text: str) -> float:
  """FLOPs of the dot_general and convolution ops in StableHLO text (2 per multiply-add).

  Calls into private functions are followed; loop bodies are counted once, so lower with
  unrolled layers. An lhs-dilated convolution (the input gradient of a strided one) is
  counted without the multiplications by the zeros the dilation inserts.
  """
  tensor = re.compile(r"tensor<((?:\d+x)*)[a-z]+\d*>")

  def shape(type_text: str) -> list[int]:
    return [int(d) for d in tensor.search(type_text).group(1).split("x") if d]

  functions: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    match = re.match(r"\s*func\.func (?:public |private )?@([\w.\-]+)", line)
    if match:
      current = match.group(1)
      functions[current] = []
    elif current:
      functions[current].append(line)
  memo: dict[str, float] = {}

  def count(name: str) -> float:
    if name in memo:
      return memo[name]
    total = 0.0
    for line in functions[name]:
      if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
        operands, result = line.rsplit(":", 1)[1].split("->")
        lhs, rhs = (shape(t.group(0)) for t in list(tensor.finditer(operands))[:2])
        out = math.prod(shape(result))
        if "dot_general" in line:
          contracting = re.search(r"contracting_dims = \[([\d, ]*)\] x", line).group(1)
          total += 2 * out * math.prod(lhs[int(i)] for i in contracting.split(",") if i.strip())
        else:
          labels = re.search(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]", line).group(1)
          out_features = rhs[labels.replace(" ", "").split(",").index("o")]
          dilation = re.search(r"lhs_dilate = \[([\d, ]*)\]", line)
          dilation = math.prod(int(d) for d in dilation.group(1).split(",")) if dilation else 1
          total += 2 * out * math.prod(rhs) / out_features / dilation
      for callee in re.findall(r"call @([\w.\-]+)", line):
        total += count(callee)
    memo[name] = total
    return total

  return count("main")


def _build_step(config):
  """(state, jitted step, mesh, rules) as `fdjax.trainer` builds them."""
  task = load_task(config.task)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  sharding_lib.check_batch_size(config.batch_size, mesh, rules, config.grad_accum_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, state, _, step = trainer.build_train_step(config, task, mesh, rules)
  return state, step, mesh, rules


def run_jax(config, args) -> dict:
  trainer.setup_jax(config)
  task = load_task(config.task)
  state, step, mesh, rules = _build_step(config)
  trainable, total = optim_lib.count_params(state.params, config.optim.freeze)
  sharding = sharding_lib.batch_sharding(mesh, rules)
  batch = {
    k: jax.make_array_from_process_local_data(sharding, v)
    for k, v in synthetic_batch(config, config.batch_size).items()
  }
  holder = {"state": state}

  def run_step():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      holder["state"], metrics = step(holder["state"], batch)
    # One scalar read per step, as the trainer does.
    float(jax.device_get(metrics["loss"]))

  figures = timed_steps(run_step, args.steps, args.warmup)
  flops = task.flops_per_example(config)
  achieved = flops * config.batch_size / figures["step_time_s"]
  peak = trainer.peak_flops_per_device()
  line = {
    "framework": "jax",
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "compute_dtype": np.dtype(step_lib.resolve_compute_dtype(config.precision.compute_dtype)).name,
    "params_total": total,
    "params_trainable": trainable,
    "flops_per_example": flops,
    "achieved_flops_per_s": achieved,
    "peak_flops_per_device": peak,
    "mfu": achieved / (peak * jax.device_count()) if peak else None,
    **figures,
  }
  if args.check_flops:
    line["hlo_matmul_flops_per_example"] = hlo_flops_per_example(config)
  return line


def hlo_flops_per_example(config) -> float:
  """Matmul/conv FLOPs of the lowered step (unrolled encoder layers) per example."""
  unrolled = ml_collections.ConfigDict(config.to_dict())
  unrolled.model.encoder.scan_layers = False
  task = load_task(unrolled.task)
  state, step, mesh, rules = _build_step(unrolled)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    text = step.lower(state, task.dummy_batch(unrolled, unrolled.batch_size)).as_text()
  return hlo_matmul_flops(text) / unrolled.batch_size


# ----------------------------------------------------------------------------------------------
# PyTorch: the reference implementation's path.


def run_torch(config, args) -> dict:
  import torch
  import transformers

  from fdjax.models import motion_decoders

  torch.manual_seed(config.seed)
  task = load_task(config.task)
  model = task.build_model(config)
  enc, dec = model.encoder, model.decoder
  frames = config.data.window_frames
  # The conv stack is frozen where the config freezes it (FaceFormer's setting with wav2vec2-base).
  frozen_conv_stack = any(
    re.search(pattern, "encoder/feature_extractor/conv_layers_0/conv/kernel")
    for pattern in config.optim.freeze
  )
  hf_config = transformers.Wav2Vec2Config(
    conv_dim=list(enc.conv_dim),
    conv_kernel=list(enc.conv_kernel),
    conv_stride=list(enc.conv_stride),
    conv_bias=enc.conv_bias,
    feat_extract_norm=enc.feat_extract_norm,
    hidden_size=enc.hidden_size,
    num_hidden_layers=enc.num_hidden_layers,
    num_attention_heads=enc.num_attention_heads,
    intermediate_size=enc.intermediate_size,
    num_conv_pos_embeddings=enc.num_conv_pos_embeddings,
    num_conv_pos_embedding_groups=enc.num_conv_pos_embedding_groups,
    do_stable_layer_norm=enc.do_stable_layer_norm,
    layerdrop=0.0,
  )

  class FaceFormer(torch.nn.Module):
    """wav2vec2 (HF) + FaceFormer decoder, teacher-forced, as the reference trains it."""

    def __init__(self):
      super().__init__()
      self.audio_encoder = transformers.Wav2Vec2Model(hf_config)
      if frozen_conv_stack:
        self.audio_encoder.feature_extractor._freeze_parameters()
      width, v3 = dec.d_model, 3 * dec.num_vertices
      self.audio_feature_map = torch.nn.Linear(enc.hidden_size, width)
      self.vertice_map = torch.nn.Linear(v3, width)
      self.obj_vector = torch.nn.Linear(dec.num_styles, width, bias=False)
      layer = torch.nn.TransformerDecoderLayer(
        width, dec.num_heads, dec.mlp_dim, dropout=dec.dropout_rate, batch_first=True
      )
      self.transformer_decoder = torch.nn.TransformerDecoder(layer, dec.num_layers)
      self.vertice_map_r = torch.nn.Linear(width, v3)
      torch.nn.init.zeros_(self.vertice_map_r.weight)
      torch.nn.init.zeros_(self.vertice_map_r.bias)
      positions = np.arange(frames)
      encoding = motion_decoders.periodic_positional_encoding(positions, width, dec.period)
      bias = motion_decoders.periodic_alibi_bias(
        positions, positions, motion_decoders.alibi_slopes(dec.num_heads), dec.period, True
      )
      causal = np.where(positions[None, :] <= positions[:, None], 0.0, -np.inf)
      self.register_buffer("encoding", torch.tensor(np.asarray(encoding)))  # [T, D]
      self.register_buffer("self_mask", torch.tensor(np.asarray(bias) + causal).float())
      self.register_buffer("memory_mask", ~torch.eye(frames, dtype=torch.bool))  # [T, T]

    def forward(self, audio, template, vertices, one_hot):
      batch_size = audio.shape[0]
      features = self.audio_encoder.feature_extractor(audio)  # [B, C, T_a]
      features = torch.nn.functional.interpolate(
        features, size=frames, mode="linear", align_corners=True
      ).transpose(1, 2)  # [B, T, C]
      hidden, _ = self.audio_encoder.feature_projection(features)
      hidden = self.audio_encoder.encoder(hidden).last_hidden_state  # [B, T, D]
      memory = self.audio_feature_map(hidden)
      style = self.obj_vector(one_hot)  # [B, d]
      previous = (vertices[:, :-1] - template[:, None]).flatten(2)  # [B, T-1, V*3]
      inputs = torch.cat([style[:, None], self.vertice_map(previous) + style[:, None]], 1)
      inputs = inputs + self.encoding
      self_mask = self.self_mask.repeat(batch_size, 1, 1)  # [B*H, T, T]
      out = self.transformer_decoder(
        inputs, memory, tgt_mask=self_mask, memory_mask=self.memory_mask
      )
      offsets = self.vertice_map_r(out).reshape(vertices.shape)
      return template[:, None] + offsets

  net = FaceFormer().train()
  batch = synthetic_batch(config, config.batch_size)
  audio = torch.tensor(batch["audio"])
  template = torch.tensor(batch["template"])
  vertices = torch.tensor(batch["vertices"])
  one_hot = torch.nn.functional.one_hot(
    torch.tensor(batch["subject"]).long(), dec.num_styles
  ).float()
  params = [p for p in net.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(params, lr=config.optim.lr)

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    predicted = net(audio, template, vertices, one_hot) * MM_PER_METRE
    truth = vertices * MM_PER_METRE
    vertex = torch.mean((predicted - truth) ** 2)
    velocity = torch.mean((torch.diff(predicted, dim=1) - torch.diff(truth, dim=1)) ** 2)
    loss = vertex + config.loss.velocity_weight * velocity
    loss.backward()
    if config.optim.clip_norm:
      torch.nn.utils.clip_grad_norm_(params, config.optim.clip_norm)
    optimizer.step()
    float(loss.detach())

  figures = timed_steps(run_step, args.steps, args.warmup)
  figures.pop("compile_s")
  flops = task.flops_per_example(config)
  return {
    "framework": "torch",
    "torch_version": torch.__version__,
    "transformers_version": transformers.__version__,
    "torch_threads": torch.get_num_threads(),
    "params_total": sum(p.numel() for p in net.parameters()),
    "params_trainable": sum(p.numel() for p in params),
    "flops_per_example": flops,
    "achieved_flops_per_s": flops * config.batch_size / figures["step_time_s"],
    **figures,
  }


# ----------------------------------------------------------------------------------------------


def run_reference(frames: int, training: str, args) -> dict:
  """The reference FaceFormer's own step (`reference/faceformer_step.py`) in its virtualenv."""
  python = args.reference_python
  if not os.path.isfile(python):
    raise SystemExit(
      f"{python}: no reference virtualenv; make it with bash benchmarks/reference/"
      "setup_faceformer.sh (or pass --reference_python)"
    )
  if training not in ("teacher_forcing", "autoregressive"):
    raise SystemExit(
      f"--training={training}: the reference trains teacher_forcing or autoregressive"
    )
  command = [
    python,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "faceformer_step.py"),
    f"--source={args.reference_source}",
    f"--frames={frames}",
    f"--training={training}",
    f"--steps={args.reference_steps or args.steps}",
    f"--warmup={args.warmup}",
  ]
  out = subprocess.run(command, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"the reference step failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
  spec = args.config + (",encoder=tiny" if args.small else "")
  frame_counts = [int(f) for f in args.frames.split(",")] if args.frames else [None]
  command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
  lines = []
  for frames in frame_counts:
    overrides = [f"--config.batch_size={args.batch_size}"]
    if frames is not None:
      # One sequence of `frames` frames per example: whole sentences, as the reference trains.
      overrides.append(f"--config.data.window_frames={frames}")
    if config_lib.load_config(spec).model.decoder.get("training") is not None:
      overrides.append(f"--config.model.decoder.training={args.training}")
    config = config_lib.load_config(spec, [*overrides, *args.override])
    frames = config.data.window_frames
    training = config.model.decoder.get("training", "teacher_forcing")
    common = {
      "benchmark": "audio2mesh_step",
      "config": spec,
      "overrides": list(args.override),
      "encoder": config.model.encoder.variant,
      "decoder": f"{config.model.decoder.kind} ({config.model.decoder.variant})",
      "training": training,
      "batch_size": config.batch_size,
      "window_frames": frames,
      "audio_samples": int(math.ceil(frames * config.data.sample_rate / config.data.fps)),
      "steps": args.steps,
      "warmup": args.warmup,
    }
    results: dict[str, dict] = {}
    for framework in args.frameworks:
      if framework == "jax":
        figures = run_jax(config, args)
      elif framework == "torch":
        figures = run_torch(config, args)
      else:
        if config.batch_size != 1:
          raise SystemExit("--frameworks reference: the reference trains batch 1 only")
        figures = run_reference(frames, training, args)
      line = {**common, **figures}
      line["frames_per_s"] = config.batch_size * frames / line["step_time_s"]
      line["examples_per_s"] = config.batch_size / line["step_time_s"]
      if framework != "jax" and "jax" in results:
        line["jax_speedup"] = line["step_time_s"] / results["jax"]["step_time_s"]
      line.update(
        machine=machine(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=command,
      )
      print(json.dumps(line), flush=True)
      results[framework] = line
    lines.extend(results.values())
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment file and arguments")
  parser.add_argument("--small", action="store_true", help="tiny encoder (quick CPU runs)")
  parser.add_argument("--batch_size", type=int, default=8, help="global batch (windows)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  parser.add_argument(
    "--frameworks",
    nargs="+",
    choices=("jax", "reference", "torch"),
    default=["jax", "torch"],
    help="jax: fdjax's step; reference: EvelynFan/FaceFormer's own step in its virtualenv "
    "(batch 1); torch: the re-implementation of the reference's path in current transformers",
  )
  parser.add_argument(
    "--frames",
    default="",
    help="comma-separated sequence lengths in frames (default: the config's window)",
  )
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument(
    "--reference_python",
    default=os.path.join(here, "reference", ".venv-faceformer", "bin", "python"),
    help="the reference's virtualenv (benchmarks/reference/setup_faceformer.sh makes it)",
  )
  parser.add_argument(
    "--reference_source",
    default=os.path.join(here, "reference", "FaceFormer"),
    help="a checkout of EvelynFan/FaceFormer",
  )
  parser.add_argument(
    "--reference_steps", type=int, default=0, help="timed reference steps (default --steps)"
  )
  parser.add_argument(
    "--training",
    default="teacher_forcing",
    choices=("teacher_forcing", "autoregressive", "scheduled_sampling"),
    help="the FaceFormer decoder's training mode (the reference runs the same one)",
  )
  parser.add_argument("--check_flops", action="store_true", help="also count FLOPs in the HLO")
  parser.add_argument("--override", action="append", default=[], help="--config.x=y overrides")
  return parser.parse_args(argv)


if __name__ == "__main__":
  run(parse_args())
