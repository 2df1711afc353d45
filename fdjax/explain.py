"""Per-frame saliency of a trained video model over one clip, drawn as a PNG strip.

    fdjax explain --config C --workdir W --out strip.png [--split test] [--index N]
        [--method gradxinput|rollout] [--target K] [--step S]

Restores the run's parameters (latest checkpoint, or `--step`), takes example `--index` of the
split (`test`/`eval`: the config's evaluation split, `train`: its training split, or a TFDS split
name) through the evaluation transform, and writes the clip's frames in the top row and each
frame's saliency laid over it in the bottom row, on one colour scale for the whole clip, so a
user sees which frames and which face regions drove the decision. The task provides the example
and its saliency (`explain_example`, `saliency_fn` in the task contract, `fdjax.tasks`); the
`dfer` and `au` tasks do, for both of their model kinds, with the methods below.

Methods:
- `gradxinput` (default): gradient x input (Shrikumar et al. 2016) of the target logit (the
  predicted class, or the most probable AU, unless `--target`), taken with respect to the
  normalised pixels the model sees: `|d logit / d x| * |x|` summed over colour channels.
- `rollout`: attention rollout (Abnar & Zuidema 2020) through the image encoder of each frame
  (heads averaged, the residual added as 0.5 I, rows renormalised, layers multiplied): the
  class token's share of attention on each patch, times the weight the temporal transformer's
  class token gives that frame (rolled out the same way; uniform under mean pooling). Rollout
  explains the embedding, not one class: `--target` does not apply.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("gradxinput", "rollout")  # those of the video tasks (`fdjax.tasks.dfer.saliency_fn`)


def gradient_x_input(model: nn.Module, params: Any, video: np.ndarray, target: int) -> np.ndarray:
  """Saliency [T, H, W] of logit `target` for one clip `video` [T, H, W, 3] (uint8 values)."""
  if getattr(model, "stop_backbone_gradient", False):
    # Training may skip the backward pass through a frozen encoder; saliency needs it.
    model = model.clone(stop_backbone_gradient=False)
  mean = 255.0 * jnp.asarray(model.pixel_mean, jnp.float32)
  std = 255.0 * jnp.asarray(model.pixel_std, jnp.float32)

  @jax.jit
  def saliency(params, clip):
    def logit(pixels):  # pixels: [1, T, H, W, 3] normalised as the model normalises
      return model.apply({"params": params}, pixels * std + mean)[0][0, target]

    normalised = (clip[None].astype(jnp.float32) - mean) / std
    gradient = jax.grad(logit)(normalised)
    return jnp.sum(jnp.abs(gradient * normalised), axis=-1)[0]  # [T, H, W]

  return np.asarray(jax.device_get(saliency(params, jnp.asarray(video))), np.float32)


def _attention_stacks(intermediates: dict) -> dict[str, list[np.ndarray]]:
  """Sown attention weights grouped by transformer: `{path of the stack: [layer 0, 1, ...]}`."""
  stacks: dict[str, dict[int, np.ndarray]] = {}

  def walk(node: Any, path: tuple[str, ...]) -> None:
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, (*path, key))
      return
    if path and path[-1] == "attention_weights":
      layer = next(p for p in reversed(path) if re.fullmatch(r"layers_\d+", p))
      stack = "/".join(path[: path.index(layer)])
      value = node[0] if isinstance(node, tuple) else node
      stacks.setdefault(stack, {})[int(layer.split("_")[1])] = np.asarray(value, np.float32)

  walk(intermediates, ())
  return {stack: [layers[i] for i in sorted(layers)] for stack, layers in stacks.items()}


def rollout(attentions: Sequence[np.ndarray]) -> np.ndarray:
  """Attention rollout [N, L, L] of a stack of layers' weights, each [N, heads, L, L]."""
  result = None
  for weights in attentions:
    mixed = 0.5 * weights.mean(axis=1) + 0.5 * np.eye(weights.shape[-1], dtype=np.float32)
    mixed /= mixed.sum(axis=-1, keepdims=True)
    result = mixed if result is None else mixed @ result
  return result


