"""A small software renderer of faces whose expressions are made of FACS action units.

Feeds the synthetic twins of the video datasets (DFEW, MAFW, FERV39k for expression classes;
BP4D and DISFA for action units). Pure numpy: every frame is a handful of vectorised
implicit-shape tests over small pixel windows, so a 112-pixel frame takes a few milliseconds.

A face is drawn in *face coordinates* (u right, v down; the head ellipse spans v in [-1, 1]
and u in [-a, a]) and seen through a head pose (yaw, pitch, roll, translation, scale). The
head is treated as an ellipsoid for the pose, the silhouette and Lambertian shading, so
features slide across the face as the head turns and the light falls from one side.

What varies, and where it is drawn from:
- identity (`random_identity`): face shape and size, skin, hair, lip, brow and iris colours,
  eye spacing, mouth width and height, brow thickness and arch;
- scene (`random_scene`): background gradient and blobs, light direction, ambient level,
  colour cast, sensor noise; or a lab session (`lab_scene`): a plain backdrop, frontal light;
- pose (`random_pose_track`): a base pose plus slow drift over the clip;
- expression: a track `[T, A]` of action-unit activations in [0, 1] over `RENDER_AUS`
  (`expression_track` for the named emotions, `random_au_track` for independent,
  co-occurring AUs).

Each AU moves the features as FACS describes it: AU1 raises the inner brows, AU2 the outer
brows, AU4 lowers and draws them together (with glabellar lines), AU5 widens the eyes, AU6
raises the cheeks and narrows the eyes from below (crow's feet), AU7 tightens the lids, AU9
wrinkles the nose, AU10 raises the upper lip, AU12 pulls the lip corners up and out, AU14
dimples them, AU15 pulls them down, AU17 raises the chin and lower lip, AU20 stretches the
lips sideways, AU23/AU24 tighten and press the lips thin, AU25 parts them, AU26 drops the
jaw, and AU43 closes the eyes (blinks).

Real faces show expressions through shading as much as through contours, and a low-resolution
frame shows little else, so each AU also shades the tissue it bunches or stretches, with
broad Gaussian brightening and darkening of the skin (`tissue` in `render_frame`): raised
cheeks catch the light with a shadow below them (AU6, a little with AU12), lowered brows
shade the lids and furrow the glabella (AU4), raised brows bunch the forehead (AU1/AU2), the
nose root wrinkles (AU9), shadows form under the raised upper lip (AU10), below the lip corners
(AU15), in the dimples (AU14), beside stretched lips (AU20), around pressed lips (AU23/AU24) and
under the dropped jaw with hollowed cheeks (AU26); the nasolabial folds are broad and deepen
with AU12, AU9, AU10, AU6, AU20. Lips are redder and brows darker than the skin, as in
photographs. Sensor noise is light (std 0.003-0.015) and the labelled twins' heads drift little
within a clip (`EXPRESSION_POSE_DRIFT`), as in face-aligned crops.

Beside the frame, `render_frame` / `render_clip` can return a face-part map (`return_parts`):
per pixel the id of its part in `FACE_PARTS`, labelled from the same implicit shapes the frame
is drawn with (so it follows the pose and the AUs), for part-aware masking in self-supervised
pretraining (MARLIN) and for checking where a model looks.

Expressions unfold over time: every clip starts neutral, rises (onset) to an apex and may
fall back (offset), and the emotions are built so that a single frame is often ambiguous
(neutral, or shared by two emotions: fear begins like surprise, disgust like anger,
disappointment like happiness) while the whole clip is not.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The action units the renderer can draw, in the order of the last axis of an AU track.
RENDER_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26, 43)
AU_INDEX: dict[int, int] = {au: i for i, au in enumerate(RENDER_AUS)}

# Face parts of the per-pixel part map (`render_frame(..., return_parts=True)`): uint8 ids, the
# index into FACE_PARTS. A pixel gets the part whose shape covers at least half of it, the part
# drawn last winning as in the image: background; hair (behind the head and above the
# hairline); skin (face, neck, cheeks, creases, closed lids); brows; eyes (the visible opening:
# sclera and iris, so a closing eye shrinks to a sliver); nose (the bridge and nostrils, a
# region that follows AU9/AU10); mouth (the lips and the open mouth between them). MARLIN-style
# masking ("fasking") masks eyes, nose and mouth first, then skin, background last.
FACE_PARTS: tuple[str, ...] = ("background", "hair", "skin", "brows", "eyes", "nose", "mouth")
PART_BACKGROUND, PART_HAIR, PART_SKIN, PART_BROWS, PART_EYES, PART_NOSE, PART_MOUTH = range(7)

# Skin tones from light to dark (linear-ish RGB in [0, 1]); identities jitter around them.
_SKIN_TONES = np.array(
  [
    [0.96, 0.80, 0.69],
    [0.92, 0.72, 0.58],
    [0.85, 0.64, 0.50],
    [0.76, 0.55, 0.40],
    [0.62, 0.43, 0.30],
    [0.47, 0.32, 0.22],
    [0.34, 0.23, 0.16],
  ],
  np.float32,
)
_HAIR_COLOURS = np.array(
  [
    [0.08, 0.06, 0.05],
    [0.20, 0.13, 0.08],
    [0.40, 0.26, 0.13],
    [0.70, 0.55, 0.30],
    [0.55, 0.20, 0.08],
    [0.60, 0.60, 0.60],
  ],
  np.float32,
)
_IRIS_COLOURS = np.array(
  [[0.25, 0.15, 0.08], [0.12, 0.08, 0.05], [0.25, 0.40, 0.60], [0.30, 0.45, 0.30]], np.float32
)


@dataclasses.dataclass(frozen=True)
class Identity:
  """What stays fixed for one person."""

  face_aspect: float  # half-width / half-height of the head ellipse
  face_scale: float  # head half-height as a fraction of the frame height
  depth: float  # ellipsoid depth / half-height: how strongly yaw and pitch slide features
  skin: np.ndarray  # [3] RGB in [0, 1]
  hair: np.ndarray  # [3]
  lips: np.ndarray  # [3]
  brows: np.ndarray  # [3]
  iris: np.ndarray  # [3]
  eye_spacing: float  # |u| of the eye centres
  eye_height: float  # v of the eye centres
  eye_size: float  # half-width of an eye
  brow_height: float  # v of the brows at rest
  brow_thickness: float
  brow_arch: float
  mouth_width: float  # |u| of the lip corners at rest
  mouth_height: float  # v of the mouth line at rest
  lip_thickness: float
  hairline: float  # v of the hairline at the middle of the forehead


@dataclasses.dataclass(frozen=True)
class Scene:
  """What stays fixed for one clip besides the person: background, light, camera noise."""

  background: np.ndarray  # [H, W, 3] float32 in [0, 1]
  light: np.ndarray  # [3] unit vector towards the light (x right, y down, z to camera)
  ambient: float  # share of light that is not directional
  tint: np.ndarray  # [3] multiplicative colour cast
  noise_std: float  # per-pixel Gaussian noise, in [0, 1] units


def random_identity(rng: np.random.Generator) -> Identity:
  """A random person."""
  skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.93, 1.07, 3)
  hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.15, 3)
  # Lips and brows stand out from the skin as they do in photographs (redder, darker lips;
  # brows darker than the skin even under fair hair), so their movements show at low resolution.
  lips = np.clip(skin * np.array([0.85, 0.45, 0.47]) * rng.uniform(0.8, 0.95), 0, 1)
  brows = np.minimum(hair * 0.6 + 0.02, skin * rng.uniform(0.3, 0.45))
  return Identity(
    face_aspect=float(rng.uniform(0.70, 0.84)),
    face_scale=float(rng.uniform(0.36, 0.42)),
    depth=float(rng.uniform(0.55, 0.75)),
    skin=np.clip(skin, 0, 1).astype(np.float32),
    hair=np.clip(hair, 0, 1).astype(np.float32),
    lips=lips.astype(np.float32),
    brows=np.clip(brows, 0, 1).astype(np.float32),
    iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))],
    eye_spacing=float(rng.uniform(0.27, 0.33)),
    eye_height=float(rng.uniform(-0.16, -0.08)),
    eye_size=float(rng.uniform(0.11, 0.14)),
    brow_height=float(rng.uniform(-0.36, -0.30)),
    brow_thickness=float(rng.uniform(0.045, 0.065)),
    brow_arch=float(rng.uniform(0.01, 0.05)),
    mouth_width=float(rng.uniform(0.20, 0.26)),
    mouth_height=float(rng.uniform(0.46, 0.54)),
    lip_thickness=float(rng.uniform(0.05, 0.07)),
    hairline=float(rng.uniform(-0.78, -0.62)),
  )


def random_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
  """A random background, light and camera for one clip of `height` x `width` frames."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  ys /= max(height - 1, 1)
  xs /= max(width - 1, 1)
  c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
  angle = rng.uniform(0, 2 * np.pi)
  t = np.clip(0.5 + (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle), 0, 1)[..., None]
  background = c0 * (1 - t) + c1 * t
  for _ in range(int(rng.integers(2, 6))):
    cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
    blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))[..., None]
    background = background * (1 - 0.6 * blob) + rng.uniform(0, 1, 3) * 0.6 * blob
  light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.7, 0.3), 1.0])
  return Scene(
    background=background.astype(np.float32),
    light=(light / np.linalg.norm(light)).astype(np.float32),
    ambient=float(rng.uniform(0.35, 0.6)),
    tint=rng.uniform(0.9, 1.1, 3).astype(np.float32),
    noise_std=float(rng.uniform(0.003, 0.015)),
  )


