"""Tests for fdjax/render/gaussians.py: the rasteriser against a brute-force per-pixel numpy
rendering and gsplat's PyTorch reference functions, gradients against finite differences,
overflow counts, and batching over views."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from gsplat.cuda import _torch_impl as gsplat_ref
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from scipy.spatial.transform import Rotation

from fdjax.render import gaussians as gs

HEIGHT, WIDTH = 21, 30  # neither a multiple of the tile size


def _scene(rng, num, spread=0.6, scale=(0.03, 0.2)):
  """Random Gaussians around the origin and a camera 3 units away looking at them."""
  means = rng.uniform(-spread, spread, (num, 3))
  quaternions = rng.normal(size=(num, 4))
  scales = rng.uniform(*scale, (num, 3))
  opacities = rng.uniform(0.2, 1.0, num)
  colours = rng.uniform(0, 1, (num, 3))
  rotation = Rotation.from_euler("xyz", [0.1, -0.2, 0.05]).as_matrix()
  camera = gs.Camera(
    rotation=rotation,
    translation=np.array([0.05, -0.02, 3.0]),
    focal=np.array([40.0, 42.0]),
    principal=np.array([WIDTH / 2 + 0.7, HEIGHT / 2 - 0.4]),
  )
  return gs.Gaussians(means, quaternions, scales, opacities, colours), camera


def _oracle_projection(g, camera, height, width):
  """Centres, 2D covariances and depths from the published equations (EWA splatting, with
  3DGS's Jacobian clamp at 1.3 half fields of view and 0.3 px^2 dilation)."""
  rot = Rotation.from_quat(np.asarray(g.quaternions)[:, [1, 2, 3, 0]]).as_matrix()  # x,y,z,w
  sigma = np.einsum("nij,nj,nkj->nik", rot, np.asarray(g.scales) ** 2, rot)
  r, t = np.asarray(camera.rotation), np.asarray(camera.translation)
  (fx, fy), (cx, cy) = np.asarray(camera.focal), np.asarray(camera.principal)
  cam = np.asarray(g.means) @ r.T + t
  x, y, z = cam.T
  means2d = np.stack([fx * x / z + cx, fy * y / z + cy], -1)
  u = np.clip(x / z, -cx / fx - 0.15 * width / fx, (width - cx) / fx + 0.15 * width / fx)
  v = np.clip(y / z, -cy / fy - 0.15 * height / fy, (height - cy) / fy + 0.15 * height / fy)
  jac = np.zeros((len(z), 2, 3))
  jac[:, 0, 0], jac[:, 0, 2] = fx / z, -fx * u / z
  jac[:, 1, 1], jac[:, 1, 2] = fy / z, -fy * v / z
  cov2d = jac @ r @ sigma @ r.T @ np.swapaxes(jac, 1, 2) + 0.3 * np.eye(2)
  return means2d, cov2d, z


def _oracle_render(g, camera, height, width, background, near=0.01):
  """Brute force: every pixel walks every Gaussian in depth order (3DGS's per-pixel loop)."""
  means2d, cov2d, z = _oracle_projection(g, camera, height, width)
  conic = np.linalg.inv(cov2d)
  colours, opacities = np.asarray(g.colours), np.asarray(g.opacities)
  ys, xs = np.mgrid[0:height, 0:width] + 0.5
  transmittance = np.ones((height, width))
  done = np.zeros((height, width), bool)
  colour = np.zeros((height, width, colours.shape[1]))
  depth = np.zeros((height, width))
  stops = 0
  for n in np.argsort(z, kind="stable"):
    if z[n] <= near:
      continue
    d = np.stack([xs - means2d[n, 0], ys - means2d[n, 1]], -1)
    power = -0.5 * np.einsum("hwi,ij,hwj->hw", d, conic[n], d)
    alpha = np.minimum(0.99, opacities[n] * np.exp(power))
    blend = ~done & (power <= 0) & (alpha >= 1 / 255)
    after = transmittance * (1 - alpha)
    stop = blend & (after < 1e-4)
    stops += stop.sum()
    done |= stop
    blend &= ~stop
    colour += np.where(blend, alpha * transmittance, 0)[..., None] * colours[n]
    depth += np.where(blend, alpha * transmittance, 0) * z[n]
    transmittance = np.where(blend, after, transmittance)
  alpha_image = 1 - transmittance
  colour += transmittance[..., None] * background
  depth = np.where(alpha_image > 0, depth / np.where(alpha_image > 0, alpha_image, 1), 0)
  return colour, alpha_image, depth, stops


_STATIC = ("height", "width", "sh_degree", "tile_size", "capacity", "pair_capacity", "chunk")
_jit_render = jax.jit(gs.render, static_argnames=(*_STATIC, "near", "differentiable"))


def _render(g, camera, **kwargs):
  """`gs.render` on the test image size, with one jitted function for every test."""
  kwargs = {
    "height": HEIGHT,
    "width": WIDTH,
    "tile_size": 8,
    "capacity": 64,
    "chunk": 16,
    "pair_capacity": 1024,
  } | kwargs
  return _jit_render(g, camera, **kwargs)


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def test_render_equals_brute_force_per_pixel_rendering():
  rng = np.random.default_rng(0)
  g, camera = _scene(rng, 60)
  # Some Gaussians behind the camera, some off the image, an opaque stack that stops pixels.
  means = g.means.copy()
  means[:3, 2] = -3.5
  means[3:6, :2] = [[2.5, 0.0], [-2.4, 1.0], [0.2, 2.6]]
  opacities = g.opacities.copy()
  opacities[6:30] = 0.99
  means[6:30, :2] = means[6:30, :2] * 0.2
  g = g._replace(means=means, opacities=opacities)
  background = np.array([0.2, 0.5, 0.1])
  with jax.enable_x64(True):
    out = _render(_as_jax(g), _as_jax(camera), background=jnp.asarray(background))
    colour, alpha, depth, stops = _oracle_render(g, camera, HEIGHT, WIDTH, background)
    assert stops > 20  # the early termination is exercised
    assert int(out.aux["pair_overflow"]) == 0 and int(out.aux["bucket_overflow"]) == 0
    assert 0.2 < alpha.mean() < 0.95  # both covered and empty pixels
    np.testing.assert_allclose(np.asarray(out.colour), colour, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.alpha), alpha, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.depth), depth, atol=1e-5)
    # The while-loop walk (early exit, forward only) gives the same image.
    fast = _render(
      _as_jax(g), _as_jax(camera), background=jnp.asarray(background), differentiable=False
    )
    np.testing.assert_allclose(np.asarray(fast.colour), colour, atol=1e-5)