def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
  """[N, h, w] patch maps -> [N, size, size] by bilinear resizing (Pillow)."""
  from PIL import Image

  return np.stack(
    [
      np.asarray(
        Image.fromarray(m.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
      )
      for m in maps
    ]
  )


def attention_rollout(model: nn.Module, params: Any, video: np.ndarray) -> np.ndarray:
  """Saliency [T, H, W] of one clip by attention rollout (see the module docstring)."""
  from fdjax.models.vivit import VideoVisionTransformer

  @jax.jit
  def intermediates(params, clip):
    _, state = model.apply({"params": params}, clip[None], mutable=["intermediates"])
    return state["intermediates"]

  stacks = _attention_stacks(jax.device_get(intermediates(params, jnp.asarray(video))))
  frames, size = video.shape[0], video.shape[1]
  if isinstance(model, VideoVisionTransformer):
    spatial, temporal = stacks["spatial_encoder"], stacks.get("temporal_encoder")
    repeat = model.tubelet_size
  else:
    spatial, temporal = stacks["vision/encoder"], stacks.get("temporal_head/temporal_encoder")
    repeat = 1
    if model.pooling != "cls":
      temporal = None
  patches = rollout(spatial)[:, 0, 1:]  # [steps, N]: class token -> patches
  side = int(round(np.sqrt(patches.shape[-1])))
  maps = _upsample(patches.reshape(-1, side, side), size)  # [steps, H, W]
  if temporal is not None:
    steps = rollout(temporal)[0, 0, 1:]  # [steps]: temporal class token -> time steps
    maps = maps * (steps / steps.max())[:, None, None]
  return np.repeat(maps, repeat, axis=0)[:frames]


def render_strip(
  frames: np.ndarray, saliency: np.ndarray, path: str, title: str, frame_titles: Sequence[str]
) -> None:
  """Frames [T, H, W, 3] on top, saliency [T, H, W] over them below; one colour scale."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  count = len(frames)
  scale = max(float(saliency.max()), 1e-12)
  figure = Figure(figsize=(1.3 * count + 0.6, 3.2))
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, count, squeeze=False)
  for t in range(count):
    top, bottom = axes[0, t], axes[1, t]
    top.imshow(frames[t], interpolation="nearest")
    top.set_title(frame_titles[t], fontsize=7)
    bottom.imshow(frames[t], interpolation="nearest")
    bottom.imshow(saliency[t] / scale, cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
    for ax in (top, bottom):
      ax.set_xticks([])
      ax.set_yticks([])
  figure.suptitle(title, fontsize=9)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=110)


def explain(
  config: Any,
  workdir: str,
  out: str,
  *,
  split: str = "test",
  index: int = 0,
  method: str = "gradxinput",
  target: int | None = None,
  step: int | None = None,
) -> dict:
  """Writes the saliency strip of one example to `out`; returns what it showed (JSON-able).

  The task provides the example and its saliency (`explain_example`, `saliency_fn`; see
  `fdjax.tasks.TaskModule`); a task without them is an error naming it.
  """
  from fdjax import trainer
  from fdjax.tasks import load_task

  task = load_task(config.task)
  lacking = [hook for hook in ("explain_example", "saliency_fn") if not task.has(hook)]
  if lacking:
    raise ValueError(
      f"task {config.task!r} defines no {' or '.join(lacking)} (the saliency hooks), so fdjax "
      "explain cannot explain it"
    )
  task, model, params, step = trainer.restore_params(config, workdir, step)
  example = task.explain_example(config, model, params, split=split, index=index)
  names, probabilities = list(example["class_names"]), example["probabilities"]
  predicted = int(example["predicted"])
  if target is None:
    target = predicted
  if not 0 <= target < len(names):
    raise ValueError(f"--target {target}: expected 0..{len(names) - 1}")
  shown = task.saliency_fn(config, model, params, example, method=method, target=target)
  saliency = np.asarray(shown["saliency"], np.float32)  # [T, H, W]
  frame_saliency = saliency.reshape(len(saliency), -1).sum(axis=1)
  share = frame_saliency / max(float(frame_saliency.sum()), 1e-12)
  split = example["split"]
  title = (
    f"{config.data.name} {split} #{index} (step {step}) | {shown['what']} | predicted "
    f"{names[predicted]} ({probabilities[predicted]:.2f}) | true {example['truth']}"
  )
  frames = example["frames"]
  render_strip(
    frames, saliency, out, title, [f"t={t}  {100 * s:.0f}%" for t, s in enumerate(share)]
  )
  return {
    "out": out,
    "split": split,
    "index": index,
    "method": method,
    "predicted": names[predicted],
    "probability": float(probabilities[predicted]),
    "target": None if shown["target"] is None else names[shown["target"]],
    "true": example["truth"],
    "frame_share": [round(float(s), 4) for s in share],
  }


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="fdjax explain",
    description="Per-frame saliency of a trained model as a PNG strip, for tasks with saliency "
    "hooks (dfer, au). Config overrides follow as --config.key=value.",
  )
  parser.add_argument("--config", default=None, help="config[:args] (default: W/config.json)")
  parser.add_argument("--workdir", required=True, help="the run's workdir (checkpoints)")
  parser.add_argument("--out", required=True, help="PNG to write")
  parser.add_argument("--split", default="test", help="test/eval, train, or a TFDS split name")
  parser.add_argument("--index", type=int, default=0, help="example of the split")
  parser.add_argument(
    "--method", default="gradxinput", help=f"the task's saliency method (dfer, au: {METHODS})"
  )
  parser.add_argument("--target", type=int, default=None, help="class/AU index to explain")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  return parser


def main(argv: Sequence[str]) -> int:
  from fdjax import config as config_lib

  parser = _parser()
  args, rest = parser.parse_known_args(list(argv))
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)}")
  spec = args.config or os.path.join(args.workdir, "config.json")
  if not os.path.exists(spec.partition(":")[0]):
    parser.error(f"config {spec!r} not found (give --config, or a workdir with config.json)")
  config = config_lib.load_config(spec, [*rest, ("workdir", args.workdir)])
  try:
    info = explain(
      config,
      args.workdir,
      args.out,
      split=args.split,
      index=args.index,
      method=args.method,
      target=args.target,
      step=args.step,
    )
  except (ValueError, IndexError, FileNotFoundError) as e:
    print(f"fdjax explain: {e}", file=sys.stderr)
    return 1
  print(json.dumps(info))
  return 0
