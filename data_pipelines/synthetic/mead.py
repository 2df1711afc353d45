"""Synthetic twin of MEAD with per-frame FLAME parameters, in the layout `builders/mead.py` reads.

Layout written to `out_dir` (docs/design.md section 18):

    <actor>/audio/<emotion>/level_<k>/<NNN>.wav   16 kHz mono 16-bit PCM
    <actor>/flame/<emotion>/level_<k>/<NNN>.npz   shape [100], expression [T, 50], jaw_pose
                                                  [T, 3], float32, 25 fps, as long as the audio
    head_model/                                   the synthetic head model (`head_model.py`)
    regions/lips.txt, regions/upper_face.txt      the rig's masks on the FLAME-topology mesh

Every clip is generated from the head model: the actor's identity is a random `shape`; the
speech (`talking_mesh.speech_audio`, the actor's voice) drives the jaw (a rotation about the
jaw joint following the audio's openness) and the lips (the model's lip spread and round
expression components, by `talking_mesh.animate`'s mapping), with random blinks and brow
motion as upper-face noise. The emotion adds a fixed expression pattern (per emotion; each
actor's a personal variant of it) scaled by the intensity (levels 1-3: 0.4, 0.7, 1.0): the
brows, eyes and forehead (the model's upper-face components) and the mouth corners (spread,
round and the mouth components), rising over the first 0.2-0.5 s and held with a slow sway.
So the emotion is visible in the upper face and the mouth corners over the whole sequence,
while the lip motion that follows the speech is the same whatever the emotion.

Actors and clips depend on `size` (all eight emotions, neutral at level 1 as in MEAD, the others
at levels 1-3: 22 emotion-levels per actor):

- tiny: training actors M003, W009 and test actor M037, one clip per emotion-level, 0.6-0.9 s
  (66 clips);
- demo: training actors M003 M005 M007 W009 W011 W014 (two clips per emotion-level), validation
  M032, test M037 W037 (one each), 1.0-2.0 s (330 clips).
"""

from __future__ import annotations

import os

import numpy as np
import soundfile

from data_pipelines.builders import mead as mead_builder
from data_pipelines.synthetic import head_model, talking_mesh
from data_pipelines.synthetic import vocaset as vocaset_twin

EMOTIONS = mead_builder.EMOTIONS
FPS = mead_builder.FPS
SAMPLE_RATE = 16000
NUM_SHAPE, NUM_EXPRESSION = 100, 50
LEVEL_SCALE = (0.4, 0.7, 1.0)
JAW_RADIANS = 0.2  # jaw opening per unit of the audio's openness (times the actor's gain)
# The head model's named expression components (`head_model._expression_basis`): lip spread,
# lip round, blink, brow raise; then alternately mouth- and upper-face-localised fields.
_SPREAD, _ROUND, _BLINK, _BROW = range(4)
_MOUTH = tuple(range(4, NUM_EXPRESSION, 2))
_UPPER = tuple(range(5, NUM_EXPRESSION, 2))
# Per emotion: lip spread, lip round, eye closing, brow raise (the recognisable core).
_CORE = {
  "neutral": (0.0, 0.0, 0.0, 0.0),
  "angry": (-0.4, 0.3, 0.5, -1.2),
  "contempt": (0.5, -0.3, 0.2, -0.3),
  "disgusted": (-0.3, -0.5, 0.7, -0.7),
  "fear": (-0.6, 0.2, -0.5, 1.0),
  "happy": (1.2, -0.3, 0.4, 0.3),
  "sad": (-0.7, 0.4, 0.3, 0.8),
  "surprised": (-0.3, 0.6, -0.7, 1.4),
}

_SIZES = {
  # size: ({actor: clips per emotion-level}, duration range in seconds)
  "tiny": ({"M003": 1, "W009": 1, "M037": 1}, (0.6, 0.9)),
  "demo": (
    {
      **{a: 2 for a in ("M003", "M005", "M007", "W009", "W011", "W014")},
      **{a: 1 for a in ("M032", "M037", "W037")},
    },
    (1.0, 2.0),
  ),
}


def _seed(*keys: int) -> int:
  return int(np.random.SeedSequence([20, *keys]).generate_state(1)[0])


def emotion_patterns(seed: int) -> np.ndarray:
  """[8, 50] each emotion's expression at full intensity: its core on the named components,
  plus a random pattern (norm 1.2) on the upper-face and (norm 0.5) on the mouth components."""
  rng = np.random.default_rng(_seed(seed, 1))
  patterns = np.zeros((len(EMOTIONS), NUM_EXPRESSION))
  for e, emotion in enumerate(EMOTIONS):
    if emotion == "neutral":
      continue
    patterns[e, :4] = _CORE[emotion]
    for components, norm in ((_UPPER, 1.2), (_MOUTH, 0.5)):
      values = rng.normal(size=len(components))
      patterns[e, list(components)] = norm * values / np.linalg.norm(values)
  return patterns