def lab_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
  """One recording session of a lab dataset (BP4D, DISFA): a plain backdrop, frontal light.

  Lab AU datasets film every subject before the same backdrop under the same lights, with
  the face lit evenly from the front; only the session's exposure and the sensor noise
  change a little. `random_scene`'s backgrounds and side lights are those of videos in the
  wild (DFEW, VoxCeleb2).
  """
  ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
  grey = rng.uniform(0.32, 0.4)
  backdrop = np.array([0.92, 0.97, 1.05], np.float32) * grey  # a cool grey cloth
  background = np.broadcast_to(backdrop * (1.08 - 0.16 * ys), (height, width, 3))
  light = np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.25, -0.1), 1.0])
  return Scene(
    background=np.ascontiguousarray(background, np.float32),
    light=(light / np.linalg.norm(light)).astype(np.float32),
    ambient=float(rng.uniform(0.5, 0.6)),
    tint=rng.uniform(0.97, 1.03, 3).astype(np.float32),
    noise_std=float(rng.uniform(0.003, 0.006)),
  )


def random_pose_track(num_frames: int, rng: np.random.Generator, drift: float = 1.0) -> np.ndarray:
  """Head pose per frame `[T, 6]`: yaw, pitch, roll (radians), dx, dy (frame fractions), scale.

  A random base pose plus slow sinusoidal drift, as a seated person moves while talking;
  `drift` scales the drift's amplitude (the expression twins use a small one: their clips are
  face-aligned crops, as DFEW's and BP4D's are).
  """
  t = np.arange(num_frames, dtype=np.float32)[:, None]
  base = np.array(
    [
      rng.normal(0, 0.20),
      rng.normal(0, 0.10),
      rng.normal(0, 0.08),
      rng.normal(0, 0.03),
      rng.normal(0, 0.03),
      rng.uniform(0.92, 1.08),
    ],
    np.float32,
  )
  amplitude = np.array([0.04, 0.02, 0.02, 0.005, 0.005, 0.005], np.float32) * rng.uniform(0, 1, 6)
  amplitude *= drift
  period = rng.uniform(20, 80, 6).astype(np.float32)
  phase = rng.uniform(0, 2 * np.pi, 6).astype(np.float32)
  return (base + amplitude * np.sin(2 * np.pi * t / period + phase)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _soft(distance: np.ndarray, pixel: float) -> np.ndarray:
  """Antialiased coverage of a signed distance (negative inside), `pixel` in the same units."""
  return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray | float) -> None:
  """Alpha-blends `colour` into `image` where `mask` (in [0, 1]) is set, in place."""
  m = mask[..., None]
  image *= 1.0 - m
  image += m * colour


