"""Synthetic talking faces: speech-like audio and the face motion it drives.

The synthetic twins of VOCASET and BIWI (`synthetic/vocaset.py`, `synthetic/biwi.py`) write
their datasets' raw layouts; this module makes the content. It is built so that a model which
listens can do far better than one which does not:

- Every dataset has one *rig*: a face topology (vertex `i` is the same point on every subject),
  a lip region and an upper-face region, and five unit motion fields over the vertices: jaw
  opening, lip spreading, lip rounding (protrusion), blinking and brow raising.
- Every subject has a neutral face (shared shape plus smooth personal bumps and proportions),
  a voice (pitch, formant scale) and a speaking style (gains of the three mouth fields and a
  coarticulation time constant).
- Audio is a sequence of syllables (optional fricative, then a vowel built from harmonics of a
  gliding pitch shaped by formant resonances) and pauses.
- Mouth motion is a deterministic function of the audio's short-time content: per frame, the
  log energy sets the jaw opening and the balance of high (front F2) to mid (back F2)
  spectral energy sets spreading versus rounding; both are smoothed with the subject's time
  constant and scaled by the subject's gains.
- Upper-face motion (blinks, brow raises) is random and independent of the audio, as in real
  captures; it bounds what any model can predict there.

Units are metres and seconds. Vertex arrays are float32 `[T, V, 3]`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.signal
import scipy.spatial

from data_pipelines.ops import audio as audio_ops

# Motion fields, in the order of `FaceRig.fields` and of the coefficients from `animate`.
FIELDS = ("jaw_open", "lip_spread", "lip_round", "blink", "brow_raise")
# Largest displacement of each field, metres.
FIELD_SCALE = {
  "jaw_open": 0.012,
  "lip_spread": 0.004,
  "lip_round": 0.004,
  "blink": 0.004,
  "brow_raise": 0.003,
}

_MOUTH = (0.0, -0.45)  # mouth centre in the canonical (u, v) face square [-1, 1]^2
_LIP_RADII = (0.35, 0.14)  # lip ellipse radii in (u, v)
_EYES = ((-0.4, 0.25), (0.4, 0.25))
_BROWS = ((-0.4, 0.45), (0.4, 0.45))
_UPPER_FACE_V = 0.1  # vertices with v above this are upper face (eyes, brows, forehead)

# Vowel formants F1, F2, F3 in Hz (adult male averages): /a/, /i/, /u/, /e/, /o/.
_VOWELS = np.array(
  [[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410]],
  np.float64,
)


@dataclasses.dataclass(frozen=True)
class FaceRig:
  """A dataset's face topology: where each vertex sits and how each can move."""

  uv: np.ndarray  # [V, 2] canonical position of each vertex in the face square [-1, 1]^2
  lips: np.ndarray  # [V] bool, the lip region
  upper_face: np.ndarray  # [V] bool, eyes, brows and forehead
  fields: np.ndarray  # [K, V, 3] motion fields in metres at coefficient 1, K = len(FIELDS)

  @property
  def num_vertices(self) -> int:
    return self.uv.shape[0]


@dataclasses.dataclass(frozen=True)
class Subject:
  """One speaker: neutral face, voice and speaking style."""

  name: str
  neutral: np.ndarray  # [V, 3] neutral face, metres
  f0: float  # mean pitch, Hz
  formant_scale: float  # vocal-tract scale: formants are multiplied by it
  mouth_gains: np.ndarray  # [3] gains of jaw_open, lip_spread, lip_round
  smoothing_s: float  # coarticulation time constant, seconds


