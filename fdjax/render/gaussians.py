"""3D Gaussian splatting in JAX: projection, tile binning and front-to-back compositing.

A differentiable rasteriser of 3D Gaussians (Kerbl et al. 2023) written with `jax.numpy` and
`lax` only, so it runs on CPU, GPU and TPU, is vmapped over views and sharded like any batch,
and differentiates by `jax.grad` (parameters and camera). The Gaussian avatar task
(`fdjax/tasks/gaussian_avatar.py`) trains through it; `fdjax render avatar` renders with it.
The steps, and the rules they share with the published CUDA rasterisers, are in
docs/design.md section 20; in short:

1. `project`: camera-space means, EWA-projected 2D covariances `J W S W^T J^T` plus a 0.3 px^2
   low-pass dilation, their inverses (conics), depths, colours (from SH for a view direction),
   opacity-aware pixel extents, and which Gaussians are visible.
2. `bin_tiles`: (Gaussian, tile) pairs of every visible Gaussian over the tiles its extent
   touches, sorted by (tile, depth) with one `lax.sort`, cut into fixed-capacity buckets, one
   per tile. Pairs beyond the pair capacity or a bucket's capacity are counted, never silently.
3. `composite`: per tile, a scan over its bucket in chunks, front to back, with 3DGS's rules
   (alpha clamped to 0.99, fragments below 1/255 skipped, a pixel stops when its
   transmittance would fall below 1e-4), then the background behind what is left.

`render` chains the three for one camera and returns colour, alpha, depth and the overflow
counts. Everything has static shapes (capacities are arguments), so one compiled function
serves every camera and every set of Gaussians of the same size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

LOW_PASS = 0.3  # px^2 added to every 2D covariance: no splat is thinner than about a pixel
ALPHA_MIN = 1.0 / 255.0  # fragments with a smaller alpha are skipped
ALPHA_MAX = 0.99  # alpha is clamped here, so no single splat is fully opaque
TRANSMITTANCE_MIN = 1e-4  # a pixel stops when its transmittance would fall below this
FOV_CLAMP = 1.3  # the EWA Jacobian is evaluated at most this far out, in half fields of view
SH_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi)): the degree-0 real spherical harmonic


class Camera(NamedTuple):
  """A pinhole camera (OpenCV axes: x right, y down, z forward), a pytree of arrays.

  A world point X is at `rotation @ X + translation` in camera space and at pixel
  `(fx x / z + cx, fy y / z + cy)`; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
  """

  rotation: Array  # [3, 3] world-to-camera rotation
  translation: Array  # [3] world-to-camera translation
  focal: Array  # [2] fx, fy in pixels
  principal: Array  # [2] cx, cy in pixels


class Gaussians(NamedTuple):
  """N 3D Gaussians, a pytree of arrays."""

  means: Array  # [N, 3] centres, world space
  quaternions: Array  # [N, 4] rotations (w, x, y, z), normalised by the rasteriser
  scales: Array  # [N, 3] standard deviations along the rotated axes (positive)
  opacities: Array  # [N] in [0, 1]
  colours: Array  # [N, C] colours, or [N, (d + 1)^2, 3] SH coefficients with `sh_degree=d`


class Projected(NamedTuple):
  """Gaussians projected into one view (`project`)."""

  means2d: Array  # [N, 2] pixel coordinates of the centres
  conics: Array  # [N, 3] inverse 2D covariance entries (xx, xy, yy), in 1/px^2
  depths: Array  # [N] camera-space z
  extents: Array  # [N, 2] half-width and half-height (px) outside which alpha < 1/255
  colours: Array  # [N, C] colour for this view
  opacities: Array  # [N]
  visible: Array  # [N] bool: in front of the near plane, opaque enough, and on the image


class Rendered(NamedTuple):
  """One rendered view; `aux` holds int32 counts that must be looked at (`render`)."""

  colour: Array  # [H, W, C]
  alpha: Array  # [H, W] 1 - final transmittance
  depth: Array  # [H, W] expected depth of the composited splats (0 where alpha is 0)
  aux: dict  # pair_overflow, bucket_overflow, max_bucket: [] int32 each


# --- Geometry --------------------------------------------------------------------------------


def quaternion_to_matrix(quaternions: Array) -> Array:
  """Rotation matrices of (w, x, y, z) quaternions, normalised first: [..., 4] -> [..., 3, 3]."""
  q = quaternions / jnp.linalg.norm(quaternions, axis=-1, keepdims=True)
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  rows = [
    1 - 2 * (y * y + z * z),
    2 * (x * y - w * z),
    2 * (x * z + w * y),
    2 * (x * y + w * z),
    1 - 2 * (x * x + z * z),
    2 * (y * z - w * x),
    2 * (x * z - w * y),
    2 * (y * z + w * x),
    1 - 2 * (x * x + y * y),
  ]
  return jnp.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(matrices: Array) -> Array:
  """(w, x, y, z) unit quaternions of rotation matrices: [..., 3, 3] -> [..., 4].

  Of the four standard formulas, each row takes the one whose pivot (4 w^2, 4 x^2, 4 y^2 or
  4 z^2) is largest, so no division is by a small number; the sign is free (q and -q agree).
  """
  m = matrices
  m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
  pivots = jnp.stack(
    [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
  )
  a = m[..., 2, 1] - m[..., 1, 2]
  b = m[..., 0, 2] - m[..., 2, 0]
  c = m[..., 1, 0] - m[..., 0, 1]
  d = m[..., 0, 1] + m[..., 1, 0]
  e = m[..., 0, 2] + m[..., 2, 0]
  f = m[..., 1, 2] + m[..., 2, 1]
  candidates = jnp.stack(  # [..., 4 formulas, 4 components], each 4 q_pivot * q
    [
      jnp.stack([pivots[..., 0], a, b, c], -1),
      jnp.stack([a, pivots[..., 1], d, e], -1),
      jnp.stack([b, d, pivots[..., 2], f], -1),
      jnp.stack([c, e, f, pivots[..., 3]], -1),
    ],
    -2,
  )
  best = jnp.argmax(pivots, axis=-1)
  chosen = jnp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
  scale = 0.5 / jnp.sqrt(jnp.maximum(jnp.take_along_axis(pivots, best[..., None], -1), 1e-12))
  return chosen * scale


def quaternion_multiply(a: Array, b: Array) -> Array:
  """Hamilton product of (w, x, y, z) quaternions (the rotation b, then a): [..., 4] x2."""
  aw, ax, ay, az = (a[..., i] for i in range(4))
  bw, bx, by, bz = (b[..., i] for i in range(4))
  return jnp.stack(
    [
      aw * bw - ax * bx - ay * by - az * bz,
      aw * bx + ax * bw + ay * bz - az * by,
      aw * by - ax * bz + ay * bw + az * bx,
      aw * bz + ax * by - ay * bx + az * bw,
    ],
    -1,
  )


def covariances(quaternions: Array, scales: Array) -> Array:
  """3D covariances `R S S^T R^T`: [..., 4], [..., 3] -> [..., 3, 3]."""
  m = quaternion_to_matrix(quaternions) * scales[..., None, :]  # R S
  return m @ jnp.swapaxes(m, -1, -2)


def sh_basis(degree: int, directions: Array) -> Array:
  """Real spherical harmonics up to `degree` (0-3) of unit directions: [..., 3] -> [..., K].

  K = (degree + 1)^2, in the order of the 3DGS/gsplat coefficient layout (l = 0; l = 1 as
  y, z, x; l = 2; l = 3), with the Condon-Shortley sign those rasterisers use.
  """
  if not 0 <= degree <= 3:
    raise ValueError(f"sh_degree must be 0, 1, 2 or 3, got {degree}")
  x, y, z = directions[..., 0], directions[..., 1], directions[..., 2]
  basis = [jnp.full_like(x, SH_C0)]
  if degree >= 1:
    c1 = 0.4886025119029199  # sqrt(3 / (4 pi))
    basis += [-c1 * y, c1 * z, -c1 * x]
  if degree >= 2:
    xx, yy, zz = x * x, y * y, z * z
    basis += [
      1.0925484305920792 * x * y,
      -1.0925484305920792 * y * z,
      0.31539156525252005 * (2 * zz - xx - yy),
      -1.0925484305920792 * x * z,
      0.5462742152960396 * (xx - yy),
    ]
  if degree >= 3:
    basis += [
      -0.5900435899266435 * y * (3 * xx - yy),
      2.890611442640554 * x * y * z,
      -0.4570457994644658 * y * (4 * zz - xx - yy),
      0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
      -0.4570457994644658 * x * (4 * zz - xx - yy),
      1.445305721320277 * z * (xx - yy),
      -0.5900435899266435 * x * (xx - 3 * yy),
    ]
  return jnp.stack(basis, -1)


def sh_colours(coefficients: Array, directions: Array, degree: int) -> Array:
  """Colours seen along `directions` [N, 3] (any length) from SH `coefficients` [N, K, 3].

  As 3DGS: the SH sum plus 0.5, clamped at 0 (degree 0 with coefficient c gives
  `SH_C0 c + 0.5`). The first (degree + 1)^2 coefficients are used.
  """
  num = (degree + 1) ** 2
  if coefficients.shape[-2] < num:
    raise ValueError(
      f"sh_degree {degree} needs {num} coefficients per Gaussian, got {coefficients.shape[-2]}"
    )
  norm = jnp.linalg.norm(directions, axis=-1, keepdims=True)
  unit = directions / jnp.where(norm > 0, norm, 1.0)
  basis = sh_basis(degree, unit)  # [N, K]
  return jnp.maximum(jnp.einsum("nk,nkc->nc", basis, coefficients[..., :num, :]) + 0.5, 0.0)


def project(
  gaussians: Gaussians,
  camera: Camera,
  *,
  height: int,
  width: int,
  sh_degree: int | None = None,
  near: float = 0.01,
  screen_offset: Array | None = None,
) -> Projected:
  """Projects Gaussians into one view (step 1 of the module docstring).

  The 2D covariance is the EWA splat `J W S W^T J^T + 0.3 I` with `W` the camera rotation and
  `J` the Jacobian of the perspective map at the camera-space centre (x, y, z):
  `[[fx / z, 0, -fx x / z^2], [0, fy / z, -fy y / z^2]]`. As in 3DGS and gsplat, `J` is taken
  at x/z, y/z clamped to 1.3 half fields of view beyond the principal point, which keeps splats
  far off-screen from blowing up; the centre itself is projected unclamped. The 0.3 px^2
  dilation is a low-pass filter: a splat narrower than a pixel would otherwise alias (and fall
  between pixel centres). A Gaussian is visible when z > `near`, its opacity reaches 1/255, and
  its extent `sqrt(2 ln(255 o) * diag(cov2d))` (where alpha falls to 1/255) meets the image.

  `screen_offset` [N, 2] (zeros) is added to the projected centres: the gradient of a loss with
  respect to it is the screen-space gradient that 3DGS-style densification reads.
  """
  means_cam = gaussians.means @ camera.rotation.T + camera.translation  # [N, 3]
  x, y, z = means_cam[:, 0], means_cam[:, 1], means_cam[:, 2]
  in_front = z > near
  z_safe = jnp.where(in_front, z, 1.0)  # no division by ~0 (gradients of masked values too)
  fx, fy = camera.focal[0], camera.focal[1]
  cx, cy = camera.principal[0], camera.principal[1]
  means2d = jnp.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], -1)
  if screen_offset is not None:
    means2d = means2d + screen_offset

  # The Jacobian at the clamped direction (see the docstring).
  half_x, half_y = 0.5 * width / fx, 0.5 * height / fy  # tan of the half fields of view
  extra = FOV_CLAMP - 1.0
  tx = jnp.clip(x / z_safe, -cx / fx - extra * half_x, (width - cx) / fx + extra * half_x)
  ty = jnp.clip(y / z_safe, -cy / fy - extra * half_y, (height - cy) / fy + extra * half_y)
  zero = jnp.zeros_like(z)
  jacobian = jnp.stack(
    [fx / z_safe, zero, -fx * tx / z_safe, zero, fy / z_safe, -fy * ty / z_safe], -1
  ).reshape(-1, 2, 3)
  m = jacobian @ camera.rotation  # [N, 2, 3]: J W
  cov2d = m @ covariances(gaussians.quaternions, gaussians.scales) @ jnp.swapaxes(m, -1, -2)
  a = cov2d[:, 0, 0] + LOW_PASS
  b = 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0])
  c = cov2d[:, 1, 1] + LOW_PASS
  det = a * c - b * b
  det_ok = det > 0
  det_safe = jnp.where(det_ok, det, 1.0)
  conics = jnp.stack([c / det_safe, -b / det_safe, a / det_safe], -1)

  opacities = gaussians.opacities
  # Mahalanobis radius (squared) at which alpha = o exp(-r2 / 2) falls to 1/255.
  r2 = 2.0 * jnp.log(jnp.maximum(opacities / ALPHA_MIN, 1.0))
  # Only binning reads the extents: no gradient (sqrt has none at 0, where o < 1/255).
  extents = jax.lax.stop_gradient(jnp.sqrt(jnp.stack([r2 * a, r2 * c], -1)))  # [N, 2]
  on_image = (
    (means2d[:, 0] + extents[:, 0] > 0)
    & (means2d[:, 0] - extents[:, 0] < width)
    & (means2d[:, 1] + extents[:, 1] > 0)
    & (means2d[:, 1] - extents[:, 1] < height)
  )
  visible = in_front & det_ok & (opacities >= ALPHA_MIN) & on_image

  if sh_degree is None:
    colours = gaussians.colours
  else:
    centre = -camera.rotation.T @ camera.translation  # camera centre, world space
    colours = sh_colours(gaussians.colours, gaussians.means - centre, sh_degree)
  return Projected(means2d, conics, z, extents, colours, opacities, visible)


# --- Binning ---------------------------------------------------------------------------------


class Buckets(NamedTuple):
  """Per tile, the Gaussians that touch it, nearest first (`bin_tiles`)."""

  ids: Array  # [T, K] int32 Gaussian index per slot (0 in empty slots)
  filled: Array  # [T, K] bool: the slot holds a Gaussian
  aux: dict  # pair_overflow, bucket_overflow, max_bucket: [] int32


def tile_grid(height: int, width: int, tile_size: int) -> tuple[int, int]:
  """(tiles down, tiles across) covering an image."""
  return -(-height // tile_size), -(-width // tile_size)


def bin_tiles(
  projected: Projected,
  *,
  height: int,
  width: int,
  tile_size: int = 16,
  capacity: int = 256,
  pair_capacity: int | None = None,
) -> Buckets:
  """Bins visible Gaussians into per-tile buckets of `capacity`, nearest first (step 2).

  Every visible Gaussian makes one (tile, depth) pair per tile its extent box touches. The
  pairs are enumerated nearest Gaussian first into `pair_capacity` slots (default 4 N), sorted
  by (tile, depth) with one `lax.sort`, and each tile's run of the sorted pairs is its bucket:
  the first `capacity` of them are kept. What does not fit is counted in `aux`:
  `pair_overflow` (pairs beyond `pair_capacity`: those of the farthest Gaussians) and
  `bucket_overflow` (pairs beyond a tile's `capacity`: the farthest in that tile);
  `max_bucket` is the largest tile's pair count, the capacity that would have sufficed.
  """
  num = projected.depths.shape[0]
  pair_capacity = 4 * num if pair_capacity is None else pair_capacity
  tiles_y, tiles_x = tile_grid(height, width, tile_size)
  num_tiles = tiles_y * tiles_x

  low = projected.means2d - projected.extents  # [N, 2]
  high = projected.means2d + projected.extents
  first_x = jnp.clip(jnp.floor(low[:, 0] / tile_size), 0, tiles_x - 1).astype(jnp.int32)
  last_x = jnp.clip(jnp.floor(high[:, 0] / tile_size), 0, tiles_x - 1).astype(jnp.int32)
  first_y = jnp.clip(jnp.floor(low[:, 1] / tile_size), 0, tiles_y - 1).astype(jnp.int32)
  last_y = jnp.clip(jnp.floor(high[:, 1] / tile_size), 0, tiles_y - 1).astype(jnp.int32)
  span_x = last_x - first_x + 1
  counts = jnp.where(projected.visible, span_x * (last_y - first_y + 1), 0)  # [N]

  # Nearest Gaussians first, so that a full pair capacity drops the farthest ones.
  depth_key = jax.lax.stop_gradient(jnp.where(projected.visible, projected.depths, jnp.inf))
  order = jnp.argsort(depth_key).astype(jnp.int32)
  ends = jnp.cumsum(counts[order])  # [N]
  total = ends[-1]
  slot = jnp.arange(pair_capacity, dtype=jnp.int32)
  rank = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), num - 1).astype(jnp.int32)
  gaussian = order[rank]  # [P]
  local = slot - (ends[rank] - counts[gaussian])
  tile = (first_y[gaussian] + local // span_x[gaussian]) * tiles_x + (
    first_x[gaussian] + local % span_x[gaussian]
  )
  tile = jnp.where(slot < total, tile, num_tiles)  # empty slots sort last
  tile, _, gaussian = jax.lax.sort(
    (tile, depth_key[gaussian], gaussian), num_keys=2, is_stable=True
  )

  per_tile = jnp.zeros(num_tiles + 1, jnp.int32).at[tile].add(1)[:num_tiles]  # [T]
  starts = jnp.cumsum(per_tile) - per_tile
  k = jnp.arange(capacity, dtype=jnp.int32)
  filled = k[None, :] < per_tile[:, None]  # [T, K]
  index = jnp.minimum(starts[:, None] + k[None, :], pair_capacity - 1)
  ids = jnp.where(filled, gaussian[index], 0)
  aux = {
    "pair_overflow": jnp.maximum(total - pair_capacity, 0).astype(jnp.int32),
    "bucket_overflow": jnp.sum(jnp.maximum(per_tile - capacity, 0)).astype(jnp.int32),
    "max_bucket": jnp.max(per_tile).astype(jnp.int32),
  }
  return Buckets(ids, filled, aux)


# --- Compositing -----------------------------------------------------------------------------


def _tile_pixels(tiles_y: int, tiles_x: int, tile_size: int) -> Array:
  """Pixel centres of every tile: [T, P, 2] (x, y), P = tile_size^2, row-major in a tile."""
  offset = jnp.arange(tile_size, dtype=jnp.float32) + 0.5
  ty, tx = jnp.meshgrid(jnp.arange(tiles_y), jnp.arange(tiles_x), indexing="ij")
  py, px = jnp.meshgrid(offset, offset, indexing="ij")
  xs = tx.reshape(-1, 1) * tile_size + px.reshape(1, -1)  # [T, P]
  ys = ty.reshape(-1, 1) * tile_size + py.reshape(1, -1)
  return jnp.stack([xs, ys], -1)


class _Carry(NamedTuple):
  transmittance: Array  # [T, P]
  stopped: Array  # [T, P] bool: the pixel reached its transmittance floor
  colour: Array  # [T, P, C]
  depth: Array  # [T, P]


def _composite_chunk(carry: _Carry, chunk, pixels: Array) -> _Carry:
  """Blends one chunk of every tile's bucket (c slots each) behind what is composited so far.

  Within the chunk, the transmittance in front of slot i is the carry times the product of
  (1 - alpha) over the earlier slots (an exclusive cumulative product). A pixel stops at the
  first slot whose blend would take its transmittance below 1e-4: that slot and everything
  after it (in this chunk and the following ones) are masked out, exactly as 3DGS's loop
  breaks there. The products before the stop are the true transmittances, so the masked sum
  is the sequential loop's result.
  """
  means2d, conics, opacities, colours, depths, filled = chunk  # [T, c, ...]
  delta = pixels[:, :, None, :] - means2d[:, None, :, :]  # [T, P, c, 2]
  dx, dy = delta[..., 0], delta[..., 1]
  a, b, c = (conics[:, None, :, i] for i in range(3))  # [T, 1, c]
  power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy  # [T, P, c]
  alpha = jnp.minimum(ALPHA_MAX, opacities[:, None, :] * jnp.exp(jnp.minimum(power, 0.0)))
  keep = filled[:, None, :] & (power <= 0.0) & (alpha >= ALPHA_MIN)
  alpha = jnp.where(keep, alpha, 0.0)
  clear = 1.0 - alpha
  # Products of (1 - alpha) over the earlier slots, as exp of an exclusive cumulative sum of
  # logs (clear >= 0.01): cheaper to differentiate than a cumulative product.
  logs = jnp.log(clear)
  exclusive = jnp.exp(jnp.cumsum(logs, axis=-1) - logs)
  before = carry.transmittance[..., None] * exclusive  # [T, P, c]
  stops = keep & (before * clear < TRANSMITTANCE_MIN)
  stopped = carry.stopped[..., None] | (jnp.cumsum(stops, axis=-1) > 0)  # [T, P, c]
  weight = jnp.where(stopped, 0.0, alpha * before)
  transmittance = carry.transmittance * jnp.prod(jnp.where(stopped, 1.0, clear), axis=-1)
  return _Carry(
    transmittance,
    stopped[..., -1],
    carry.colour + jnp.einsum("tpc,tck->tpk", weight, colours),
    carry.depth + jnp.einsum("tpc,tc->tp", weight, depths),
  )


def composite(
  projected: Projected,
  buckets: Buckets,
  *,
  height: int,
  width: int,
  tile_size: int = 16,
  background: Array | None = None,
  chunk: int = 32,
  differentiable: bool = True,
) -> tuple[Array, Array, Array]:
  """Front-to-back alpha compositing of every tile's bucket (step 3).

  The bucket (K slots, nearest first) is walked in chunks of `chunk` slots. With
  `differentiable=True` the walk is a `lax.scan` over all K / chunk chunks: early termination is
  a mask (pixels that stopped take nothing more) rather than an exit, because reverse-mode
  differentiation needs a fixed trip count; a chunk no tile fills is skipped. With
  `differentiable=False` it is a `lax.while_loop` that exits when every pixel of every tile has
  stopped or the fullest bucket is used up: the same result, not reverse-differentiable. On CPU
  the scan measured faster even so (256 px, 10k Gaussians: 1.22 against 0.79 frames/s), so the
  avatar task renders with the scan; the loop is there for backends where exiting pays.

  Returns:
    colour [H, W, C] (composited splats plus `background` [C] (default black) times the
    transmittance left), alpha [H, W] (1 - transmittance), depth [H, W] (the splats' expected
    depth: sum of weight * z over sum of weight, 0 where nothing was composited).
  """
  tiles_y, tiles_x = tile_grid(height, width, tile_size)
  num_tiles, capacity = buckets.ids.shape
  if capacity % chunk:
    raise ValueError(f"the bucket capacity {capacity} must be a multiple of chunk={chunk}")
  num_channels = projected.colours.shape[-1]
  dtype = projected.means2d.dtype
  pixels = _tile_pixels(tiles_y, tiles_x, tile_size).astype(dtype)  # [T, P, 2]
  num_pixels = tile_size * tile_size

  def gathered(values):  # [N, ...] -> [K / chunk, T, chunk, ...]
    v = values[buckets.ids]  # [T, K, ...]
    v = v.reshape(num_tiles, capacity // chunk, chunk, *v.shape[2:])
    return jnp.moveaxis(v, 1, 0)

  slots = (
    gathered(projected.means2d),
    gathered(projected.conics),
    gathered(projected.opacities),
    gathered(projected.colours),
    gathered(projected.depths),
    jnp.moveaxis(buckets.filled.reshape(num_tiles, capacity // chunk, chunk), 1, 0),
  )
  start = _Carry(
    jnp.ones((num_tiles, num_pixels), dtype),
    jnp.zeros((num_tiles, num_pixels), bool),
    jnp.zeros((num_tiles, num_pixels, num_channels), projected.colours.dtype),
    jnp.zeros((num_tiles, num_pixels), dtype),
  )
  step = functools.partial(_composite_chunk, pixels=pixels)
  if differentiable:
    # Rematerialised: the backward pass recomputes each chunk's alphas from the carry rather
    # than keeping [T, P, chunk] residuals per chunk (8x less memory at 128 px, same time).
    # A chunk no tile fills is skipped (a branch, in both passes), so unused capacity is free.
    chunk_step = jax.checkpoint(step)

    def scan_step(carry, xs):
      used = jnp.any(xs[-1])
      return jax.lax.cond(used, chunk_step, lambda c, _: c, carry, xs), None

    end, _ = jax.lax.scan(scan_step, start, slots)
  else:
    used = jnp.max(jnp.sum(buckets.filled, axis=1))  # slots of the fullest bucket

    def more(state):
      i, carry = state
      return (i * chunk < used) & ~jnp.all(carry.stopped)

    def body(state):
      i, carry = state
      return i + 1, step(carry, jax.tree.map(lambda x: x[i], slots))

    _, end = jax.lax.while_loop(more, body, (jnp.zeros((), jnp.int32), start))

  def image(values):  # [T, P, ...] -> [H, W, ...]
    v = values.reshape(tiles_y, tiles_x, tile_size, tile_size, *values.shape[2:])
    v = jnp.swapaxes(v, 1, 2).reshape(tiles_y * tile_size, tiles_x * tile_size, *v.shape[4:])
    return v[:height, :width]

  alpha = 1.0 - image(end.transmittance)
  colour = image(end.colour)
  if background is not None:
    colour = colour + image(end.transmittance)[..., None] * background
  depth_sum = image(end.depth)
  depth = jnp.where(alpha > 0, depth_sum / jnp.where(alpha > 0, alpha, 1.0), 0.0)
  return colour, alpha, depth


def render(
  gaussians: Gaussians,
  camera: Camera,
  *,
  height: int,
  width: int,
  background: Array | None = None,
  sh_degree: int | None = None,
  tile_size: int = 16,
  capacity: int = 256,
  pair_capacity: int | None = None,
  chunk: int = 32,
  near: float = 0.01,
  differentiable: bool = True,
  screen_offset: Array | None = None,
) -> Rendered:
  """Renders Gaussians from one camera: `project`, `bin_tiles`, `composite`.

  Batch over views with `jax.vmap` (cameras, backgrounds, and the Gaussians too when each view
  has its own, as an animated avatar's frames do); under `jit` a batch of views sharded over
  devices renders each view where it lives.

  Args:
    gaussians: N Gaussians; `colours` [N, C] or, with `sh_degree`, SH coefficients.
    camera: the view.
    height, width: image size in pixels.
    background: [C] colour behind the splats (default black).
    sh_degree: None (colours as given) or 0-3 (SH evaluated for the view direction).
    tile_size: tile side in pixels.
    capacity: bucket slots per tile (a multiple of `chunk`).
    pair_capacity: (Gaussian, tile) pairs binned at most (default 4 N).
    chunk: bucket slots composited at once.
    near: Gaussians at camera z <= near are not drawn.
    differentiable: False walks buckets with an early-exit loop, without reverse-mode gradients
      (`composite`).
    screen_offset: [N, 2] added to the projected centres (`project`), for screen-space gradients.

  Returns:
    `Rendered(colour [H, W, C], alpha [H, W], depth [H, W], aux)`, aux holding the int32
    counts `pair_overflow` and `bucket_overflow` (pairs dropped for lack of room: the result
    is then not the exact rendering; callers report them) and `max_bucket`.
  """
  projected = project(
    gaussians,
    camera,
    height=height,
    width=width,
    sh_degree=sh_degree,
    near=near,
    screen_offset=screen_offset,
  )
  buckets = bin_tiles(
    projected,
    height=height,
    width=width,
    tile_size=tile_size,
    capacity=capacity,
    pair_capacity=pair_capacity,
  )
  colour, alpha, depth = composite(
    projected,
    buckets,
    height=height,
    width=width,
    tile_size=tile_size,
    background=background,
    chunk=chunk,
    differentiable=differentiable,
  )
  return Rendered(colour, alpha, depth, buckets.aux)