class _FaceGrid:
  """Face coordinates of the pixels around the head, cut into small windows per feature.

  Each facial feature is tested only on the pixels of its own bounding window, so a frame
  costs a few full-head operations plus many tiny ones.
  """

  def __init__(self, u: np.ndarray, v: np.ndarray, pixel: float):
    self.u, self.v, self.pixel = u, v, pixel

  def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice] | None:
    """The pixel window holding every point with u in [u0, u1] and v in [v0, v1]."""
    pad = 2.0 * self.pixel
    inside = (self.u >= u0 - pad) & (self.u <= u1 + pad) & (self.v >= v0 - pad)
    inside &= self.v <= v1 + pad
    rows = np.flatnonzero(inside.any(axis=1))
    if rows.size == 0:
      return None
    cols = np.flatnonzero(inside.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def render_frame(
  identity: Identity,
  scene: Scene,
  activation: np.ndarray,
  pose: np.ndarray,
  rng: np.random.Generator,
  return_parts: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """One frame `[H, W, 3] uint8` (H, W from the scene's background).

  Args:
    identity: the person.
    scene: background, light, noise.
    activation: `[A]` activations in [0, 1] for `RENDER_AUS`.
    pose: `[6]` yaw, pitch, roll, dx, dy, scale (see `random_pose_track`).
    rng: draws the sensor noise.
    return_parts: also return the face-part map `[H, W] uint8` (ids of `FACE_PARTS`), labelled
      from the same implicit shapes the frame is drawn with. The frame is the same either way
      (the map draws no randomness and touches no pixel).

  Returns:
    The frame, or `(frame, parts)` with `return_parts`.
  """
  height, width = scene.background.shape[:2]
  au = {a: float(activation[i]) for a, i in AU_INDEX.items()}
  yaw, pitch, roll, dx, dy, scale = (float(p) for p in pose)
  radius = identity.face_scale * height * scale  # head half-height in pixels
  pixel = 1.0 / radius  # one pixel in face units
  cx, cy = width * (0.5 + dx), height * (0.52 + dy)
  a = identity.face_aspect
  image = scene.background.copy()
  parts = np.zeros((height, width), np.uint8) if return_parts else None

  def finish() -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    frame = _finish(image, scene, rng)
    return (frame, parts) if return_parts else frame

  # Screen-space layers behind the face (hair, neck) on the head's bounding window.
  reach = 1.3 * radius
  top, bottom = max(int(cy - reach), 0), min(int(cy + 1.6 * reach) + 1, height)
  left, right = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
  if top >= bottom or left >= right:
    return finish()
  ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32)
  x, y = (xs - cx) / radius, (ys - cy) / radius
  cos_r, sin_r = np.cos(roll), np.sin(roll)
  px, py = cos_r * x + sin_r * y, -sin_r * x + cos_r * y
  head = image[top:bottom, left:right]
  hair_back = (px / (a * 1.12)) ** 2 + ((py + 0.12) / 1.08) ** 2 - 1.0
  _paint(head, _soft(hair_back, pixel * 2) * (py < 0.35), identity.hair * 0.9)
  neck = np.maximum(np.abs(px) - a * 0.55, 0.7 - py)
  _paint(head, _soft(neck, pixel), identity.skin * 0.75)
  head_parts = None
  if parts is not None:
    head_parts = parts[top:bottom, left:right]
    head_parts[(hair_back <= 0) & (py < 0.35)] = PART_HAIR
    head_parts[neck <= 0] = PART_SKIN

  # Silhouette of the ellipsoid head under yaw/pitch; the jaw drop lengthens the chin.
  jaw = 1.0 + 0.14 * au[26] + 0.03 * au[25]
  half_width = np.sqrt((a * np.cos(yaw)) ** 2 + (identity.depth * np.sin(yaw)) ** 2)
  sv = np.where(py > 0, py / jaw, py)
  r2 = (px / half_width) ** 2 + sv**2
  face = _soft(np.sqrt(r2) - 1.0, pixel * 1.5)

  # Face coordinates (u, v) of each pixel: undo yaw and pitch on the ellipsoid.
  nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
  z = identity.depth * nz
  u = (px - z * np.sin(yaw)) / np.cos(yaw)
  v = (py - z * np.sin(pitch)) / np.cos(pitch)
  v = np.where(v > 0.25, 0.25 + (v - 0.25) / jaw, v)
  grid = _FaceGrid(u, v, pixel)

  # Lambertian shading from the ellipsoid normal.
  normal_dot = (px / half_width) * scene.light[0] + sv * scene.light[1] + nz * scene.light[2]
  shade = scene.ambient + (1.0 - scene.ambient) * np.clip(normal_dot, 0.0, 1.0)

  skin = np.empty_like(head)
  skin[:] = identity.skin
  # The part of each pixel of the face surface, composited with the face like `skin`.
  face_parts = None if parts is None else np.full(u.shape, PART_SKIN, np.uint8)

  def feature(u0: float, u1: float, v0: float, v1: float):
    """(u, v, skin) views of the window around a feature, or None when it is off-frame."""
    window = grid.window(u0, u1, v0, v1)
    if window is None:
      return None
    return u[window], v[window], skin[window]

  def label(box: tuple[float, float, float, float], part: int, distance_fn) -> None:
    """Labels `part` where `distance_fn(u, v)` <= 0 (the shape covers half the pixel or more)."""
    if face_parts is None:
      return
    window = grid.window(*box)
    if window is not None:
      face_parts[window][distance_fn(u[window], v[window]) <= 0] = part

  # Cheeks: AU6 lifts and rounds them, and AU12's pull raises them a little too.
  cheek_lift = min(1.0, au[6] + 0.35 * au[12])
  cheek_v = 0.18 - 0.08 * cheek_lift
  cheek_colour = identity.skin * np.array([1.08, 0.88, 0.86], np.float32)
  for side in (-1.0, 1.0):
    f = feature(side * 0.36 - 0.3, side * 0.36 + 0.3, cheek_v - 0.3, cheek_v + 0.3)
    if f:
      fu, fv, fs = f
      cheek = np.exp(-((fu - side * 0.36) ** 2 + (fv - cheek_v) ** 2) / (2 * 0.11**2))
      _paint(fs, cheek * (0.25 + 0.35 * au[6]), cheek_colour)

  # Shading of the soft tissue the muscles bunch up, the broad light and dark areas by which
  # expressions read in a photograph and at low resolution (where the creases drawn below are
  # thinner than a pixel): each is a Gaussian brightening (> 0) or darkening (< 0) of the skin.
  def tissue(cu: float, cv: float, su: float, sv: float, strength: float) -> None:
    if abs(strength) < 0.005:
      return
    f = feature(cu - 2.5 * su, cu + 2.5 * su, cv - 2.5 * sv, cv + 2.5 * sv)
    if f:
      fu, fv, fs = f
      fs *= (
        1.0 + strength * np.exp(-0.5 * (((fu - cu) / su) ** 2 + ((fv - cv) / sv) ** 2))[..., None]
      )

  eye_v, brow_v0 = identity.eye_height, identity.brow_height
  for side in (-1.0, 1.0):
    # AU6/AU12: the raised cheek catches the light, with a shadow under it and a bulge of
    # the lower lid (AU6, AU7) under the eye.
    tissue(side * 0.36, cheek_v - 0.02, 0.10, 0.08, 0.22 * cheek_lift)
    tissue(side * 0.34, cheek_v + 0.16, 0.13, 0.045, -0.30 * cheek_lift)
    tissue(side * identity.eye_spacing, eye_v + 0.09, 0.09, 0.025, -0.30 * max(au[6], au[7]))
    # AU4: the lowered brows shade the upper lids; AU1/AU2 lift them into the light.
    tissue(side * 0.28, brow_v0 + 0.09, 0.13, 0.035, -0.35 * au[4])
    tissue(side * 0.28, brow_v0 + 0.07, 0.13, 0.035, 0.15 * max(au[1], au[2]))
    # AU15: the depressor bulge and shadow below the lip corners; AU26: hollow cheeks.
    tissue(
      side * (identity.mouth_width + 0.03), identity.mouth_height + 0.12, 0.06, 0.06, -0.5 * au[15]
    )
    tissue(side * 0.42, 0.48, 0.09, 0.12, -0.22 * au[26])
  # AU4: the furrowed glabella between the brows.
  tissue(0.0, brow_v0 + 0.03, 0.06, 0.06, -0.40 * au[4])
  # AU1/AU2: the forehead bunches into broad furrows.
  tissue(0.0, brow_v0 - 0.17, 0.28, 0.05, -0.25 * max(au[1], au[2]))
  # AU9: the wrinkled nose root; AU10: the raised upper lip's shadow.
  tissue(0.0, -0.03, 0.08, 0.05, -0.35 * au[9])
  tissue(0.0, identity.mouth_height - 0.12, 0.10, 0.04, -0.20 * au[10])
  # AU26 (and AU25): the dropped jaw darkens the chin's underside and the lip-chin fold; AU17
  # pushes the chin boss up (the boss itself is drawn below) with a fold above it.
  tissue(0.0, 0.86, 0.25, 0.07, -0.30 * au[26])
  tissue(0.0, identity.mouth_height + 0.16, 0.12, 0.035, -0.30 * au[26] - 0.35 * au[17])
  tissue(0.0, 0.74, 0.12, 0.06, 0.25 * au[17])

  # Hairline.
  def hairline(fu, fv):
    return fv - identity.hairline - 0.18 * (fu / a) ** 2

  f = feature(-1.5, 1.5, -1.5, identity.hairline + 0.3)
  if f:
    fu, fv, fs = f
    _paint(fs, _soft(hairline(fu, fv), pixel * 2), identity.hair)
  label((-1.5, 1.5, -1.5, identity.hairline + 0.3), PART_HAIR, hairline)

  # Creases darken the skin: forehead lines (AU1, AU2), glabellar lines (AU4), nose wrinkles
  # (AU9), crow's feet (AU6) and the nasolabial folds.
  crease_colour = identity.skin * 0.55

  def crease(box: tuple[float, float, float, float], distance_fn, strength: float, blur=1.0):
    if strength <= 0.01:
      return
    f = feature(*box)
    if f:
      fu, fv, fs = f
      _paint(fs, _soft(distance_fn(fu, fv), pixel * blur) * strength, crease_colour)

  raise_strength = max(au[1], au[2])
  for k in range(3):
    band_v = identity.brow_height - 0.14 - 0.06 * k
    crease(
      (-0.33, 0.33, band_v - 0.08, band_v + 0.01),
      lambda fu, fv, b=band_v: np.maximum(
        np.abs(fv - b + 0.05 * (fu / a) ** 2) - 0.006, np.abs(fu) - 0.32
      ),
      0.55 * raise_strength,
    )
  for side in (-1.0, 1.0):
    crease(
      (
        side * 0.045 - 0.02,
        side * 0.045 + 0.02,
        identity.brow_height - 0.05,
        identity.brow_height + 0.09,
      ),
      lambda fu, fv, s=side: np.maximum(
        np.abs(fu - s * 0.045) - 0.006, np.abs(fv - (identity.brow_height + 0.02)) - 0.06
      ),
      0.7 * au[4],
    )
  for k in range(2):
    crease(
      (-0.08, 0.08, -0.04 + 0.04 * k, 0.0 + 0.04 * k),
      lambda fu, fv, k=k: np.maximum(np.abs(fv - (-0.02 + 0.04 * k)) - 0.006, np.abs(fu) - 0.07),
      0.8 * au[9],
    )
  for side in (-1.0, 1.0):
    eu = side * (identity.eye_spacing + identity.eye_size + 0.05)
    for k in (-1, 0, 1):
      crease(
        (eu - 0.045, eu + 0.045, identity.eye_height - 0.04, identity.eye_height + 0.04),
        lambda fu, fv, k=k, s=side, e=eu: np.maximum(
          np.abs((fv - identity.eye_height) - k * 0.5 * (fu - e) * s) - 0.005,
          np.abs(fu - e) - 0.04,
        ),
        0.6 * au[6],
      )

  # Nasolabial folds, deepened by AU6, AU9, AU10, AU12, AU20.
  fold = min(1.0, 0.25 + 0.5 * au[12] + 0.4 * au[9] + 0.4 * au[10] + 0.3 * au[6] + 0.2 * au[20])
  corner_u = identity.mouth_width * (
    1 + 0.3 * au[12] + 0.4 * au[20] - 0.15 * au[23] - 0.12 * au[24]
  )
  corner_v = identity.mouth_height - 0.13 * au[12] + 0.13 * au[15] + 0.03 * au[20]
  corner_v -= 0.02 * au[10]
  fold_half = (corner_v - 0.16) / 2
  for side in (-1.0, 1.0):

    def fold_distance(fu, fv, s=side):
      t = np.clip((fv - 0.16) / max(corner_v - 0.16, 1e-3), 0, 1)
      fold_u = s * (0.13 + (corner_u + 0.05 - 0.13) * t)
      return np.maximum(np.abs(fu - fold_u) - 0.014, np.abs(fv - (corner_v + 0.16) / 2) - fold_half)

    lo, hi = sorted((side * 0.12, side * (corner_u + 0.07)))
    crease((lo, hi, 0.14, corner_v + 0.02), fold_distance, 0.7 * fold, 2.5)

  # Around the lip corners: AU14's dimples deepen into shadows, AU20 stretches the skin beside
  # them, and AU23/AU24's pressed lips push a bulge of skin out above and below.
  for side in (-1.0, 1.0):
    tissue(side * (corner_u + 0.05), corner_v, 0.035, 0.05, -0.40 * au[14])
    tissue(side * (corner_u + 0.06), corner_v + 0.06, 0.05, 0.07, -0.25 * au[20])
  pressed = max(au[23], au[24])
  tissue(0.0, identity.mouth_height - 0.10, 0.14, 0.03, 0.25 * pressed)
  tissue(0.0, identity.mouth_height + 0.11, 0.14, 0.03, 0.25 * pressed)

  # Nose: shading along the bridge and the nostrils (AU9/AU10 lift and flare them).
  nostril_v = 0.21 - 0.025 * au[9] - 0.015 * au[10]
  for side in (-1.0, 1.0):
    nu = side * (0.055 + 0.015 * au[9])
    f = feature(nu - 0.04, nu + 0.04, nostril_v - 0.025, nostril_v + 0.025)
    if f:
      fu, fv, fs = f
      nostril = np.sqrt(((fu - nu) / 0.035) ** 2 + ((fv - nostril_v) / 0.018) ** 2) - 1
      _paint(fs, _soft(nostril, pixel / 0.035 * 1.2) * 0.8, identity.skin * 0.35)
  f = feature(0.0, 0.06, -0.15, 0.19)
  if f:
    fu, fv, fs = f
    bridge = np.maximum(np.abs(fu - 0.03) - 0.012, np.abs(fv - 0.02) - 0.15)
    _paint(fs, _soft(bridge, pixel * 2) * 0.25, identity.skin * 0.7)
  # The nose as a part: the bridge widening down to the outer edges of the nostrils.
  nose_top, nose_bottom = -0.13, nostril_v + 0.025
  nose_half = 0.055 + 0.015 * au[9] + 0.035

  def nose(fu, fv):
    t = np.clip((fv - nose_top) / (nose_bottom - nose_top), 0.0, 1.0)
    half_width = 0.03 + (nose_half - 0.03) * t**2
    return np.maximum(np.abs(fu) - half_width, np.maximum(nose_top - fv, fv - nose_bottom))

  label((-nose_half, nose_half, nose_top, nose_bottom), PART_NOSE, nose)

  # Chin boss and dimples: AU17 wrinkles the chin, AU14 dimples the mouth corners.
  chin_v = 0.78 - 0.04 * au[17]
  if au[17] > 0.01:
    f = feature(-0.25, 0.25, chin_v - 0.12, chin_v + 0.12)
    if f:
      fu, fv, fs = f
      chin = np.exp(-((fu / 0.12) ** 2 + ((fv - chin_v) / 0.05) ** 2))
      _paint(fs, chin * 0.45 * au[17], identity.skin * 0.6)
  if au[14] > 0.01:
    for side in (-1.0, 1.0):
      du = side * (corner_u + 0.04)
      f = feature(du - 0.03, du + 0.03, corner_v - 0.03, corner_v + 0.03)
      if f:
        fu, fv, fs = f
        dimple = np.sqrt((fu - du) ** 2 + (fv - corner_v) ** 2) - 0.018
        _paint(fs, _soft(dimple, pixel * 1.5) * 0.7 * au[14], identity.skin * 0.5)

  # Brows: AU1 lifts the inner ends, AU2 the outer ends, AU4 lowers them and pulls them in.
  inner_u, outer_u = 0.10 - 0.05 * au[4], 0.47
  inner_v = identity.brow_height - 0.15 * au[1] + 0.10 * au[4] + 0.03 * au[9]
  outer_v = identity.brow_height - 0.14 * au[2] + 0.04 * au[4] - 0.03 * au[1]
  for side in (-1.0, 1.0):
    lo, hi = sorted((side * inner_u, side * outer_u))
    v_lo = min(inner_v, outer_v) - identity.brow_arch - identity.brow_thickness
    f = feature(lo, hi, v_lo, max(inner_v, outer_v) + identity.brow_thickness)
    if f:
      fu, fv, fs = f
      su = side * fu
      t = np.clip((su - inner_u) / (outer_u - inner_u), 0, 1)
      brow_v = inner_v + (outer_v - inner_v) * t - identity.brow_arch * np.sin(np.pi * t)
      thickness = identity.brow_thickness * (1.0 - 0.4 * t)
      brow = np.maximum(np.abs(fv - brow_v) - thickness / 2, np.maximum(inner_u - su, su - outer_u))
      _paint(fs, _soft(brow, pixel), identity.brows)
      if face_parts is not None:
        face_parts[grid.window(lo, hi, v_lo, max(inner_v, outer_v) + identity.brow_thickness)][
          brow <= 0
        ] = PART_BROWS

  # Eyes: AU5 raises the upper lid, AU6 lifts the lower lid, AU7 tightens both, AU43 closes.
  upper = 0.055 * (1.0 + 1.0 * au[5] - 0.5 * au[7] - 0.3 * au[6]) * (1.0 - au[43])
  lower = 0.045 * (1.0 - 0.55 * au[6] - 0.4 * au[7]) * (1.0 - 0.8 * au[43])
  sclera_colour = np.array([0.92, 0.90, 0.88], np.float32)
  for side in (-1.0, 1.0):
    eu = side * identity.eye_spacing
    f = feature(
      eu - identity.eye_size - 0.01,
      eu + identity.eye_size + 0.01,
      identity.eye_height - upper - 0.02,
      identity.eye_height + lower + 0.01,
    )
    if not f:
      continue
    fu, fv, fs = f
    du = (fu - eu) / identity.eye_size
    dv = fv - identity.eye_height
    profile = np.clip(1.0 - du**2, 0.0, 1.0)
    opening = np.maximum(np.maximum(-upper * profile - dv, dv - lower * profile), np.abs(du) - 1.0)
    lash = _soft(np.abs(dv + upper * profile) - 0.008, pixel) * (np.abs(du) < 1.05)
    iris = np.sqrt((du * identity.eye_size) ** 2 + dv**2)
    sclera = np.empty_like(fs)
    sclera[:] = sclera_colour
    _paint(sclera, _soft(iris - 0.05, pixel), identity.iris)
    _paint(sclera, _soft(iris - 0.022, pixel), 0.0)
    _paint(fs, _soft(opening, pixel), sclera)
    _paint(fs, lash, identity.brows * 0.5)
    if face_parts is not None:
      window = grid.window(
        eu - identity.eye_size - 0.01,
        eu + identity.eye_size + 0.01,
        identity.eye_height - upper - 0.02,
        identity.eye_height + lower + 0.01,
      )
      face_parts[window][opening <= 0] = PART_EYES

  # Mouth: corners (AU12 up/out, AU15 down, AU20 out), opening (AU25 parts, AU26 drops the
  # jaw, AU10 lifts the upper lip), lip thickness (AU23/AU24 thin them, AU17 pushes the lower
  # lip up).
  gap = lip_gap(au[25], au[26], au[10], au[24])
  thin = 1.0 - 0.55 * au[23] - 0.45 * au[24]
  upper_thickness = identity.lip_thickness * 0.8 * thin
  lower_thickness = identity.lip_thickness * (1.0 + 0.3 * au[17]) * thin
  mouth_top = min(identity.mouth_height, corner_v) - 0.3 * gap - 0.04 - upper_thickness
  mouth_bottom = max(identity.mouth_height, corner_v) + 0.7 * gap + lower_thickness + 0.01
  f = feature(-corner_u, corner_u, mouth_top, mouth_bottom)
  if f:
    fu, fv, fs = f
    su = np.clip(np.abs(fu) / corner_u, 0.0, 1.5)
    bulge = np.clip(1.0 - su**2, 0.0, 1.0)
    mid = identity.mouth_height + (corner_v - identity.mouth_height) * su**2 - 0.02 * au[17]
    inner_top = mid - (0.3 * gap + 0.02 * au[10]) * bulge
    inner_bottom = mid + 0.7 * gap * bulge
    outer_top = inner_top - upper_thickness * np.sqrt(bulge) + 0.008 * np.exp(-((fu / 0.03) ** 2))
    outer_bottom = inner_bottom + lower_thickness * np.sqrt(bulge)
    within = np.abs(fu) - corner_u
    lips = np.maximum(np.maximum(outer_top - fv, fv - outer_bottom), within)
    _paint(fs, _soft(lips, pixel), identity.lips)
    if face_parts is not None:
      face_parts[grid.window(-corner_u, corner_u, mouth_top, mouth_bottom)][lips <= 0] = PART_MOUTH
    if gap > 0.002:
      interior = np.maximum(np.maximum(inner_top - fv, fv - inner_bottom), within)
      inside = np.empty_like(fs)
      inside[:] = np.array([0.22, 0.08, 0.08], np.float32)
      teeth = np.maximum(inner_top - fv, fv - (inner_top + 0.035))
      _paint(inside, _soft(teeth, pixel), np.array([0.9, 0.88, 0.8], np.float32))
      _paint(fs, _soft(interior, pixel), inside)

  skin *= shade[..., None]
  skin *= scene.tint
  _paint(head, face, skin)
  if head_parts is not None:
    on_face = r2 <= 1.0  # where the face's coverage is at least one half
    head_parts[on_face] = face_parts[on_face]
  return finish()


def lip_gap(au25: float, au26: float, au10: float, au24: float) -> float:
  """The inner-lip gap at the mouth's centre, in head half-heights: AU25 parts the lips, AU26
  drops the jaw, AU10 lifts the upper lip and AU24 presses the lips back together."""
  return (0.05 * au25 + 0.12 * au26 + 0.03 * au10) * (1.0 - 0.8 * au24)


def _finish(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """Adds sensor noise and quantises to uint8."""
  image += scene.noise_std * rng.standard_normal(image.shape, dtype=np.float32)
  return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_clip(
  identity: Identity,
  scene: Scene,
  track: np.ndarray,
  poses: np.ndarray,
  rng: np.random.Generator,
  return_parts: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Renders a clip `[T, H, W, 3] uint8` from an AU track `[T, A]` and poses `[T, 6]`.

  With `return_parts`, returns `(frames, parts [T, H, W] uint8)`: the face-part map of every
  frame (ids of `FACE_PARTS`; see `render_frame`).
  """
  if track.shape[1] != len(RENDER_AUS) or len(track) != len(poses):
    raise ValueError(f"track {track.shape} and poses {poses.shape} disagree")
  if not return_parts:
    return np.stack([render_frame(identity, scene, a, p, rng) for a, p in zip(track, poses)])
  rendered = [render_frame(identity, scene, a, p, rng, True) for a, p in zip(track, poses)]
  return np.stack([f for f, _ in rendered]), np.stack([m for _, m in rendered])


# ----------------------------------------------------------------------------------------------
# Expressions over time.


@dataclasses.dataclass(frozen=True)
class Phase:
  """One movement of an expression: these AUs rise, hold and (maybe) fall together.

  Times are fractions of the clip's expressive segment; `tremor` > 0 modulates the apex
  with oscillations of that many cycles per segment (for anxious, unsettled movements).
  """

  aus: dict[int, float]  # AU -> peak activation
  start: float
  end: float
  tremor: float = 0.0


# The emotions as programs of phases. Every clip opens neutral; the segment placement and
# lengths are random. Several emotions share phases, so a frame drawn at a random time is
# often neutral or common to two classes, while the order and the combination over the
# whole clip tell them apart.
_SMILE = {6: 0.7, 12: 1.0, 25: 0.3}
_BROWS_UP = {1: 1.0, 2: 1.0, 5: 0.8}
_SURPRISE = {**_BROWS_UP, 25: 0.8, 26: 0.9}
_FROWN = {4: 1.0, 7: 0.7}
EXPRESSIONS: dict[str, tuple[Phase, ...]] = {
  "neutral": (),
  "happiness": (Phase(_SMILE, 0.0, 1.0),),
  "sadness": (Phase({1: 0.9, 4: 0.5}, 0.0, 1.0), Phase({15: 0.9, 17: 0.6}, 0.35, 1.0)),
  "anger": (Phase(_FROWN, 0.0, 1.0), Phase({23: 0.8, 24: 0.8}, 0.35, 1.0)),
  "surprise": (Phase(_SURPRISE, 0.0, 0.55),),
  "disgust": (Phase({4: 0.6, 7: 0.5}, 0.0, 0.55), Phase({9: 1.0, 10: 0.8, 15: 0.6}, 0.3, 1.0)),
  "fear": (
    Phase(_SURPRISE, 0.0, 0.45),
    Phase({1: 0.9, 4: 0.8, 5: 0.6, 20: 1.0, 25: 0.6}, 0.35, 1.0),
  ),
  "contempt": (Phase({12: 0.6, 14: 0.9}, 0.0, 0.5), Phase({14: 0.9, 24: 0.6, 4: 0.3}, 0.4, 1.0)),
  "anxiety": (Phase({1: 0.6, 4: 0.7, 20: 0.8, 24: 0.5}, 0.0, 1.0, tremor=3.0),),
  "helplessness": (
    Phase({1: 1.0, 4: 0.6}, 0.0, 1.0),
    Phase({25: 0.7, 26: 0.6}, 0.2, 0.6),
    Phase({15: 0.7}, 0.5, 1.0),
  ),
  "disappointment": (
    Phase({6: 0.4, 12: 0.8}, 0.0, 0.45),
    Phase({15: 0.9, 17: 0.8, 4: 0.3}, 0.4, 1.0),
  ),
}


def _envelope(t: np.ndarray, start: float, end: float, ramp: float) -> np.ndarray:
  """Raised-cosine onset from `start`, apex, raised-cosine offset ending at `end`."""
  ramp = max(min(ramp, (end - start) / 2), 1e-3)
  rise = np.clip((t - start) / ramp, 0.0, 1.0)
  fall = np.clip((end - t) / ramp, 0.0, 1.0)
  return 0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall))


def _blinks(num_frames: int, rng: np.random.Generator, rate: float = 0.02) -> np.ndarray:
  """AU43 track `[T]`: short blinks (3-5 frames) at random times."""
  track = np.zeros(num_frames, np.float32)
  t = np.arange(num_frames)
  for start in np.flatnonzero(rng.random(num_frames) < rate):
    length = rng.integers(3, 6)
    track = np.maximum(track, _envelope(t, start, start + length, length / 2).astype(np.float32))
  return track


def expression_track(name: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
  """AU activations `[T, A]` of the emotion `name` (a key of `EXPRESSIONS`) over one clip.

  The expressive segment starts after a neutral lead of 10-35% of the clip and lasts 45-75%
  of it; the overall intensity is drawn per clip, so some clips are subtle. Blinks and a
  little mouth movement (as in speech) are added to every clip, neutral included.
  """
  if name not in EXPRESSIONS:
    raise ValueError(f"unknown expression {name!r}; known: {sorted(EXPRESSIONS)}")
  t = np.arange(num_frames, dtype=np.float32) / max(num_frames - 1, 1)
  seg_start = rng.uniform(0.10, 0.35)
  seg_end = min(1.0, seg_start + rng.uniform(0.45, 0.75))
  intensity = rng.uniform(0.55, 1.0)
  track = np.zeros((num_frames, len(RENDER_AUS)), np.float32)
  for phase in EXPRESSIONS[name]:
    start = seg_start + phase.start * (seg_end - seg_start)
    end = seg_start + phase.end * (seg_end - seg_start)
    if phase.end >= 1.0 and rng.random() < 0.5:
      end = 1.0 + 1e-3  # the apex is held to the end of the clip half of the time
    envelope = _envelope(t, start, end, ramp=rng.uniform(0.08, 0.2))
    if phase.tremor:
      cycles = phase.tremor * rng.uniform(0.8, 1.25)
      envelope = envelope * (0.6 + 0.4 * np.sin(2 * np.pi * cycles * (t - start) / (end - start)))
    for au, peak in phase.aus.items():
      column = AU_INDEX[au]
      value = peak * intensity * rng.uniform(0.85, 1.0) * envelope
      track[:, column] = np.maximum(track[:, column], value)
  # Speech-like mouth movement and blinks, independent of the emotion.
  talk = np.clip(rng.normal(0, 0.15, num_frames), 0, None) * (rng.random() < 0.6)
  track[:, AU_INDEX[25]] = np.maximum(track[:, AU_INDEX[25]], talk)
  track[:, AU_INDEX[43]] = _blinks(num_frames, rng)
  track += rng.normal(0, 0.02, track.shape).astype(np.float32)
  return np.clip(track, 0.0, 1.0)


# AU pairs that tend to fire together in spontaneous data (BP4D, DISFA): the second follows
# the first with this probability.
_COOCCURRENCE: tuple[tuple[int, int, float], ...] = (
  (1, 2, 0.7),
  (12, 6, 0.6),
  (6, 12, 0.5),
  (4, 7, 0.5),
  (25, 26, 0.5),
  (26, 25, 0.9),
  (15, 17, 0.5),
  (23, 24, 0.5),
  (10, 12, 0.4),
  (9, 10, 0.5),
  (14, 12, 0.3),
)


def random_au_track(
  num_frames: int,
  rng: np.random.Generator,
  active_share: float = 0.22,
  mean_duration: float = 30.0,
) -> np.ndarray:
  """Independent, co-occurring AU events `[T, A]` for the action-unit twins (BP4D, DISFA).

  Each AU fires on its own as a sequence of events (onset, apex at a random peak, offset)
  separated by random gaps so that it is active about `active_share` of the time; some
  events pull a partner AU along (`_COOCCURRENCE`), giving the correlations spontaneous
  data has. AU43 carries blinks only.
  """
  t = np.arange(num_frames, dtype=np.float32)
  track = np.zeros((num_frames, len(RENDER_AUS)), np.float32)
  mean_gap = mean_duration * (1.0 - active_share) / active_share
  events: list[tuple[int, float, float, float]] = []
  for au in RENDER_AUS:
    if au == 43:
      continue
    start = -rng.uniform(0, mean_duration + mean_gap)
    while start < num_frames:
      duration = rng.uniform(0.4, 1.6) * mean_duration
      events.append((au, start, start + duration, rng.uniform(0.45, 1.0)))
      for first, second, probability in _COOCCURRENCE:
        if first == au and rng.random() < probability:
          shift = rng.uniform(-3, 3)
          events.append((second, start + shift, start + duration + shift, rng.uniform(0.4, 1.0)))
      start += duration + rng.exponential(mean_gap)
  for au, start, end, peak in events:
    ramp = rng.uniform(3, 8)
    column = AU_INDEX[au]
    track[:, column] = np.maximum(track[:, column], peak * _envelope(t, start, end, ramp))
  track[:, AU_INDEX[43]] = _blinks(num_frames, rng)
  return track


def au_occurrence(track: np.ndarray, aus: tuple[int, ...], threshold: float = 0.3) -> np.ndarray:
  """Occurrence labels `[T, len(aus)]` in {0, 1}: activation at or above `threshold`."""
  return (track[:, [AU_INDEX[a] for a in aus]] >= threshold).astype(np.int64)


def au_intensity(track: np.ndarray, aus: tuple[int, ...]) -> np.ndarray:
  """FACS-style intensities `[T, len(aus)]` on DISFA's 0-5 scale (0 absent, 5 maximum)."""
  return np.rint(track[:, [AU_INDEX[a] for a in aus]] * 5.0).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Whole clips, as the synthetic twins use them.

# Pose drift within a clip of the labelled twins, relative to `random_pose_track`'s: their clips
# are face crops (DFEW's are aligned by a face detector, BP4D's subjects sit before a fixed
# camera), so the head moves less than the expression does.
EXPRESSION_POSE_DRIFT = 0.3


def render_expression_clip(
  name: str,
  num_frames: int,
  height: int,
  width: int,
  rng: np.random.Generator,
  identity: Identity | None = None,
) -> np.ndarray:
  """A clip `[T, H, W, 3] uint8` of a random (or the given) person showing emotion `name`."""
  identity = identity or random_identity(rng)
  scene = random_scene(rng, height, width)
  track = expression_track(name, num_frames, rng)
  poses = random_pose_track(num_frames, rng, drift=EXPRESSION_POSE_DRIFT)
  return render_clip(identity, scene, track, poses, rng)


def render_au_clip(
  num_frames: int,
  height: int,
  width: int,
  rng: np.random.Generator,
  identity: Identity,
  scene: Scene | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A clip of `identity` with independent, co-occurring AUs: `(frames, track [T, A])`.

  In the given scene (a lab session, `lab_scene`), or a random one.
  """
  scene = scene or random_scene(rng, height, width)
  track = random_au_track(num_frames, rng)
  poses = random_pose_track(num_frames, rng, drift=EXPRESSION_POSE_DRIFT)
  frames = render_clip(identity, scene, track, poses, rng)
  return frames, track
