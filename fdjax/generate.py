"""`fdjax generate`: a talking-head clip from one portrait and a speech recording.

    fdjax generate --portrait face.png --audio speech.wav --workdir runs/stage2 --out clip.mp4

The whole two-stage chain of a trained `audio2motion` run (docs/design.md section 23): the
portrait, resized to the stage-1 frame size, gives its appearance and its motion code (the
reference); the speech (any rate soundfile reads, resampled to the run's) is encoded and the
motion codes are sampled window by window after it; stage 1 renders every code on the
portrait's appearance; the frames and the speech are written as an H.264/AAC MP4 (PyAV, through
`fdjax.render.mesh.write_video`). A progress line on stderr follows the rendering.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

RENDER_CHUNK = 25  # frames rendered per call (one compiled shape)


class InputError(ValueError):
  """A portrait or audio file that cannot be used; the message names the file."""


def read_portrait(path: str, size: tuple[int, int]) -> np.ndarray:
  """The image at `path` as float32 `[H, W, 3]` in [0, 1] at `size` (H, W): centre-cropped to
  the aspect of `size`, then resized (bilinear)."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise InputError(f"{path}: portrait not found")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except (UnidentifiedImageError, OSError) as e:
    raise InputError(f"{path}: cannot read the portrait as an image ({e})") from None
  height, width = size
  aspect = width / height
  w, h = image.size
  if w / h > aspect:  # too wide: crop the sides
    crop = round(h * aspect)
    box = ((w - crop) // 2, 0, (w - crop) // 2 + crop, h)
  else:
    crop = round(w / aspect)
    box = (0, (h - crop) // 2, w, (h - crop) // 2 + crop)
  image = image.crop(box).resize((width, height), Image.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def read_speech(path: str, sample_rate: int) -> np.ndarray:
  """The recording at `path` as float32 mono `[S]` at `sample_rate` (resampled with scipy's
  polyphase filter when its own rate differs)."""
  import soundfile

  from data_pipelines.ops import audio as audio_ops

  if not os.path.isfile(path):
    raise InputError(f"{path}: audio not found")
  try:
    waveform, rate = audio_ops.read_audio(path)
  except (RuntimeError, soundfile.LibsndfileError) as e:
    raise InputError(f"{path}: cannot read the audio ({e})") from None
  waveform = audio_ops.resample(waveform, rate, sample_rate)
  if not np.isfinite(waveform).all():
    raise InputError(f"{path}: the audio has non-finite samples")
  return waveform


def _progress(items: Iterator[np.ndarray], total: int, label: str) -> Iterator[np.ndarray]:
  """Yields `items`, drawing `label: n/total frames [elapsed<remaining]` on stderr."""
  start = time.monotonic()
  done = 0
  for item in items:
    yield item
    done += 1
    elapsed = time.monotonic() - start
    remaining = elapsed / done * (total - done)
    bar = "#" * (30 * done // total)
    print(
      f"\r{label}: |{bar:<30}| {done}/{total} frames [{elapsed:.0f}s<{remaining:.0f}s]",
      end="" if done < total else "\n",
      file=sys.stderr,
      flush=True,
    )


def generate(
  portrait: str,
  audio: str,
  workdir: str,
  out: str,
  *,
  seed: int = 0,
  guidance_scale: float | None = None,
  params: str | None = None,
  overrides: Sequence[str] = (),
  progress: bool = True,
) -> dict:
  """Writes the clip of `portrait` speaking `audio` with the `audio2motion` run in `workdir` to
  `out` (MP4). Returns `{"frames", "fps", "seconds", "sample_rate"}`."""
  import jax

  from data_pipelines.ops import audio as audio_ops
  from fdjax import export, trainer
  from fdjax.models.audio2mesh import frames_in
  from fdjax.render.mesh import write_video
  from fdjax.tasks import audio2motion

  config = export._load_run_config(None, workdir, list(overrides))
  if config.task != "audio2motion":
    raise InputError(f"{workdir}: a run of task {config.task!r}, not audio2motion (stage 2)")
  sample_rate, fps = config.data.sample_rate, config.data.fps
  image = read_portrait(portrait, audio2motion.stage1(config.model.motion_ae)[2])
  waveform = read_speech(audio, sample_rate)
  num_frames = int(frames_in(waveform.shape[0], sample_rate, fps))
  if num_frames < 1:
    raise InputError(f"{audio}: shorter than one video frame ({1 / fps:.3f} s)")
  _, model, restored, _ = trainer.restore_params(config, workdir, params=params)
  restored = jax.device_get(restored)
  scale = config.model.decoder.audio_guidance_scale if guidance_scale is None else guidance_scale
  samples = audio_ops.frame_start_sample(num_frames, sample_rate, fps)
  speech = audio_ops.normalize(waveform[:samples])[None]  # [1, S], as the model was trained
  portrait_batch = image[None]
  reference = audio2motion.portrait_code(model, restored, portrait_batch)
  if progress:
    print(f"fdjax generate: sampling {num_frames} frames of motion", file=sys.stderr, flush=True)
  codes = audio2motion.sample_codes(
    model,
    restored,
    speech,
    reference,
    np.asarray([seed], np.int32),
    np.asarray([scale], np.float32),
    num_frames,
  )  # [1, T, D]

  def frames() -> Iterator[np.ndarray]:
    for start in range(0, num_frames, RENDER_CHUNK):
      chunk = codes[:, start : start + RENDER_CHUNK]
      count = chunk.shape[1]
      chunk = np.pad(chunk, ((0, 0), (0, RENDER_CHUNK - count), (0, 0)), mode="edge")
      rendered = audio2motion.render_codes(model, restored, portrait_batch, chunk)
      yield from audio2motion._to_uint8(rendered)[0, :count]

  stream = _progress(frames(), num_frames, "fdjax generate") if progress else frames()
  written = write_video(stream, out, fps, audio=waveform, sample_rate=sample_rate)
  return {
    "frames": written,
    "fps": fps,
    "seconds": written / fps,
    "sample_rate": sample_rate,
  }


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="fdjax generate",
    description="A talking-head MP4 from a portrait and speech, with a trained audio2motion "
    "run (config overrides follow as --config.key=value).",
  )
  parser.add_argument("--portrait", required=True, help="image of the face (png, jpg, ...)")
  parser.add_argument("--audio", required=True, help="speech recording (wav, flac, ...)")
  parser.add_argument("--workdir", required=True, help="the audio2motion (stage 2) run")
  parser.add_argument("--out", required=True, help="the .mp4 to write")
  parser.add_argument("--seed", type=int, default=0, help="noise seed of the motion sample")
  parser.add_argument(
    "--guidance_scale", type=float, default=None, help="audio guidance (default: the run's)"
  )
  parser.add_argument("--params", choices=("raw", "ema"), default=None)
  parser.add_argument("--verbose", action="store_true", help="full tracebacks")
  args, rest = parser.parse_known_args(list(argv))
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)}")
  try:
    info = generate(
      args.portrait,
      args.audio,
      args.workdir,
      args.out,
      seed=args.seed,
      guidance_scale=args.guidance_scale,
      params=args.params,
      overrides=rest,
    )
  except (InputError, FileNotFoundError) as e:
    if args.verbose:
      raise
    print(f"fdjax generate: {e}", file=sys.stderr)
    return 2
  print(
    f"wrote {args.out}: {info['frames']} frames at {info['fps']:g} fps ({info['seconds']:.2f} s)"
  )
  return 0
