"""Gaussian rasteriser speed: frames/s at a given image size for N Gaussians (JSON lines).

    python benchmarks/splat_render.py                                  # 256 px, 10k-100k
    python benchmarks/splat_render.py --size 128 --gaussians 10000 --modes forward grad

The scene is an avatar-like one: N Gaussians spread over the synthetic head model's face
surface (`fdjax data synth head_model`'s mesh, in memory), a few millimetres each, seen from the
front so the face fills most of the image. Each line times one mode of
`fdjax.render.gaussians.render` (jitted, one view): `forward` (the differentiable scan),
`forward_fast` (the early-exit while loop, for viewing) or `grad` (forward and backward of the
image's sum with respect to every Gaussian parameter), as the median over `--repeats` calls
after a first, compiling one (`compile_s`). Lines carry the device, the bucket and pair
overflow counts of the scene (a non-zero count means the capacities were too small for it)
and `frames_per_s`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.synthetic import head_model
from fdjax.render import gaussians as gs


def face_scene(num: int, seed: int = 0) -> gs.Gaussians:
  """N Gaussians on the head model's triangles (random points on random triangles)."""
  model, _ = head_model.make_head_model(seed)
  vertices, faces = model["v_template"], model["f"].astype(np.int64)
  rng = np.random.default_rng(seed)
  tri = faces[rng.integers(0, len(faces), num)]
  weights = rng.dirichlet(np.ones(3), num)
  means = np.einsum("nk,nkc->nc", weights, vertices[tri])
  spacing = np.sqrt(0.15 * 0.18 / num)  # metres between neighbours over the face
  return gs.Gaussians(
    means=jnp.asarray(means, jnp.float32),
    quaternions=jnp.asarray(rng.normal(size=(num, 4)), jnp.float32),
    scales=jnp.asarray(spacing * rng.uniform(0.3, 0.8, (num, 3)), jnp.float32),
    opacities=jnp.asarray(rng.uniform(0.5, 1.0, num), jnp.float32),
    colours=jnp.asarray(rng.uniform(0, 1, (num, 3)), jnp.float32),
  )


def front_camera(size: int) -> gs.Camera:
  """0.6 m in front of the face, looking at it, the face filling about 80 % of the height."""
  focal = 0.8 * size * 0.55 / 0.19
  return gs.Camera(
    rotation=jnp.diag(jnp.array([1.0, -1.0, -1.0])),
    translation=jnp.array([0.0, 0.0, 0.6]),
    focal=jnp.array([focal, focal]),
    principal=jnp.array([size / 2, size / 2]),
  )


def time_mode(mode: str, scene, camera, settings: dict, repeats: int) -> dict:
  if mode == "grad":
    fn = jax.jit(jax.grad(lambda g: gs.render(g, camera, **settings).colour.sum()))
  else:
    fast = mode == "forward_fast"
    fn = jax.jit(lambda g: gs.render(g, camera, differentiable=not fast, **settings))
  start = time.perf_counter()
  jax.block_until_ready(fn(scene))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(scene))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {"compile_s": round(compile_s, 2), "seconds": median, "frames_per_s": 1.0 / median}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=256, help="image side in pixels")
  parser.add_argument("--gaussians", type=int, nargs="+", default=[10000, 30000, 100000])
  parser.add_argument("--modes", nargs="+", default=["forward", "forward_fast", "grad"])
  parser.add_argument("--tile_size", type=int, default=16)
  parser.add_argument("--capacity", type=int, default=512, help="bucket slots per tile")
  parser.add_argument("--chunk", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  camera = front_camera(args.size)
  for num in args.gaussians:
    scene = face_scene(num)
    settings = {
      "height": args.size,
      "width": args.size,
      "tile_size": args.tile_size,
      "capacity": args.capacity,
      "chunk": args.chunk,
      "pair_capacity": 8 * num,
    }
    aux = jax.jit(lambda g, s=settings: gs.render(g, camera, **s).aux)(scene)
    for mode in args.modes:
      record = {
        "benchmark": "splat_render",
        "mode": mode,
        "size": args.size,
        "gaussians": num,
        "tile_size": args.tile_size,
        "capacity": args.capacity,
        "device": jax.devices()[0].device_kind,
        "num_devices": 1,
        **{k: int(v) for k, v in aux.items()},
        **time_mode(mode, scene, camera, settings, args.repeats),
      }
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