def make_rig(num_vertices: int, seed: int) -> FaceRig:
  """The face topology with `num_vertices` vertices (5023 for VOCASET, 23370 for BIWI)."""
  rng = np.random.default_rng(seed)
  uv = rng.uniform(-1.0, 1.0, size=(num_vertices, 2))  # [V, 2]
  u, v = uv[:, 0], uv[:, 1]
  lip_distance = np.hypot((u - _MOUTH[0]) / _LIP_RADII[0], (v - _MOUTH[1]) / _LIP_RADII[1])
  lips = lip_distance <= 1.0
  upper_face = v > _UPPER_FACE_V
  lip_weight = np.exp(-(lip_distance**2))  # [V], 1 at the mouth centre, fading outwards
  side = np.clip((u - _MOUTH[0]) / _LIP_RADII[0], -1.5, 1.5)  # [V], -1 left corner, +1 right

  fields = np.zeros((len(FIELDS), num_vertices, 3))  # [K, V, 3]
  # Jaw: what lies below the mouth line drops and swings back; the upper lip lifts a little.
  below = 1.0 / (1.0 + np.exp((v - _MOUTH[1]) / 0.04))
  jaw = below * np.exp(-((u / 0.8) ** 2)) + 0.15 * (1.0 - below) * lip_weight
  fields[0, :, 1] = -jaw * np.where(v < _MOUTH[1], 1.0, -1.0)
  fields[0, :, 2] = -0.3 * jaw * (v < _MOUTH[1])
  # Spread: lip corners move outwards and a little up (as in /i/).
  fields[1, :, 0] = side * lip_weight
  fields[1, :, 1] = 0.2 * np.abs(side) * lip_weight
  # Round: lips pucker forwards and draw in (as in /u/).
  fields[2, :, 2] = lip_weight
  fields[2, :, 0] = -0.5 * side * lip_weight
  for (eu, ev), (bu, bv) in zip(_EYES, _BROWS):
    fields[3, :, 1] -= np.exp(-(((u - eu) / 0.15) ** 2 + ((v - ev) / 0.08) ** 2))
    fields[4, :, 1] += np.exp(-(((u - bu) / 0.25) ** 2 + ((v - bv) / 0.15) ** 2))
  fields[4, :, 1] += 0.3 * np.clip((v - 0.5) / 0.5, 0, 1)  # the forehead follows the brows
  for k, name in enumerate(FIELDS):
    fields[k] *= FIELD_SCALE[name] / np.abs(fields[k]).max()
  return FaceRig(
    uv=uv.astype(np.float32), lips=lips, upper_face=upper_face, fields=fields.astype(np.float32)
  )


def make_subject(rig: FaceRig, name: str, seed: int, female: bool) -> Subject:
  """A speaker with a personal neutral face, voice and speaking style, all drawn from `seed`."""
  rng = np.random.default_rng(seed)
  u, v = rig.uv[:, 0].astype(np.float64), rig.uv[:, 1].astype(np.float64)
  half_width = 0.075 * rng.uniform(0.9, 1.1)
  half_height = 0.10 * rng.uniform(0.9, 1.1)
  depth = 0.09 * np.sqrt(np.clip(1.0 - 0.6 * u**2 - 0.4 * v**2, 0.0, None))
  depth += 0.02 * rng.uniform(0.8, 1.2) * np.exp(-((u / 0.15) ** 2 + ((v + 0.05) / 0.3) ** 2))
  for _ in range(4):  # smooth personal bumps: cheeks, chin, brow ridge
    cu, cv = rng.uniform(-0.8, 0.8, size=2)
    depth += rng.normal(0.0, 0.003) * np.exp(-(((u - cu) ** 2 + (v - cv) ** 2) / 0.1))
  neutral = np.stack([u * half_width, v * half_height, depth], axis=-1)  # [V, 3]
  return Subject(
    name=name,
    neutral=neutral.astype(np.float32),
    f0=float(rng.uniform(180, 240) if female else rng.uniform(95, 140)),
    formant_scale=float(rng.uniform(1.1, 1.2) if female else rng.uniform(0.95, 1.02)),
    mouth_gains=rng.uniform(0.6, 1.3, size=3),
    smoothing_s=float(rng.uniform(0.02, 0.06)),
  )


def speech_audio(duration_s: float, sample_rate: int, subject: Subject, seed: int) -> np.ndarray:
  """Speech-like audio: syllables (fricative + voiced vowel with formants) and pauses.

  Everything audible lies below 8 kHz, so higher rates are synthesised at 16 kHz and resampled.

  Returns:
    [round(duration_s * sample_rate)] float32, peak 0.5, with a faint noise floor.
  """
  num_samples = int(round(duration_s * sample_rate))
  if sample_rate > 16000:
    audio = audio_ops.resample(speech_audio(duration_s, 16000, subject, seed), 16000, sample_rate)
    return np.pad(audio, (0, max(0, num_samples - audio.shape[0])))[:num_samples]
  rng = np.random.default_rng(seed)
  audio = np.zeros((num_samples,), np.float64)  # [S]
  position = int(rng.uniform(0.05, 0.2) * sample_rate)  # sequences start with a short silence
  while position < num_samples:
    if rng.uniform() < 0.25:
      position += int(rng.uniform(0.05, 0.3) * sample_rate)  # a pause
      continue
    if rng.uniform() < 0.35:
      length = int(rng.uniform(0.03, 0.08) * sample_rate)
      _add_at(audio, position, _fricative(length, sample_rate, rng))
      position += length
    length = int(rng.uniform(0.08, 0.25) * sample_rate)
    formants = _VOWELS[rng.integers(len(_VOWELS))] * subject.formant_scale
    _add_at(
      audio,
      position,
      _vowel(length, sample_rate, subject.f0 * rng.uniform(0.9, 1.1), formants, rng),
    )
    position += length + int(rng.uniform(0.0, 0.04) * sample_rate)
  audio *= 0.5 / max(np.abs(audio).max(), 1e-6)
  audio += rng.normal(0.0, 3e-4, size=num_samples)
  return audio.astype(np.float32)


