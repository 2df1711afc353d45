"""`fdjax eval-video`: the video metrics over a folder of generated clips (and the real ones).

    fdjax eval-video --generated DIR [--real DIR] [--inception PTH] [--i3d PT] [--syncnet MODEL]
        [--out metrics.json]

Clips are video files (`.mp4`, `.avi`, `.mov`, `.mkv`) paired by file name. With `--real`:
per-clip PSNR and SSIM over the frames both clips have (same size required), FID (with
`--inception`) over every `--fid_stride`-th frame, FVD (with `--i3d`) over consecutive
`--fvd_frames`-frame windows. With `--syncnet`: LSE-D, LSE-C and the offset of every generated
(and real) clip, from its own audio track; frames are taken as 25 fps face crops. Definitions:
`fdjax.metrics.video` and `fdjax.metrics.sync` (docs/design.md section 5). Prints one
`name: value` line per metric and writes them as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


def list_clips(folder: str) -> dict[str, str]:
  """File stem -> path of every video file in `folder` (not recursive)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such folder of clips")
  clips = {
    os.path.splitext(name)[0]: os.path.join(folder, name)
    for name in sorted(os.listdir(folder))
    if name.lower().endswith(VIDEO_EXTENSIONS)
  }
  if not clips:
    raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
  return clips


def _windows(clip: np.ndarray, length: int) -> list[np.ndarray]:
  return [clip[i : i + length] for i in range(0, len(clip) - length + 1, length)]


def evaluate_clips(
  generated: str,
  real: str | None = None,
  inception: str | None = None,
  i3d_checkpoint: str | None = None,
  syncnet_checkpoint: str | None = None,
  fid_stride: int = 1,
  fvd_frames: int = 16,
) -> dict[str, Any]:
  """The metrics of the module docstring, as a flat dict of numbers."""
  from data_pipelines.ops.video import decode_audio, decode_video
  from fdjax.metrics import sync, video
  from fdjax.models import fid_inception, i3d, syncnet

  generated_clips = list_clips(generated)
  real_clips = list_clips(real) if real else {}
  if real and not set(generated_clips) & set(real_clips):
    raise ValueError(f"{generated} and {real}: no clip names in common")
  frames = {name: decode_video(path) for name, path in generated_clips.items()}
  real_frames = {name: decode_video(path) for name, path in real_clips.items()}
  metrics: dict[str, Any] = {"clips": len(frames)}

  paired = sorted(set(frames) & set(real_frames))
  if paired:
    psnr, ssim = [], []
    for name in paired:
      ours, theirs = frames[name], real_frames[name]
      if ours.shape[1:] != theirs.shape[1:]:
        raise ValueError(
          f"{generated_clips[name]}: frames of {ours.shape[1:3]} pixels, the real clip "
          f"{real_clips[name]} has {theirs.shape[1:3]}"
        )
      length = min(len(ours), len(theirs))
      psnr.append(float(video.clip_psnr(ours[:length], theirs[:length])))
      ssim.append(float(video.clip_ssim(ours[:length], theirs[:length])))
    metrics.update(paired_clips=len(paired), psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)))

  if real and inception:
    model, variables = fid_inception.load(inception)
    features = [
      video.inception_features(
        model, variables, np.concatenate([c[::fid_stride] for c in s.values()])
      )
      for s in (real_frames, frames)
    ]
    metrics["fid"] = video.frechet_distance_of_features(*features)

  if real and i3d_checkpoint:
    model, variables = i3d.load(i3d_checkpoint)
    features = []
    for clips in (real_frames, frames):
      windows = [w for c in clips.values() for w in _windows(c, fvd_frames)]
      if len(windows) < 2:
        raise ValueError(f"FVD needs at least 2 windows of {fvd_frames} frames per set")
      features.append(video.i3d_features(model, variables, np.stack(windows)))
    metrics["fvd"] = video.frechet_distance_of_features(*features)

  if syncnet_checkpoint:
    model, variables = syncnet.load(syncnet_checkpoint)
    for prefix, clips, paths in (("", frames, generated_clips), ("real_", real_frames, real_clips)):
      if not clips:
        continue
      scores = [
        sync.lse(model, variables, clips[name], decode_audio(paths[name], sync.SAMPLE_RATE))
        for name in sorted(clips)
      ]
      metrics[f"{prefix}lse_d"] = float(np.mean([s.min_distance for s in scores]))
      metrics[f"{prefix}lse_c"] = float(np.mean([s.confidence for s in scores]))
      metrics[f"{prefix}av_offset_frames"] = float(np.mean([s.offset for s in scores]))
  return metrics


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="fdjax eval-video", description=__doc__.split("\n")[0])
  parser.add_argument("--generated", required=True, help="folder of generated clips")
  parser.add_argument("--real", default=None, help="folder of the real clips, same file names")
  parser.add_argument("--inception", default=None, help="pt_inception-2015-12-05 .pth (FID)")
  parser.add_argument("--i3d", default=None, help="I3D Kinetics-400 state dict .pt (FVD)")
  parser.add_argument("--syncnet", default=None, help="syncnet_v2.model state dict (LSE)")
  parser.add_argument("--fid_stride", type=int, default=1, help="FID over every k-th frame")
  parser.add_argument("--fvd_frames", type=int, default=16, help="frames per FVD window")
  parser.add_argument("--out", default=None, help="write the metrics as JSON here")
  args = parser.parse_args(argv)
  try:
    metrics = evaluate_clips(
      args.generated,
      args.real,
      inception=args.inception,
      i3d_checkpoint=args.i3d,
      syncnet_checkpoint=args.syncnet,
      fid_stride=args.fid_stride,
      fvd_frames=args.fvd_frames,
    )
  except (OSError, ValueError) as e:
    print(f"fdjax eval-video: {e}", file=sys.stderr)
    return 2
  for name, value in metrics.items():
    print(f"{name}: {value}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(metrics, f, indent=2)
  return 0
