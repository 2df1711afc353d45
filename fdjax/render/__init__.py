"""Rendering: software mesh rendering to MP4 and the differentiable Gaussian rasteriser.

    mesh.py       numpy z-buffer mesh rendering and MP4 writing (`fdjax render`)
    gaussians.py  3D Gaussian splatting in JAX (projection, tile binning, compositing)
    avatar.py     `fdjax render avatar`: a trained Gaussian avatar driven by FLAME parameters

The mesh renderer's public names are importable from here (`from fdjax import render;
render.render_sequence(...)`) as they were when it was the module `fdjax/render.py`. Nothing
here imports JAX: `fdjax render` on meshes starts none.
"""

from __future__ import annotations

from fdjax.render.mesh import (
  face_shading,
  load_faces,
  rasterise,
  render_frames,
  render_sequence,
  write_video,
)

__all__ = [
  "face_shading",
  "load_faces",
  "main",
  "rasterise",
  "render_frames",
  "render_sequence",
  "write_video",
]


def main(argv: list[str]) -> int:
  """`fdjax render`: a mesh sequence to MP4, or `fdjax render avatar ...` (a Gaussian avatar)."""
  if argv and argv[0] == "avatar":
    from fdjax.render import avatar

    return avatar.main(argv[1:])
  from fdjax.render import mesh

  return mesh.main(argv)
