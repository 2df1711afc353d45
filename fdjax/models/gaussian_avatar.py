"""A head avatar of 3D Gaussians bound to the triangles of a FLAME mesh (GaussianAvatars style).

Qian et al. 2024 ("GaussianAvatars") attach every Gaussian to one triangle of the tracked FLAME
mesh: its position, rotation and scale are stored in the triangle's local frame (origin at the
triangle's centre, axes from its first edge and its normal, unit length the triangle's size),
so the Gaussians move, turn and stretch with their triangle as FLAME deforms. The task
(`fdjax/tasks/gaussian_avatar.py`) renders them with `fdjax/render/gaussians.py`.

Static shapes: the avatar has `capacity` slots, an `active` mask says which hold a Gaussian, and
densification and pruning fill and free slots (`densify_and_prune`). The trainable parameters
(`params`) are per slot; the avatar's state (`binding`, `active`, the densification statistics
and `offset`) is a mutable collection. A slot's effective parameters are `params + offset`:
densification writes a new Gaussian by setting its slot's offset (the optimizer keeps updating
`params`, so nothing outside the loss has to edit them); see docs/design.md section 20.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.render import gaussians as gs

Array = jax.Array


class FaceFrames(NamedTuple):
  """Each triangle's local frame on a posed mesh."""

  centres: Array  # [..., F, 3]
  rotations: Array  # [..., F, 3, 3] columns: first edge, normal, their cross product
  scales: Array  # [..., F] mean of the first edge's length and the height over it


def face_frames(vertices: Array, faces: np.ndarray) -> FaceFrames:
  """Frames of the triangles `faces` [F, 3] of `vertices` [..., V, 3] (GaussianAvatars')."""
  v0, v1, v2 = (vertices[..., faces[:, i], :] for i in range(3))
  edge, side = v1 - v0, v2 - v0

  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  a0 = unit(edge)
  a1 = unit(jnp.cross(a0, side))
  a2 = -unit(jnp.cross(a1, a0))
  rotations = jnp.stack([a0, a1, a2], -1)
  scales = 0.5 * (jnp.linalg.norm(edge, axis=-1) + jnp.abs(jnp.sum(a2 * side, -1)))
  return FaceFrames((v0 + v1 + v2) / 3.0, rotations, scales)


class DensifySettings(NamedTuple):
  """When and how slots are filled and freed (3DGS's adaptive density control)."""

  grad_threshold: float  # mean screen-space gradient norm (NDC units) that densifies
  split_scale: float  # local scale (triangle units) above which a Gaussian splits, else clones
  prune_opacity: float  # active Gaussians below this opacity are freed
  split_shrink: float = 1.6  # a split Gaussian's two halves are this much smaller


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianAvatar:
  """The avatar's structure (no arrays that train): triangles, capacity, colour model."""

  faces: np.ndarray  # [F, 3] int32 triangles of the head model
  capacity: int  # Gaussian slots (at least one per triangle)
  sh_degree: int = 0  # spherical-harmonics degree of the colours (0: view-independent)
  init_opacity: float = 0.1  # opacity of the initial Gaussians
  init_scale: float = 0.5  # initial scale in triangle units

  @property
  def num_faces(self) -> int:
    return len(self.faces)

  def init(self) -> tuple[dict, dict]:
    """`(params, state)`: one Gaussian at the centre of every triangle, the other slots free."""
    num, faces = self.capacity, self.num_faces
    if num < faces:
      raise ValueError(f"capacity {num} is below the {faces} triangles (one Gaussian each)")
    quaternion = jnp.zeros((num, 4)).at[:, 0].set(1.0)
    params = {
      "position": jnp.zeros((num, 3)),
      "rotation": quaternion,
      "scale": jnp.full((num, 3), float(np.log(self.init_scale))),
      "opacity": jnp.full((num,), float(np.log(self.init_opacity / (1 - self.init_opacity)))),
      "sh": jnp.zeros((num, (self.sh_degree + 1) ** 2, 3)),
    }
    state = {
      "binding": jnp.arange(num, dtype=jnp.int32) % faces,
      "active": jnp.arange(num) < faces,
      "offset": jax.tree.map(jnp.zeros_like, params),
      "grad_sum": jnp.zeros((num,)),
      "grad_count": jnp.zeros((num,)),
    }
    return params, state

  def gaussians(self, effective: dict, state: dict, frames: FaceFrames) -> gs.Gaussians:
    """World-space Gaussians of one posed mesh (`frames` of one view): SH colours."""
    binding = state["binding"]
    rotation = frames.rotations[binding]  # [N, 3, 3]
    scale = frames.scales[binding][:, None]  # [N, 1]
    means = jnp.einsum("nij,nj->ni", rotation, effective["position"] * scale)
    face_quaternion = gs.matrix_to_quaternion(rotation)
    local = effective["rotation"] / jnp.linalg.norm(effective["rotation"], axis=-1, keepdims=True)
    opacity = jax.nn.sigmoid(effective["opacity"]) * state["active"]
    return gs.Gaussians(
      means=means + frames.centres[binding],
      quaternions=gs.quaternion_multiply(face_quaternion, local),
      scales=scale * jnp.exp(effective["scale"]),
      opacities=opacity,
      colours=effective["sh"],
    )


