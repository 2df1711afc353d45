"""Synthetic twin of HDTF: long frontal talking-head clips with speech, in the processed layout.

HDTF (Zhang et al., 2021, "Flow-guided one-shot talking face generation with a high-resolution
audio-visual dataset") holds about 360 YouTube videos of some 300 speakers (politicians on
`WDA`/`WRA`, radio hosts on `RD`), each minutes long, frontal and mostly head-still. The
talking-head papers (AniTalker, EDTalk, DAWN, JoyVASA, ...) use it processed: face crops at
25 fps with the speech muxed in, one file per clip. The twin writes that layout,

    <out_dir>/<Source>_<Name>_<NNN>.mp4    H.264 video + AAC audio (16 kHz mono), 25 fps
    <out_dir>/<Source>_<Name>_<NNN>.json   per-frame ground truth (the real data has none)

where `<Source>` is RD, WDA or WRA, `<Source>_<Name>` is the identity and `<NNN>` numbers its
clips. The `.json` holds `mouth_open` [T] (the renderer's inner-lip gap in head half-heights),
`head_pose` [T, 6] (yaw, pitch, roll in radians, dx, dy in frame fractions, scale), `blink` [T]
(AU43, 1 = shut), `aus` [T, A] over `render_aus`, and `fps`, `sample_rate`, `av_lag_frames`
(the frames the mouth lags the audio: `voxceleb2.AV_LAG_FRAMES`, zero).

Every clip goes through `voxceleb2.write_clip`, the talking-face twins' one clip writer: the
speech (`talking_mesh.speech_audio`, in the speaker's voice) opens the mouth through its
short-time loudness with the speaker's articulation gain, so an audio-to-motion model can learn
the mouth from the audio; eyes blink about `voxceleb2.BLINKS_PER_SECOND` times a second. What
makes it HDTF rather than VoxCeleb2: heads stay frontal and nearly still (`frontal_pose_track`:
a base pose within a few degrees and a slow drift of about a degree), a brief expression shows
in only `EXPRESSION_SHARE` of the clips, clips are longer, and every clip is its own recording
(its own background, light and camera noise).

Splits are by identity and are the builder's (`data_pipelines.builders.hdtf.identity_split`, a
hash of the identity); the twin draws names until every split holds its share of identities
(`TwinSize`), so each split has at least two. Sizes: `tiny` (tests: 6 identities, one 2-3 s clip
each, 64 px; writes in about a second), `demo` (32 identities with 3 clips of 6-12 s each,
about 14 minutes of speech at 128 px, for training both talking-head stages on a CPU; writes in
about two minutes), `large` (300 identities, 256 px).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from data_pipelines.synthetic import face_render, voxceleb2

FPS = voxceleb2.FPS
SAMPLE_RATE = voxceleb2.SAMPLE_RATE
AV_LAG_FRAMES = voxceleb2.AV_LAG_FRAMES
EXPRESSION_SHARE = 0.1  # HDTF speakers mostly talk with a neutral face
SOURCES = ("RD", "WDA", "WRA")
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea")
_CODAS = ("", "", "n", "r", "s", "l", "m", "t")


@dataclasses.dataclass(frozen=True)
class TwinSize:
  """How much the twin writes."""

  identities: dict  # {split: number of identities}
  clips_per_identity: int
  seconds: tuple[float, float]  # clip duration range
  side: int  # frame height and width in pixels (even, for H.264's 4:2:0)


SIZES = {
  "tiny": TwinSize({"train": 2, "validation": 2, "test": 2}, 1, (2.0, 3.0), 64),
  "demo": TwinSize({"train": 24, "validation": 4, "test": 4}, 3, (6.0, 12.0), 128),
  "large": TwinSize({"train": 240, "validation": 30, "test": 30}, 4, (20.0, 60.0), 256),
}


def _seed(*keys: int) -> int:
  return int(np.random.SeedSequence([31, *keys]).generate_state(1)[0])


def _word(rng: np.random.Generator) -> str:
  syllables = [
    _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
    for _ in range(int(rng.integers(2, 4)))
  ]
  return ("".join(syllables) + _CODAS[rng.integers(len(_CODAS))]).capitalize()


def random_name(rng: np.random.Generator) -> str:
  """An identity in HDTF's form, `<Source>_<Name>`: "WDA_KaloMerin", "RD_Radio7"."""
  source = SOURCES[rng.integers(len(SOURCES))]
  if source == "RD":
    return f"RD_Radio{int(rng.integers(1, 100))}"
  return f"{source}_{_word(rng)}{_word(rng)}"


