"""Synthetic twin of VoxCeleb2: unlabelled talking-face clips with speech, in the real layout.

VoxCeleb2 (Chung et al., 2018) holds about a million face-tracked clips of 6,112 celebrities
cut from YouTube interviews: 224 x 224 pixels, 25 fps, with their speech, a few seconds each.
Self-supervised face-video pretraining (MARLIN, MAE-DFER) uses it without labels; talking-head
generation uses its audio-visual pairs. The twin writes the release's layout,

    <out_dir>/dev/mp4/id<NNNNN>/<video_id>/<NNNNN>.mp4    H.264 video + AAC audio (16 kHz mono)
    <out_dir>/test/mp4/id<NNNNN>/<video_id>/<NNNNN>.mp4   the test identities (none in dev)

and beside every clip what the real data lacks, for checking and for the talking-head work:

    <NNNNN>.parts.npz   `parts` uint8 [T, H, W]: per-pixel face-part ids (`face_render.FACE_PARTS`)
    <NNNNN>.json        per-frame ground truth: `mouth_open` [T] (the renderer's lip gap, in
                        head half-heights), `head_pose` [T, 6] (yaw, pitch, roll in radians,
                        dx, dy in frame fractions, scale), `blink` [T] (AU43, 1 = shut), `aus`
                        [T, A] over `render_aus`, and `fps`, `sample_rate`, `av_lag_frames`

Content (`face_render` draws the faces): each identity is a `random_identity` with a voice
(pitch and formant scale); each YouTube video of it is one scene (background, light, camera
noise) and its clips share it. A clip's speech is `talking_mesh.speech_audio` (voiced syllables
with formants, fricatives and pauses), and its short-time loudness (`talking_mesh.articulation`)
opens the mouth: AU25 parts the lips and AU26 drops the jaw as speech gets louder, with the
identity's own articulation gain, and AU20 stretches the lips on /i/-like spectra. The mouth
follows the audio with a fixed lag of `AV_LAG_FRAMES` (zero: in sync). Heads drift and turn
slowly (`random_pose_track`), eyes blink about `BLINKS_PER_SECOND` times a second, and a share of
the clips shows a brief expression (a smile, raised brows, a frown) of moderate intensity.

Sizes are `TwinSize` parameter sets: `tiny` (tests: a handful of identities, short clips,
48-pixel frames; writes in about a second), `demo` and `large` (hundreds of identities at the
real 224 pixels).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np
import scipy.ndimage

from data_pipelines.synthetic import face_render, talking_mesh

FPS = 25
SAMPLE_RATE = 16000
AV_LAG_FRAMES = 0  # frames the mouth lags the audio that drives it
BLINKS_PER_SECOND = 0.3
EXPRESSION_SHARE = 0.3  # share of the clips with a brief expression
_EXPRESSIONS = (
  {6: 0.6, 12: 0.9},  # smile
  {1: 0.8, 2: 0.8},  # raised brows
  {4: 0.7, 7: 0.4},  # frown
)
_ID_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclasses.dataclass(frozen=True)
class TwinSize:
  """How much the twin writes."""

  dev_identities: int
  test_identities: int
  videos_per_identity: int
  clips_per_video: int
  seconds: tuple[float, float]  # clip duration range
  side: int  # frame height and width in pixels (even, for H.264's 4:2:0)


SIZES = {
  "tiny": TwinSize(4, 1, 1, 2, (0.6, 1.0), 48),
  "demo": TwinSize(24, 4, 2, 3, (2.0, 4.0), 112),
  "large": TwinSize(400, 40, 3, 4, (4.0, 8.0), 224),
}


def _seed(*keys: int) -> int:
  return int(np.random.SeedSequence([30, *keys]).generate_state(1)[0])


def _video_id(rng: np.random.Generator) -> str:
  """An 11-character YouTube-style video id."""
  return "".join(_ID_CHARACTERS[i] for i in rng.integers(len(_ID_CHARACTERS), size=11))


def _voice(rng: np.random.Generator) -> talking_mesh.Subject:
  """A speaker's voice; `speech_audio` reads only its pitch and formant scale."""
  female = bool(rng.random() < 0.5)
  return talking_mesh.Subject(
    name="",
    neutral=np.zeros((0, 3), np.float32),
    f0=float(rng.uniform(180, 240) if female else rng.uniform(95, 140)),
    formant_scale=float(rng.uniform(1.1, 1.2) if female else rng.uniform(0.95, 1.02)),
    mouth_gains=np.ones(3),
    smoothing_s=0.04,
  )