def effective_params(params: dict, state: dict) -> dict:
  """Each slot's parameters: the trained ones plus the offset densification wrote."""
  return jax.tree.map(jnp.add, params, state["offset"])


def accumulate_statistics(state: dict, screen_gradient: Array, visible: Array) -> dict:
  """Adds one batch's screen-space gradient norms (`[B, N]`) of the visible Gaussians."""
  norms = jnp.where(visible, screen_gradient, 0.0)
  return {
    **state,
    "grad_sum": state["grad_sum"] + jnp.sum(norms, 0),
    "grad_count": state["grad_count"] + jnp.sum(visible, 0),
  }


def densify_and_prune(
  params: dict, state: dict, rng: Array, settings: DensifySettings
) -> tuple[dict, dict]:
  """3DGS's adaptive density control at a fixed capacity. Returns `(state, counts)`.

  Active Gaussians whose mean screen-space gradient reaches the threshold grow: small ones
  (largest local scale <= `split_scale`) are cloned, large ones split in two (the slot keeps one
  half, sampled from the Gaussian and shrunk, a free slot takes the other). New Gaussians keep
  their parent's triangle. Candidates go, largest gradient first, to free slots in index order;
  those that find none are counted (`densify_overflow`), never dropped silently. Then active
  Gaussians more transparent than `prune_opacity` are freed, except the last of a triangle
  (each triangle keeps at least one). Statistics restart from zero.
  """
  num = state["active"].shape[0]
  effective = effective_params(params, state)
  active = state["active"]
  mean_grad = state["grad_sum"] / jnp.maximum(state["grad_count"], 1.0)
  candidate = active & (mean_grad >= settings.grad_threshold)
  # Candidates by decreasing gradient, free slots by index: the k-th of each pair up.
  order = jnp.argsort(jnp.where(candidate, -mean_grad, jnp.inf))
  free_order = jnp.argsort(jnp.where(active, num, jnp.arange(num)))
  num_free, num_candidates = jnp.sum(~active), jnp.sum(candidate)
  placed = jnp.arange(num) < jnp.minimum(num_free, num_candidates)  # pairs k = 0..n-1
  parent = order  # k-th candidate
  child = free_order  # k-th free slot

  local_scale = jnp.exp(effective["scale"])
  split = jnp.max(local_scale, -1) > settings.split_scale  # [N]
  # A split samples two points of the Gaussian (in triangle units) and shrinks both.
  noise = jax.random.normal(rng, (2, num, 3))
  rotation = gs.quaternion_to_matrix(effective["rotation"])
  samples = effective["position"] + jnp.einsum("nij,knj->kni", rotation, noise * local_scale)
  shrunk = effective["scale"] - jnp.log(settings.split_shrink)

  def parent_value(name, which):  # what a grown Gaussian's copy `which` (0: parent) holds
    value = effective[name]
    if name == "position":
      value = jnp.where(split[:, None], samples[which], value)
    elif name == "scale":
      value = jnp.where(split[:, None], shrunk, value)
    return value

  # A parent slot changes only when it splits and found room for its other half.
  parent_placed = jnp.zeros(num, bool).at[parent].set(placed)
  new_effective = {}
  for name, value in effective.items():
    grown = candidate & split if name in ("position", "scale") else jnp.zeros_like(candidate)
    kept = jnp.where(_expand(grown & parent_placed, value), parent_value(name, 0), value)
    children = parent_value(name, 1)[parent]  # [N] in pair order
    new_effective[name] = kept.at[child].set(
      jnp.where(_expand(placed, children), children, kept[child])
    )
  old_binding = state["binding"]
  binding = old_binding.at[child].set(jnp.where(placed, old_binding[parent], old_binding[child]))
  active = active.at[child].set(active[child] | placed)

  # Pruning, keeping each triangle's last Gaussian.
  opacity = jax.nn.sigmoid(new_effective["opacity"])
  prune = active & (opacity < settings.prune_opacity)
  per_face = jax.ops.segment_sum(active.astype(jnp.int32), binding, num_segments=num)
  pruned_per_face = jax.ops.segment_sum(prune.astype(jnp.int32), binding, num_segments=num)
  prune &= (per_face - pruned_per_face)[binding] > 0
  active = active & ~prune

  offset = jax.tree.map(jnp.subtract, new_effective, params)
  new_state = {
    **state,
    "binding": binding,
    "active": active,
    "offset": offset,
    "grad_sum": jnp.zeros_like(state["grad_sum"]),
    "grad_count": jnp.zeros_like(state["grad_count"]),
  }
  counts = {
    "densified": jnp.sum(placed).astype(jnp.int32),
    "densify_overflow": jnp.maximum(num_candidates - num_free, 0).astype(jnp.int32),
    "pruned": jnp.sum(prune).astype(jnp.int32),
  }
  return new_state, counts


def reset_opacity(params: dict, state: dict, ceiling: float = 0.01) -> dict:
  """3DGS's opacity reset: every active Gaussian's opacity to at most `ceiling`."""
  effective = effective_params(params, state)
  logit = float(np.log(ceiling / (1 - ceiling)))
  target = jnp.minimum(effective["opacity"], logit)
  offset = {**state["offset"], "opacity": target - params["opacity"]}
  return {**state, "offset": offset}


def _expand(mask: Array, like: Array) -> Array:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