def frontal_pose_track(num_frames: int, rng: np.random.Generator) -> np.ndarray:
  """Head pose per frame `[T, 6]` (as `face_render.random_pose_track`) of a frontal speaker:
  a base pose within a few degrees of frontal and centred, and a slow drift of about a degree
  and a hundredth of the frame (periods of 2 to 6 seconds)."""
  t = np.arange(num_frames, dtype=np.float32)[:, None]
  base = np.array(
    [
      rng.normal(0, 0.05),
      rng.normal(0, 0.04),
      rng.normal(0, 0.03),
      rng.normal(0, 0.01),
      rng.normal(0, 0.01),
      rng.uniform(1.15, 1.25),  # HDTF crops are tight: the face fills the frame
    ],
    np.float32,
  )
  amplitude = np.array([0.03, 0.015, 0.015, 0.006, 0.006, 0.005], np.float32)
  amplitude *= rng.uniform(0.3, 1.0, 6).astype(np.float32)
  period = rng.uniform(2 * FPS, 6 * FPS, 6).astype(np.float32)
  phase = rng.uniform(0, 2 * np.pi, 6).astype(np.float32)
  return (base + amplitude * np.sin(2 * np.pi * t / period + phase)).astype(np.float32)


def identities(size: TwinSize, seed: int = 0) -> list[tuple[str, str]]:
  """`[(identity, split)]` of a twin: names drawn until each split has its share."""
  from data_pipelines.builders.hdtf import identity_split  # the builder decides the splits

  rng = np.random.default_rng(_seed(seed))
  wanted = dict(size.identities)
  chosen: list[tuple[str, str]] = []
  taken: set[str] = set()
  while any(wanted.values()):
    name = random_name(rng)
    split = identity_split(name)
    if name not in taken and wanted.get(split, 0) > 0:
      wanted[split] -= 1
      taken.add(name)
      chosen.append((name, split))
  return chosen


def write_size(out_dir: str, size: TwinSize, seed: int = 0) -> None:
  """Writes a twin of any `size` under `out_dir`."""
  if size.side % 2:
    raise ValueError(f"frame side must be even for H.264, got {size.side}")
  for n, (name, _) in enumerate(identities(size, seed)):
    person_rng = np.random.default_rng(_seed(seed, 1, n))
    identity = face_render.random_identity(person_rng)
    voice = voxceleb2._voice(person_rng)
    gain = float(person_rng.uniform(0.8, 1.25))  # how widely this person articulates
    for c in range(size.clips_per_identity):
      clip_seed = _seed(seed, 2, n, c)
      clip_rng = np.random.default_rng(clip_seed)
      seconds = clip_rng.uniform(*size.seconds)
      scene = face_render.random_scene(clip_rng, size.side, size.side)
      voxceleb2.write_clip(
        os.path.join(out_dir, f"{name}_{c:03d}"),
        identity,
        voice,
        gain,
        scene,
        int(round(seconds * FPS)),
        clip_seed,
        pose_track=frontal_pose_track,
        expression_share=EXPRESSION_SHARE,
        with_parts=False,
      )


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic HDTF of the named size (`SIZES`) under `out_dir`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  write_size(out_dir, SIZES[size], seed)