def speech_track(
  audio: np.ndarray,
  num_frames: int,
  gain: float,
  rng: np.random.Generator,
  expression_share: float = EXPRESSION_SHARE,
) -> np.ndarray:
  """AU activations `[T, A]` of a talking face: the mouth driven by `audio`, blinks, and
  (for `expression_share` of the clips) one brief expression.

  Per frame, the audio's openness in [0, 1] (log energy, `talking_mesh.articulation`), smoothed
  over about 40 ms as coarticulation does and scaled by the speaker's `gain`, parts the lips
  (AU25 up to 0.9) and, past a third of the range, drops the jaw (AU26 up to about 0.5): a
  talking mouth opens a third to a half as wide as a yawn or a surprised gasp. Lip stretching
  (AU20, up to 0.3) follows /i/-like spectra. The track is shifted by `AV_LAG_FRAMES`.
  """
  features = talking_mesh.articulation(audio, SAMPLE_RATE, FPS, num_frames)  # [T, 2]
  features = scipy.ndimage.gaussian_filter1d(features, sigma=1.0, axis=0, mode="nearest")
  openness = np.clip(gain * features[:, 0], 0.0, 1.0)
  spread = np.clip(features[:, 1], 0.0, 1.0)
  if AV_LAG_FRAMES:
    openness = np.concatenate([np.zeros(AV_LAG_FRAMES), openness[:-AV_LAG_FRAMES]])
    spread = np.concatenate([np.zeros(AV_LAG_FRAMES), spread[:-AV_LAG_FRAMES]])
  track = np.zeros((num_frames, len(face_render.RENDER_AUS)), np.float32)
  index = face_render.AU_INDEX
  track[:, index[25]] = 0.9 * np.clip(openness / 0.6, 0.0, 1.0)
  track[:, index[26]] = 0.5 * np.clip((openness - 0.3) / 0.7, 0.0, 1.0)
  track[:, index[20]] = 0.3 * spread * openness
  track[:, index[43]] = face_render._blinks(num_frames, rng, BLINKS_PER_SECOND / FPS)
  if rng.random() < expression_share:
    aus = _EXPRESSIONS[rng.integers(len(_EXPRESSIONS))]
    t = np.arange(num_frames, dtype=np.float32)
    length = rng.uniform(0.3, 0.8) * num_frames
    start = rng.uniform(0, num_frames - length)
    envelope = face_render._envelope(t, start, start + length, rng.uniform(0.2, 0.4) * length)
    intensity = rng.uniform(0.5, 1.0)
    for au, peak in aus.items():
      track[:, index[au]] = np.maximum(track[:, index[au]], peak * intensity * envelope)
  return np.clip(track, 0.0, 1.0)


def mouth_open(track: np.ndarray) -> np.ndarray:
  """`[T]` the inner-lip gap the renderer draws for an AU track `[T, A]`, in head half-heights."""
  index = face_render.AU_INDEX
  return np.array(
    [face_render.lip_gap(*(float(a[index[u]]) for u in (25, 26, 10, 24))) for a in track],
    np.float32,
  )


def write_clip(
  path_stem: str,
  identity: face_render.Identity,
  voice: talking_mesh.Subject,
  gain: float,
  scene: face_render.Scene,
  num_frames: int,
  seed: int,
  *,
  pose_track: Callable[[int, np.random.Generator], np.ndarray] = face_render.random_pose_track,
  expression_share: float = EXPRESSION_SHARE,
  with_parts: bool = True,
) -> None:
  """Writes one talking clip: `<stem>.mp4` (video and audio), `<stem>.json` (ground truth) and,
  `with_parts`, `<stem>.parts.npz`. The talking-face twins (VoxCeleb2, HDTF) all write their
  clips here; they differ in the head motion (`pose_track(num_frames, rng) -> [T, 6]`) and in
  how often a brief expression shows (`expression_share`)."""
  from fdjax.render.mesh import write_video  # H.264 + AAC muxing, written once in fdjax

  rng = np.random.default_rng(seed)
  audio = talking_mesh.speech_audio(num_frames / FPS, SAMPLE_RATE, voice, seed)
  track = speech_track(audio, num_frames, gain, rng, expression_share)
  poses = pose_track(num_frames, rng)
  os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
  if with_parts:  # the part map draws no randomness: the frames are the same either way
    frames, parts = face_render.render_clip(identity, scene, track, poses, rng, return_parts=True)
    np.savez_compressed(path_stem + ".parts.npz", parts=parts)
  else:
    frames = face_render.render_clip(identity, scene, track, poses, rng)
  write_video(frames, path_stem + ".mp4", FPS, audio=audio, sample_rate=SAMPLE_RATE)
  truth = {
    "fps": FPS,
    "sample_rate": SAMPLE_RATE,
    "av_lag_frames": AV_LAG_FRAMES,
    "num_frames": num_frames,
    "face_parts": list(face_render.FACE_PARTS),
    "render_aus": list(face_render.RENDER_AUS),
    "mouth_open": np.round(mouth_open(track), 5).tolist(),
    "head_pose": np.round(poses, 5).tolist(),
    "blink": np.round(track[:, face_render.AU_INDEX[43]], 4).tolist(),
    "aus": np.round(track, 4).tolist(),
  }
  with open(path_stem + ".json", "w") as f:
    json.dump(truth, f)


def write_size(out_dir: str, size: TwinSize, seed: int = 0) -> None:
  """Writes a twin of any `size` under `out_dir`."""
  if size.side % 2:
    raise ValueError(f"frame side must be even for H.264, got {size.side}")
  rng = np.random.default_rng(_seed(seed))
  count = size.dev_identities + size.test_identities
  numbers = rng.choice(np.arange(10, 10000), size=count, replace=False)
  parts = ("dev",) * size.dev_identities + ("test",) * size.test_identities
  for n, (part, number) in enumerate(zip(parts, numbers)):
    person_rng = np.random.default_rng(_seed(seed, 1, n))
    identity = face_render.random_identity(person_rng)
    voice = _voice(person_rng)
    gain = float(person_rng.uniform(0.8, 1.25))  # how widely this person articulates
    for v in range(size.videos_per_identity):
      video_rng = np.random.default_rng(_seed(seed, 2, n, v))
      video_id = _video_id(video_rng)
      scene = face_render.random_scene(video_rng, size.side, size.side)
      for c in range(1, size.clips_per_video + 1):
        clip_seed = _seed(seed, 3, n, v, c)
        seconds = np.random.default_rng(clip_seed).uniform(*size.seconds)
        stem = os.path.join(out_dir, part, "mp4", f"id{number:05d}", video_id, f"{c:05d}")
        write_clip(stem, identity, voice, gain, scene, int(round(seconds * FPS)), clip_seed)


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic VoxCeleb2 of the named size (`SIZES`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  write_size(out_dir, SIZES[size], seed)
