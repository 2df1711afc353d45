"""The learned face stabiliser: the rigid transform between the skulls of two meshes of a person.

After "Learning to Stabilize Faces" (Bednarik et al. 2020): given two registered meshes of one
person (vertex `n` the same point of the face in both), regress the rigid motion that takes the
skull under mesh A onto the skull under mesh B, seeing through the skin motion (expression,
jaw) that moves even the most rigid-looking parts of the face.

`Stabilizer` refines an estimate in `iterations` steps, each a point-set encoder with its own
weights over `N` vertices of both meshes (a fixed random subset, `point_seed`):

1. Start from the weighted Kabsch (Procrustes) alignment of all of A's observed vertices onto
   B's, weighted by `anchor [V]` (the task gives its rigid region: 1 on it, 0 elsewhere; all
   ones make it Procrustes on all vertices). Where fewer than 3 anchor vertices are observed,
   all observed vertices count alike.
2. Put both meshes in a canonical frame: the Kabsch pose of the head model's `reference`
   (its template) onto B, weighted alike, so the encoder sees every pair in the pose of the
   template whatever the head's pose.
3. Per point: B's canonical position, the offset from aligned A to B (the skin motion plus what
   is left of the rigid motion), and a learned embedding of the point's vertex (the vertex
   correspondence is known, so the encoder may learn which vertices ride on bone). A shared MLP
   (PointNet), masked mean and max pooling over the observed points, and a head give a
   residual rotation in the continuous 6D representation (Zhou et al. 2019: the first two
   columns, made orthonormal by Gram-Schmidt; zero output is the identity) and a translation,
   both in the canonical frame. The estimate is updated by the residual, mapped back to world.

Kabsch results are data-dependent constants (no gradient flows through the SVD), and so is the
estimate each step starts from: each step's encoder learns from its own output's loss.

Inputs: `vertices [B, 2, V, 3]` (metres; mesh A, mesh B), `vertex_mask [B, 2, V]` (observed
vertices; the others are ignored, whatever their values), `reference [V, 3]`, `anchor [V]`.
Output: the transform `[B, 4, 4]` with `x_B = R x_A + t`, and per iteration the estimates
`[B, I, 4, 4]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax.metrics import rigid

IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def rotation_from_6d(x: jax.Array) -> jax.Array:
  """Rotation matrices `[..., 3, 3]` from 6D vectors `[..., 6]` (the first two columns).

  Gram-Schmidt: `b1 = a1 / |a1|`, `b2` the normalised part of `a2` orthogonal to `b1`,
  `b3 = b1 x b2`; the columns of the result are `b1, b2, b3`.
  """
  a1, a2 = x[..., :3], x[..., 3:]
  b1 = a1 / jnp.linalg.norm(a1, axis=-1, keepdims=True)
  b2 = a2 - jnp.sum(b1 * a2, axis=-1, keepdims=True) * b1
  b2 = b2 / jnp.linalg.norm(b2, axis=-1, keepdims=True)
  return jnp.stack([b1, b2, jnp.cross(b1, b2)], axis=-1)


def _dense(features: int, name: str, zero: bool = False) -> nn.Dense:
  kernel = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
  return nn.Dense(
    features,
    kernel_init=nn.with_logical_partitioning(kernel, ("embed", "mlp")),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
    name=name,
  )


class PointEncoder(nn.Module):
  """Per-point features `[B, N, F]` -> a residual rigid transform's 9 numbers `[B, 9]`.

  Two paths over the observed points: a PointNet over `features` (a shared MLP, masked mean
  and max pooling) and a vertex-wise linear map of `offsets [B, N, 3]` (weights of its own per
  point, `[N, 3, vertex_width]`, masked mean): with known correspondence, the latter is a
  linear function of the whole offset field, which is how the skin motion of a linear head
  model is told apart from rigid motion.
  """

  num_points: int  # N
  width: int = 64  # per-point MLP width
  depth: int = 2  # per-point MLP layers
  head_width: int = 256  # width of the MLP after pooling
  vertex_width: int = 64  # outputs of the vertex-wise linear map

  @nn.compact
  def __call__(self, features: jax.Array, offsets: jax.Array, mask: jax.Array) -> jax.Array:
    weights = mask[..., None].astype(features.dtype)  # [B, N, 1]
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # [B, 1]
    h = features
    for i in range(self.depth):
      h = nn.gelu(_dense(self.width, f"point_{i}")(h))
    mean = jnp.sum(h * weights, axis=1) / count
    largest = jnp.max(jnp.where(mask[..., None], h, -1e4), axis=1)
    kernel = self.param(
      "vertex_kernel",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2),
        ("vertices", "embed", "mlp"),
      ),
      (self.num_points, offsets.shape[-1], self.vertex_width),
    )
    linear = jnp.einsum("bnf,nfh->bh", offsets * weights, kernel.astype(offsets.dtype)) / count
    h = jnp.concatenate([mean, largest, linear], axis=-1)
    h = nn.gelu(_dense(self.head_width, "head_0")(h))
    h = nn.gelu(_dense(self.head_width, "head_1")(h))
    # Zero-initialised: the first residual is the identity. The skip keeps the linear path linear.
    return _dense(9, "out", zero=True)(h) + _dense(9, "skip", zero=True)(linear)


def point_indices(num_vertices: int, num_points: int, seed: int) -> np.ndarray:
  """The `[N]` sorted vertex indices a stabiliser reads: `num_points` of `num_vertices`."""
  if not 3 <= num_points <= num_vertices:
    raise ValueError(f"num_points={num_points}: need 3 to {num_vertices} (the mesh's vertices)")
  return np.sort(np.random.default_rng(seed).choice(num_vertices, num_points, replace=False))


class Stabilizer(nn.Module):
  """Two meshes -> the rigid transform from A's skull to B's (module docstring)."""

  num_points: int = 256  # N, the vertices read (one embedding and linear map each)
  point_seed: int = 0  # which N vertices (`point_indices`)
  width: int = 64  # per-point MLP width
  depth: int = 2  # per-point MLP layers
  head_width: int = 256  # MLP width after pooling
  embed_dim: int = 32  # learned embedding per vertex
  vertex_width: int = 64  # outputs of each encoder's vertex-wise linear map
  iterations: int = 2  # refinement steps, each with its own encoder
  position_scale: float = 10.0  # canonical positions (metres) are multiplied by this
  offset_scale: float = 100.0  # A-to-B offsets (metres) by this (centimetres)
  rotation_scale: float = 0.1  # the 6D residual is the identity plus this times the output
  translation_scale: float = 0.01  # metres per unit of the translation output
  dtype: jnp.dtype = jnp.float32  # compute dtype of the encoders

  @nn.compact
  def __call__(
    self, vertices: jax.Array, vertex_mask: jax.Array, reference: jax.Array, anchor: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """`vertices [B, 2, V, 3]`, `vertex_mask [B, 2, V]`, `reference [V, 3]`, `anchor [V]` ->
    (transform `[B, 4, 4]`, per-iteration estimates `[B, I, 4, 4]`)."""
    observed = jnp.all(jnp.asarray(vertex_mask, bool), axis=1)  # [B, V]
    # Unobserved vertices are never seen: zeroed before anything reads them.
    vertices = jnp.where(observed[:, None, :, None], jnp.asarray(vertices, jnp.float32), 0.0)
    anchored = observed * jnp.asarray(anchor, jnp.float32)  # [B, V]
    enough = jnp.sum(anchored > 0, axis=-1, keepdims=True) >= 3
    anchored = jnp.where(enough, anchored, observed.astype(jnp.float32))
    reference = jnp.asarray(reference, jnp.float32)
    estimate = jax.lax.stop_gradient(rigid.kabsch(vertices[:, 0], vertices[:, 1], anchored))
    canonical = jax.lax.stop_gradient(rigid.kabsch(reference, vertices[:, 1], anchored))
    to_canonical = rigid.invert_transform(canonical)  # [B, 4, 4]
    indices = point_indices(vertices.shape[2], self.num_points, self.point_seed)
    mask = observed[:, indices]  # [B, N]
    source, target = vertices[:, 0, indices], vertices[:, 1, indices]  # [B, N, 3] each
    target_c = rigid.apply_transform(to_canonical, target)  # [B, N, 3]
    embedding = nn.Embed(
      self.num_points,
      self.embed_dim,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), (None, "embed")),
      name="vertex_embedding",
    )(jnp.arange(self.num_points))  # [N, D]
    embedding = jnp.broadcast_to(embedding, (*target.shape[:2], self.embed_dim))
    estimates = []
    for i in range(self.iterations):
      # Each step starts from the previous estimate as a constant (as iterative refinement
      # usually does): a bad early estimate cannot feed gradients back through later steps.
      estimate = jax.lax.stop_gradient(estimate)
      moved_c = rigid.apply_transform(to_canonical @ estimate, source)
      offsets = jnp.where(mask[..., None], (target_c - moved_c) * self.offset_scale, 0.0)
      features = jnp.concatenate([target_c * self.position_scale, offsets, embedding], axis=-1)
      features = jnp.where(mask[..., None], features, 0.0).astype(self.dtype)
      encoder = PointEncoder(
        self.num_points,
        self.width,
        self.depth,
        self.head_width,
        self.vertex_width,
        name=f"encoder_{i}",
      )
      out = encoder(features, offsets.astype(self.dtype), mask).astype(jnp.float32)
      rotation = rotation_from_6d(jnp.asarray(IDENTITY_6D) + self.rotation_scale * out[:, :6])
      residual = rigid.make_transform(rotation, self.translation_scale * out[:, 6:])
      estimate = canonical @ residual @ to_canonical @ estimate
      estimates.append(estimate)
    return estimate, jnp.stack(estimates, axis=1)