def test_float32_render_close_to_the_float64_oracle():
  g, camera = _scene(np.random.default_rng(1), 40)
  out = _render(_as_jax(g), _as_jax(camera))
  colour, alpha, _, _ = _oracle_render(g, camera, HEIGHT, WIDTH, np.zeros(3))
  assert out.colour.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.colour), colour, atol=2e-4)
  np.testing.assert_allclose(np.asarray(out.alpha), alpha, atol=2e-4)


def test_projection_and_sh_equal_gsplat_reference():
  rng = np.random.default_rng(2)
  g, camera = _scene(rng, 50)
  sh = rng.normal(0, 0.3, (50, 16, 3))
  viewmat = np.eye(4)
  viewmat[:3, :3], viewmat[:3, 3] = camera.rotation, camera.translation
  k = np.array(
    [
      [camera.focal[0], 0, camera.principal[0]],
      [0, camera.focal[1], camera.principal[1]],
      [0, 0, 1],
    ]
  )
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
  covars, _ = gsplat_ref._quat_scale_to_covar_preci(
    t(g.quaternions), t(g.scales), compute_preci=False
  )
  _, means2d, depths, conics, _ = gsplat_ref._fully_fused_projection(
    t(g.means), covars, t(viewmat)[None], t(k)[None], WIDTH, HEIGHT, eps2d=0.3
  )
  centre = -camera.rotation.T @ camera.translation
  dirs = g.means - centre

  @jax.jit
  def ours(g, camera, dirs):  # one compiled function for all of our side
    projected = gs.project(g, camera, height=HEIGHT, width=WIDTH, sh_degree=3)
    colours = [gs.sh_colours(g.colours, dirs, degree) for degree in range(4)]
    return projected, gs.covariances(g.quaternions, g.scales), colours

  with jax.enable_x64(True):
    projected, covariances, colours = ours(
      _as_jax(g._replace(colours=sh)), _as_jax(camera), jnp.asarray(dirs)
    )
    np.testing.assert_allclose(np.asarray(covariances), covars.numpy(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(projected.means2d), means2d[0].numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(projected.depths), depths[0].numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(projected.conics), conics[0].numpy(), rtol=1e-8)
    for degree in range(4):
      reference = gsplat_ref._spherical_harmonics(degree, t(dirs), t(sh)).numpy()
      np.testing.assert_allclose(
        np.asarray(colours[degree]), np.maximum(reference + 0.5, 0), atol=1e-12
      )


def _directional_check(fn, params, rng, eps=1e-6):
  """Reverse-mode gradient . v against the central difference along v, for each leaf (one
  compiled `value_and_grad` gives both)."""
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  _, grads = value_and_grad(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    direction = rng.normal(size=np.shape(leaf))
    direction /= np.linalg.norm(direction)

    def shifted(sign, path=path, direction=direction):
      return jax.tree_util.tree_map_with_path(
        lambda key, x: x + sign * eps * direction if key == path else x, params
      )

    numeric = (value_and_grad(shifted(1.0))[0] - value_and_grad(shifted(-1.0))[0]) / (2 * eps)
    analytic = sum(
      float(jnp.vdot(gr, direction))
      for p, gr in jax.tree_util.tree_leaves_with_path(grads)
      if p == path
    )
    assert abs(analytic) > 1e-6 or abs(numeric) < 1e-6, path
    np.testing.assert_allclose(analytic, float(numeric), rtol=1e-4, atol=1e-7, err_msg=str(path))


def test_gradients_match_finite_differences_for_every_parameter_and_the_camera():
  rng = np.random.default_rng(3)
  g, camera = _scene(rng, 12, spread=0.4, scale=(0.08, 0.25))
  sh = rng.normal(0, 0.3, (12, 4, 3))
  weights = rng.normal(size=(HEIGHT, WIDTH, 5))
  with jax.enable_x64(True):

    def loss(params):
      gaussians, cam = params
      out = gs.render(
        gaussians,
        cam,
        height=HEIGHT,
        width=WIDTH,
        sh_degree=1,
        tile_size=8,
        capacity=32,
        chunk=8,
        background=jnp.array([0.1, 0.2, 0.3]),
      )
      channels = jnp.concatenate([out.colour, out.alpha[..., None], out.depth[..., None]], -1)
      return jnp.sum(channels * weights)

    params = _as_jax((g._replace(colours=sh), camera))
    _directional_check(loss, params, rng)


def test_bucket_and_pair_overflow_are_counted_exactly():
  rng = np.random.default_rng(4)
  g, camera = _scene(rng, 80, spread=0.15, scale=(0.01, 0.02))
  pair_capacity, capacity = 120, 16
  with jax.enable_x64(True):
    jg, jc = _as_jax(g), _as_jax(camera)
    projected = gs.project(jg, jc, height=HEIGHT, width=WIDTH)
    # The pairs each Gaussian makes, nearest Gaussian first, the first `pair_capacity` kept.
    tiles_y, tiles_x = gs.tile_grid(HEIGHT, WIDTH, 8)
    low = np.asarray(projected.means2d - projected.extents)
    high = np.asarray(projected.means2d + projected.extents)
    visible = np.flatnonzero(np.asarray(projected.visible))
    kept = np.zeros((tiles_y, tiles_x), int)
    total = 0
    for n in visible[np.argsort(np.asarray(projected.depths)[visible], kind="stable")]:
      x0, x1 = np.clip(np.floor([low[n, 0] / 8, high[n, 0] / 8]), 0, tiles_x - 1).astype(int)
      y0, y1 = np.clip(np.floor([low[n, 1] / 8, high[n, 1] / 8]), 0, tiles_y - 1).astype(int)
      for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
          kept[y, x] += total < pair_capacity
          total += 1
    out = _render(jg, jc, capacity=capacity, chunk=16, pair_capacity=pair_capacity)
  assert total > pair_capacity and kept.max() > capacity
  assert int(out.aux["pair_overflow"]) == total - pair_capacity
  assert int(out.aux["bucket_overflow"]) == np.maximum(kept - capacity, 0).sum()
  assert int(out.aux["max_bucket"]) == kept.max()


def test_views_batch_with_vmap_and_shard_over_devices():
  rng = np.random.default_rng(5)
  g, camera = _scene(rng, 40)
  views = 8
  angles = np.linspace(-0.3, 0.3, views)
  rotations = np.stack([Rotation.from_euler("y", a).as_matrix() @ camera.rotation for a in angles])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  cameras = gs.Camera(
    f32(rotations),
    jnp.tile(f32(camera.translation), (views, 1)),
    jnp.tile(f32(camera.focal), (views, 1)),
    jnp.tile(f32(camera.principal), (views, 1)),
  )
  jg = jax.tree.map(f32, g)
  mesh = jax.make_mesh((jax.device_count(),), ("views",), axis_types=(AxisType.Auto,))
  sharded = jax.device_put(cameras, NamedSharding(mesh, PartitionSpec("views")))
  batched = jax.jit(jax.vmap(lambda c: _render(jg, c)))(sharded)
  assert batched.colour.shape == (views, HEIGHT, WIDTH, 3)
  assert batched.colour.sharding.spec[0] == "views"
  for i in (0, views - 1):
    single = _render(jg, jax.tree.map(lambda x, i=i: x[i], cameras))
    np.testing.assert_allclose(np.asarray(batched.colour[i]), np.asarray(single.colour), atol=1e-6)