def _add_at(audio: np.ndarray, position: int, piece: np.ndarray) -> None:
  """Adds `piece` into `audio` from `position` on, cutting what runs past the end."""
  piece = piece[: max(0, audio.shape[0] - position)]
  audio[position : position + piece.shape[0]] += piece


def _envelope(length: int, sample_rate: int, attack_s: float, release_s: float) -> np.ndarray:
  envelope = np.ones((length,))
  attack = min(length // 2, int(attack_s * sample_rate))
  release = min(length // 2, int(release_s * sample_rate))
  if attack:
    envelope[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, attack))
  if release:
    envelope[length - release :] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, release))
  return envelope


def _vowel(
  length: int, sample_rate: int, f0: float, formants: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
  """Harmonics of a gliding pitch, each weighted by the formant resonances at its frequency."""
  t = np.arange(length) / sample_rate
  pitch = f0 * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6)))  # [L]
  phase = 2 * np.pi * np.cumsum(pitch) / sample_rate  # [L]
  highest = min(5000.0, 0.45 * sample_rate)
  harmonics = np.arange(1, int(highest // (1.1 * f0)) + 1)  # [K], kept below `highest`
  bandwidths = np.array([80.0, 100.0, 140.0])
  resonance = 1.0 / (1.0 + ((harmonics[:, None] * f0 - formants) / bandwidths) ** 2)  # [K, 3]
  gains = resonance.sum(-1) / np.sqrt(harmonics)  # [K]
  out = np.sin(phase[:, None] * harmonics) @ gains  # [L]
  return out * _envelope(length, sample_rate, 0.02, 0.04) * rng.uniform(0.6, 1.0)


def _fricative(length: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
  """High-passed noise (an /s/ or /f/)."""
  cutoff = min(3000.0, 0.4 * sample_rate)
  sos = scipy.signal.butter(4, cutoff, btype="highpass", fs=sample_rate, output="sos")
  noise = scipy.signal.sosfilt(sos, rng.normal(size=length))
  return 0.4 * noise * _envelope(length, sample_rate, 0.01, 0.02)


def articulation(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
  """The audio's short-time content per frame: [T, 2] of (openness in [0, 1], spread in [-1, 1]).

  Frame `t` looks at a two-frame Hann window centred on the middle of its audio span
  `[t * sr / fps, (t + 1) * sr / fps)`. Openness rises with log energy between a floor and a
  ceiling; spread is the balance of 1.5-3.5 kHz to 0.6-1.3 kHz energy (where front and back
  vowels put F2), positive for /i/-like spectra and negative for /u/-, /o/-like ones, and faded
  out in silence.
  """
  hop = sample_rate / fps
  size = int(2 * hop)
  padded = np.pad(np.asarray(audio, np.float64), (size, size))
  centres = (np.arange(num_frames) + 0.5) * hop + size  # [T] in padded samples
  starts = np.round(centres - size / 2).astype(np.int64)
  frames = padded[starts[:, None] + np.arange(size)] * np.hanning(size)  # [T, W]
  # Scaled so that the sum over bins is the window's mean square, whatever the sample rate.
  power = 2.0 * np.abs(np.fft.rfft(frames, axis=-1)) ** 2 / size**2  # [T, F]
  frequencies = np.fft.rfftfreq(size, 1.0 / sample_rate)

  def band(low: float, high: float) -> np.ndarray:
    return power[:, (frequencies >= low) & (frequencies < high)].sum(-1)

  level_db = 10 * np.log10(band(80, 5000) + 1e-10)
  openness = np.clip((level_db + 40.0) / 22.0, 0.0, 1.0)
  sounding = np.clip((level_db + 50.0) / 15.0, 0.0, 1.0)
  balance = np.log10((band(1500, 3500) + 1e-10) / (band(600, 1300) + 1e-10))
  spread = np.tanh(0.8 * (balance - 0.3)) * sounding
  return np.stack([openness, spread], axis=-1)  # [T, 2]


def _smooth(x: np.ndarray, fps: float, time_constant_s: float) -> np.ndarray:
  """Forward-backward first-order smoothing along axis 0: symmetric, like coarticulation."""
  alpha = 1.0 - np.exp(-1.0 / (fps * time_constant_s))
  out = np.array(x, np.float64)
  for t in range(1, len(out)):
    out[t] = out[t - 1] + alpha * (out[t] - out[t - 1])
  for t in range(len(out) - 2, -1, -1):
    out[t] = out[t + 1] + alpha * (out[t] - out[t + 1])
  return out


def animate(
  rig: FaceRig,
  subject: Subject,
  audio: np.ndarray,
  sample_rate: int,
  fps: float,
  num_frames: int,
  seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Vertices for `num_frames` frames at `fps` driven by `audio`.

  Returns:
    `(vertices, coefficients)`: float32 [T, V, 3] and [T, K] (the weight of each of `FIELDS`).
  """
  rng = np.random.default_rng(seed)
  features = _smooth(articulation(audio, sample_rate, fps, num_frames), fps, subject.smoothing_s)
  openness, spread = features[:, 0], features[:, 1]
  coefficients = np.zeros((num_frames, len(FIELDS)))  # [T, K]
  coefficients[:, 0] = subject.mouth_gains[0] * openness
  coefficients[:, 1] = subject.mouth_gains[1] * np.clip(spread, 0, None)
  coefficients[:, 2] = subject.mouth_gains[2] * np.clip(-spread, 0, None)
  coefficients[:, 3] = _blinks(num_frames, fps, rng)
  coefficients[:, 4] = _brows(num_frames, fps, rng)
  coefficients = coefficients.astype(np.float32)
  vertices = np.einsum("tk,kvc->tvc", coefficients, rig.fields) + subject.neutral  # [T, V, 3]
  return vertices, coefficients


def _blinks(num_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
  """Eye closures at random times (about one every 3 s), each 150-250 ms long."""
  out = np.zeros((num_frames,))
  t = rng.exponential(1.5)
  duration = num_frames / fps
  while t < duration:
    length_s = rng.uniform(0.15, 0.25)
    frames = np.arange(num_frames) / fps
    inside = (frames >= t) & (frames < t + length_s)
    out[inside] = np.maximum(out[inside], np.sin(np.pi * (frames[inside] - t) / length_s))
    t += length_s + rng.exponential(3.0)
  return out


def _brows(num_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
  """Slow brow raises: low-passed noise (below about 0.7 Hz) in roughly [-0.3, 1]."""
  noise = rng.normal(size=num_frames + int(4 * fps))
  sos = scipy.signal.butter(2, min(0.7, 0.4 * fps), fs=fps, output="sos")
  slow = scipy.signal.sosfilt(sos, noise)[int(4 * fps) :]
  return np.clip(0.35 + 1.5 * slow, -0.3, 1.0)


def talking_sequence(
  rig: FaceRig,
  subject: Subject,
  duration_s: float,
  sample_rate: int,
  fps: float,
  seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """One recorded sentence: audio [S] float32 and vertices [T, V, 3] float32 of equal duration.

  `T = round(duration_s * fps)` and `S = round(T * sample_rate / fps)`, so the audio spans the
  frames exactly as a synchronised capture would.
  """
  num_frames = max(1, int(round(duration_s * fps)))
  audio = speech_audio(num_frames / fps, sample_rate, subject, seed)
  vertices, _ = animate(rig, subject, audio, sample_rate, fps, num_frames, seed + 1)
  return audio, vertices


def rig_faces(rig: FaceRig) -> np.ndarray:
  """Triangles [F, 3] int32 over the rig's vertices (Delaunay in the canonical face square)."""
  return scipy.spatial.Delaunay(rig.uv.astype(np.float64)).simplices.astype(np.int32)


def write_template_mesh(path: str, rig: FaceRig, neutral: np.ndarray) -> None:
  """Writes an ASCII PLY of `neutral [V, 3]` with the rig's triangles, as the real datasets
  ship a template mesh (VOCASET's FLAME_sample.ply, BIWI's BIWI.ply) for rendering."""
  faces = rig_faces(rig)
  with open(path, "w") as f:
    f.write("ply\nformat ascii 1.0\n")
    f.write(
      f"element vertex {len(neutral)}\nproperty float x\nproperty float y\nproperty float z\n"
    )
    f.write(f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    np.savetxt(f, np.asarray(neutral, np.float32), fmt="%.7g")
    np.savetxt(f, np.concatenate([np.full((len(faces), 1), 3), faces], axis=1), fmt="%d")


def region_lines(mask: np.ndarray) -> str:
  """A region mask as a vertex-index text file (one 0-based index per line)."""
  return "".join(f"{i}\n" for i in np.flatnonzero(mask))
