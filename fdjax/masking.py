"""Token masks for masked video autoencoders: which tubelet tokens the encoder sees.

Where it sits: the `mae_video` task (`fdjax/tasks/mae_video.py`) draws one mask per clip inside
its loss, on device, from per-example keys, and gives the visible and masked token indices to
`fdjax.models.video_mae.VideoMAE`. Tokens of a clip form a grid `[steps, h, w]` (time steps of
`tubelet_size` frames, rows, columns of patches) flattened row-major, so token `i` is
`(t, y, x) = unravel(i, (steps, h, w))`.

Every generator is a pure jnp function of one key (jit- and vmap-able) returning
`(visible [N - M] int32, masked [M] int32)`: a partition of `range(N)`, each part in ascending
order, with a count M fixed by the grid and the ratio alone (`num_masked`), so batch shapes stay
static. Kinds:

- `random`  (MAE): every token on its own, M = round(ratio * N).
- `tube`    (VideoMAE): one spatial mask repeated over all time steps,
  M = steps * round(ratio * h w).
- `frame`   : whole time steps, M = round(ratio * steps) * h w.
- `part_window` (MAE-DFER): tube masking inside local spatial windows of `window` = (wh, ww)
  tokens, the same number round(ratio * wh ww) masked in every window, so every part of the face
  keeps the same visible fraction; M = steps * windows * round(ratio * wh ww).
- `face_region` (MARLIN's "fasking"): tube masking that takes the tokens of the face's most
  informative parts first: eyes, nose and mouth, then brows, skin, hair, and background last;
  random order within a priority level. It needs each token's face part (`token_face_parts`,
  from a per-pixel face-part map); M as for `tube`.

Masks are drawn by ranking: each token gets a score (uniform noise, plus a priority for
`face_region`), and the M highest-scoring tokens (or spatial positions, for tube-like kinds) are
masked. Ranking integer ranks rather than floats makes the count exact even under ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.synthetic import face_render

Array = jax.Array

KINDS = ("random", "tube", "frame", "part_window", "face_region")

# Face-part ids of the per-pixel face-part maps (`face_parts` [T, H, W] uint8 in a batch): the
# ids the synthetic face renderer and the VoxCeleb2 builder write.
BACKGROUND, HAIR, SKIN, BROWS, EYES, NOSE, MOUTH = (
  face_render.PART_BACKGROUND,
  face_render.PART_HAIR,
  face_render.PART_SKIN,
  face_render.PART_BROWS,
  face_render.PART_EYES,
  face_render.PART_NOSE,
  face_render.PART_MOUTH,
)
FACE_PART_NAMES = face_render.FACE_PARTS
NUM_FACE_PARTS = len(FACE_PART_NAMES)
# Masking priority per part id for `face_region` (higher: masked first), after MARLIN: the parts
# that move with expression and speech first, what identity and scene carry last.
FACE_PART_PRIORITY = np.array([0, 1, 2, 3, 4, 4, 4], np.int32)


def num_masked(kind: str, grid: Sequence[int], ratio: float, window: Sequence[int] = (2, 2)) -> int:
  """The number M of masked tokens of a `grid` = (steps, h, w) clip under `kind` at `ratio`.

  Raises ValueError when the mask would hide every token, or none, of the clip (or of a window
  for `part_window`): the encoder needs something to see, the loss something to predict.
  """
  steps, h, w = (int(g) for g in grid)
  if kind not in KINDS:
    raise ValueError(f"mask kind {kind!r}: expected one of {KINDS}")
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"mask ratio {ratio}: expected 0 < ratio < 1")
  if kind == "random":
    per, units, size = round(ratio * steps * h * w), 1, steps * h * w
  elif kind in ("tube", "face_region"):
    per, units, size = round(ratio * h * w), steps, h * w
  elif kind == "frame":
    per, units, size = round(ratio * steps), h * w, steps
  else:
    wh, ww = (int(v) for v in window)
    if h % wh or w % ww:
      raise ValueError(f"part_window window {tuple(window)} does not tile the {h}x{w} token grid")
    per, units, size = round(ratio * wh * ww), steps * (h // wh) * (w // ww), wh * ww
  if not 0 < per < size:
    raise ValueError(
      f"mask kind {kind!r} at ratio {ratio} masks {per} of {size} tokens per "
      f"{'window' if kind == 'part_window' else 'unit'} of the {steps}x{h}x{w} grid: "
      "it must leave at least one token visible and mask at least one"
    )
  return per * units


def split_indices(mask: Array, count: int) -> tuple[Array, Array]:
  """`(visible, masked)` ascending token indices of a boolean `mask` (any shape, True = masked)
  that has exactly `count` True entries."""
  flat = mask.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)  # visible (0) first, each part ascending
  return order[: flat.size - count].astype(jnp.int32), order[flat.size - count :].astype(jnp.int32)


def _top(scores: Array, count: int) -> Array:
  """Boolean mask of the `count` highest of `scores` (exactly `count`, ties broken by order)."""
  flat = scores.reshape(-1)
  ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)  # 0 = lowest
  return (ranks >= flat.size - count).reshape(scores.shape)


def random_mask(key: Array, grid: Sequence[int], ratio: float) -> tuple[Array, Array]:
  """Each token masked independently of the others: exactly round(ratio * N) of N."""
  count = num_masked("random", grid, ratio)
  mask = _top(jax.random.uniform(key, tuple(grid)), count)
  return split_indices(mask, count)


def tube_mask(key: Array, grid: Sequence[int], ratio: float) -> tuple[Array, Array]:
  """One random spatial mask of round(ratio * h w) positions, the same at every time step."""
  steps, h, w = grid
  per_step = num_masked("tube", grid, ratio) // steps
  spatial = _top(jax.random.uniform(key, (h, w)), per_step)
  return split_indices(jnp.broadcast_to(spatial, (steps, h, w)), per_step * steps)


def frame_mask(key: Array, grid: Sequence[int], ratio: float) -> tuple[Array, Array]:
  """round(ratio * steps) whole time steps masked."""
  steps, h, w = grid
  count = num_masked("frame", grid, ratio)
  temporal = _top(jax.random.uniform(key, (steps,)), count // (h * w))
  return split_indices(jnp.broadcast_to(temporal[:, None, None], (steps, h, w)), count)


def part_window_mask(
  key: Array, grid: Sequence[int], ratio: float, window: Sequence[int] = (2, 2)
) -> tuple[Array, Array]:
  """Tube masking inside each (wh, ww) window of the token grid: every window masks the same
  round(ratio * wh ww) positions' worth (chosen independently per window), at every step."""
  steps, h, w = grid
  wh, ww = window
  count = num_masked("part_window", grid, ratio, window)
  per_window = round(ratio * wh * ww)
  noise = jax.random.uniform(key, (h // wh, w // ww, wh * ww))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1, stable=True), axis=-1, stable=True)
  inside = ranks >= wh * ww - per_window  # [h/wh, w/ww, wh ww]
  spatial = inside.reshape(h // wh, w // ww, wh, ww).transpose(0, 2, 1, 3).reshape(h, w)
  return split_indices(jnp.broadcast_to(spatial, (steps, h, w)), count)


def face_region_mask(
  key: Array, grid: Sequence[int], ratio: float, parts: Array
) -> tuple[Array, Array]:
  """MARLIN's fasking as a tube mask: `parts` [h, w] int (one face-part id per spatial position,
  see `token_face_parts`); positions are masked by `FACE_PART_PRIORITY` of their part, highest
  first (eyes, nose, mouth; brows; skin; hair; background), in random order within a level."""
  steps, h, w = grid
  if tuple(parts.shape) != (h, w):
    raise ValueError(f"face parts per position must be [{h}, {w}], got {tuple(parts.shape)}")
  per_step = num_masked("face_region", grid, ratio) // steps
  priority = jnp.asarray(FACE_PART_PRIORITY)[parts.astype(jnp.int32)]
  scores = priority.astype(jnp.float32) + jax.random.uniform(key, (h, w), maxval=0.5)
  spatial = _top(scores, per_step)
  return split_indices(jnp.broadcast_to(spatial, (steps, h, w)), per_step * steps)


def token_face_parts(
  face_parts: Array, patch_size: int, tubelet_size: int, *, per_clip: bool = True
) -> Array:
  """The face part of each token from a per-pixel face-part map `face_parts` [T, H, W] int.

  A token's part is the part covering most of its pixels over its tubelet (ties: the lower id).
  With `per_clip` (what tube-like masks need) the count runs over the whole clip, giving one
  part per spatial position [H/p, W/p]; otherwise one per token [T/tubelet, H/p, W/p].
  """
  frames, height, width = face_parts.shape
  p, tub = patch_size, tubelet_size
  one_hot = jax.nn.one_hot(face_parts.astype(jnp.int32), NUM_FACE_PARTS, dtype=jnp.float32)
  counts = one_hot.reshape(frames // tub, tub, height // p, p, width // p, p, NUM_FACE_PARTS)
  counts = counts.sum(axis=(1, 3, 5))  # [steps, h, w, parts]
  if per_clip:
    counts = counts.sum(axis=0)  # [h, w, parts]
  return jnp.argmax(counts, axis=-1).astype(jnp.int32)


def make_mask(
  kind: str,
  key: Array,
  grid: Sequence[int],
  ratio: float,
  *,
  window: Sequence[int] = (2, 2),
  parts: Array | None = None,
) -> tuple[Array, Array]:
  """`(visible, masked)` token indices of one clip by mask `kind` (see the module docstring).

  `window`: the (wh, ww) token windows of `part_window`; `parts`: the [h, w] face-part ids of
  `face_region` (`token_face_parts`).
  """
  grid = tuple(int(g) for g in grid)
  if kind == "random":
    return random_mask(key, grid, ratio)
  if kind == "tube":
    return tube_mask(key, grid, ratio)
  if kind == "frame":
    return frame_mask(key, grid, ratio)
  if kind == "part_window":
    return part_window_mask(key, grid, ratio, tuple(window))
  if kind == "face_region":
    if parts is None:
      raise ValueError("face_region masking needs the face parts of each token (`parts`)")
    return face_region_mask(key, grid, ratio, parts)
  raise ValueError(f"mask kind {kind!r}: expected one of {KINDS}")