def _field_to_expression(rig: talking_mesh.FaceRig, basis: np.ndarray) -> np.ndarray:
  """Factors [4] turning the rig's lip spread, round, blink and brow coefficients into the
  head model's expression coefficients (its first four components are those fields, rescaled)."""
  fields = [
    talking_mesh.FIELDS.index(n) for n in ("lip_spread", "lip_round", "blink", "brow_raise")
  ]
  return np.array(
    [np.abs(rig.fields[f]).max() / np.abs(basis[:, :, k]).max() for k, f in enumerate(fields)]
  )


def clip_parameters(
  audio: np.ndarray,
  voice: talking_mesh.Subject,
  rig: talking_mesh.FaceRig,
  factors: np.ndarray,
  pattern: np.ndarray,
  seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """One clip's `expression [T, 50]` and `jaw_pose [T, 3]` for `audio` and an emotion
  `pattern [50]` already scaled by intensity and actor."""
  num_frames = int(round(len(audio) * FPS / SAMPLE_RATE))
  rng = np.random.default_rng(seed)
  _, coefficients = talking_mesh.animate(rig, voice, audio, SAMPLE_RATE, FPS, num_frames, seed)
  expression = np.zeros((num_frames, NUM_EXPRESSION))
  expression[:, :4] = coefficients[:, 1:5] * factors  # speech on the lips, blinks, brows
  time = np.arange(num_frames) / FPS
  onset = rng.uniform(0.2, 0.5)
  rise = np.clip(time / onset, 0.0, 1.0)
  envelope = rise * rise * (3 - 2 * rise)  # smoothstep
  envelope *= 1.0 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * time + rng.uniform(0, 6))
  expression += envelope[:, None] * pattern
  jaw = np.zeros((num_frames, 3))
  jaw[:, 0] = JAW_RADIANS * coefficients[:, 0]  # about the left-right axis: the chin drops
  return expression.astype(np.float32), jaw.astype(np.float32)


def write(out_dir: str, size: str = "tiny", seed: int = 0) -> None:
  """Writes a synthetic MEAD with FLAME parameters in the layout of `builders/mead.py`."""
  if size not in _SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZES)}")
  actors, (shortest, longest) = _SIZES[size]
  head_model.write(os.path.join(out_dir, "head_model"), seed=seed)
  model, _ = head_model.make_head_model(seed)
  # The head model's mesh is the VOCASET twin's rig, whose motion fields drive the speech.
  rig = talking_mesh.make_rig(vocaset_twin.NUM_VERTICES, vocaset_twin._seed(seed, 0))
  factors = _field_to_expression(rig, model["shapedirs"][:, :, head_model.NUM_SHAPE :])
  patterns = emotion_patterns(seed)
  os.makedirs(os.path.join(out_dir, "regions"), exist_ok=True)
  for region, mask in (("lips", rig.lips), ("upper_face", rig.upper_face)):
    with open(os.path.join(out_dir, "regions", f"{region}.txt"), "w") as f:
      f.write(talking_mesh.region_lines(mask))
  for a, (actor, clips) in enumerate(actors.items()):
    rng = np.random.default_rng(_seed(seed, 2, a))
    voice = talking_mesh.make_subject(rig, actor, _seed(seed, 3, a), female=actor[0] == "W")
    shape = rng.normal(size=NUM_SHAPE).astype(np.float32)
    # The actor's way of showing each emotion: a personal scale and a small variation.
    personal = patterns * rng.uniform(0.8, 1.2) + 0.15 * rng.normal(size=patterns.shape)
    personal[EMOTIONS.index("neutral")] = 0.0
    for e, emotion in enumerate(EMOTIONS):
      for level in (1,) if emotion == "neutral" else mead_builder.LEVELS:
        for n in range(1, clips + 1):
          clip_seed = _seed(seed, 4, a, e, level, n)
          duration = np.random.default_rng(clip_seed).uniform(shortest, longest)
          num_frames = int(round(duration * FPS))
          audio = talking_mesh.speech_audio(num_frames / FPS, SAMPLE_RATE, voice, clip_seed)
          expression, jaw = clip_parameters(
            audio, voice, rig, factors, LEVEL_SCALE[level - 1] * personal[e], clip_seed + 1
          )
          relative = os.path.join(emotion, f"level_{level}", f"{n:03d}")
          for kind in ("audio", "flame"):
            os.makedirs(
              os.path.join(out_dir, actor, kind, emotion, f"level_{level}"), exist_ok=True
            )
          soundfile.write(
            os.path.join(out_dir, actor, "audio", relative + ".wav"),
            audio,
            SAMPLE_RATE,
            subtype="PCM_16",
          )
          np.savez(
            os.path.join(out_dir, actor, "flame", relative + ".npz"),
            shape=shape,
            expression=expression,
            jaw_pose=jaw,
          )
