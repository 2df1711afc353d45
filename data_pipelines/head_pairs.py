"""Pairs of head meshes of one person with a known skull motion: the stabilize task's data.

`HeadPairSource` is an endless, random-access Grain source: example `i` depends only on
`(seed, stream, i)`. Each example draws, from the head model (`fdjax/models/flame.py`):

- one identity (`num_shape` identity coefficients, standard normal);
- two expressions (`num_expression` coefficients, component `k` with standard deviation
  `expression_scale / (1 + k / 10)`, as PCA variances fall; each is neutral with probability
  `neutral_probability`), two jaw poses (opening uniform in `[0, jaw_open_max]` rad, sideways
  normal with `jaw_side_std` rad), two neck and eye poses (normal, `neck_std` / `eye_std` rad
  per axis): skin motion;
- a skull pose for mesh A (a rotation by up to `pose_rotation_deg` about a random axis and a
  translation of `translation_std` m per axis, applied to the model's output) and a skull motion
  from A to B (up to `motion_rotation_deg`, and a translation likewise);
- vertex noise (`noise_mm`, normal per coordinate) and, per mesh with probability
  `partial_probability`, a hole: the vertices within a radius (uniform in `partial_radius` m)
  of a random vertex of the template are unobserved.

Example (before batching), following docs/design.md section 3:

    vertices     float32 [2, V, 3]  mesh A (source), mesh B (target), noisy; unobserved vertices
                                    keep their true positions and are marked in vertex_mask
    vertex_mask  bool    [2, V]     observed vertices (consumers must ignore the others)
    transform    float32 [4, 4]     the rigid motion taking A's skull to B's: x_B = R x_A + t

The skull is what the skull joint carries: the joint with the largest skinning weight over the
rigid region (`skull_joint`; the root joint of the synthetic model, FLAME's neck joint where the
head is skinned to it). Its world transform, after the sampled rigid motion, is each mesh's
skull pose `S_A`, `S_B`, and `transform = S_B S_A^-1`, so a point fixed to the skull (in
the unposed, expressionless head) lands on it in both meshes. Neck and jaw rotations of joints
other than the skull joint, and expression, are skin motion the stabiliser must see through.
The rigid region itself moves with expression wherever the model's expression basis reaches it
(the synthetic model's upper-face components reach the forehead and nose bridge).

Rendering runs the head model once per block of `block_size` consecutive examples (one jitted
call over the block), cached, so a sequential reader pays one call per block.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.metrics import rigid
from fdjax.models import flame

# Streams of examples: the training stream and the held-out evaluation stream never share an
# example, whatever their seeds.
TRAIN_STREAM, EVAL_STREAM = 0, 1
# A length for the endless stream (Grain sources are sized); far beyond any run.
ENDLESS = 2**62


@dataclasses.dataclass(frozen=True)
class PairOptions:
  """How pairs are drawn (the `config.data` keys of the same names; see the module docstring)."""

  num_shape: int = 100
  num_expression: int = 50
  expression_scale: float = 0.5
  neutral_probability: float = 0.1
  jaw_open_max: float = 0.3
  jaw_side_std: float = 0.02
  neck_std: float = 0.05
  eye_std: float = 0.05
  pose_rotation_deg: float = 20.0
  motion_rotation_deg: float = 30.0
  translation_std: float = 0.02
  noise_mm: float = 0.2
  partial_probability: float = 0.3
  partial_radius: tuple[float, float] = (0.01, 0.04)

  @classmethod
  def from_config(cls, data: Any) -> PairOptions:
    """The options from `config.data` (keys not given keep their defaults)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: data[k] for k in fields if k in data}
    if "partial_radius" in values:
      values["partial_radius"] = tuple(float(r) for r in values["partial_radius"])
    return cls(**values)


def skull_joint(model: flame.FlameModel, region: np.ndarray) -> int:
  """The joint with the largest total skinning weight over `region` (vertex indices)."""
  weights = np.asarray(model.skinning_weights)[np.asarray(region)]  # [N, K]
  return int(weights.sum(0).argmax())


def _axis_angle(rng: np.random.Generator, max_deg: float) -> np.ndarray:
  """A rotation [3] by an angle uniform in [0, max_deg] about a uniformly random axis."""
  axis = rng.normal(size=3)
  return axis / np.linalg.norm(axis) * np.radians(rng.uniform(0.0, max_deg))


def _skull_transform(model, shape, expression, pose, posed_joints, joint: int) -> jax.Array:
  """World transform `[..., 4, 4]` of `joint` in the posed model (unposed rest -> posed)."""
  rotations = flame.rodrigues(pose.reshape(*pose.shape[:-1], -1, 3))  # [..., K, 3, 3]
  chain = [joint]
  while model.parents[chain[-1]] >= 0:
    chain.append(model.parents[chain[-1]])
  world = rotations[..., chain[-1], :, :]
  for k in reversed(chain[:-1]):  # root first
    world = world @ rotations[..., k, :, :]
  rest = flame.flame_forward(model, shape, expression, jnp.zeros_like(pose)).joints
  rest_joint = rest[..., joint, :]
  return rigid.make_transform(
    world, posed_joints[..., joint, :] - jnp.einsum("...ij,...j->...i", world, rest_joint)
  )


@functools.partial(jax.jit, static_argnames=("joint",))
def render_pairs(model, shape, expression, pose, rotation, translation, *, joint: int):
  """Meshes and skull transforms of a block of pairs.

  Args:
    model: the head model.
    shape: [n, S] identity of each pair.
    expression: [n, 2, E]; pose: [n, 2, 3 K] (the root joint's rotation zero).
    rotation, translation: [n, 2, 3] axis-angle and translation of mesh A's rigid motion
      (from the model's frame) and of the motion from A to B.
    joint: the skull joint.

  Returns:
    `vertices [n, 2, V, 3]` and `transform [n, 4, 4]` (A's skull onto B's).
  """
  start, step = jnp.unstack(rigid.make_transform(flame.rodrigues(rotation), translation), axis=1)
  motion = jnp.stack([start, step @ start], axis=1)  # [n, 2, 4, 4]
  shape = shape[:, None]
  out = flame.flame_forward(model, shape, expression, pose)
  skull = motion
  if joint != 0:  # the root's own transform is the identity: its rotation is zero here
    skull = motion @ _skull_transform(model, shape, expression, pose, out.joints, joint)
  vertices = rigid.apply_transform(motion, out.vertices)
  transform = skull[:, 1] @ rigid.invert_transform(skull[:, 0])
  return vertices, transform


class HeadPairSource:
  """Endless random-access source of mesh pairs (see the module docstring).

  `source[i]` is example `i` of `(seed, stream)`; `len(source)` is `ENDLESS` unless `length`
  is given (a fixed held-out set).
  """

  def __init__(
    self,
    model: flame.FlameModel,
    region: np.ndarray,
    options: PairOptions,
    *,
    seed: int,
    stream: int = TRAIN_STREAM,
    length: int = ENDLESS,
    block_size: int = 32,
  ):
    if options.num_shape > model.shape_basis.shape[-1]:
      raise ValueError(
        f"data.num_shape={options.num_shape}: the head model has {model.shape_basis.shape[-1]}"
      )
    if options.num_expression > model.expression_basis.shape[-1]:
      raise ValueError(
        f"data.num_expression={options.num_expression}: the head model has "
        f"{model.expression_basis.shape[-1]}"
      )
    self.model = model
    self.options = options
    self.seed, self.stream, self.length, self.block_size = seed, stream, length, block_size
    self.joint = skull_joint(model, region)
    self._template = np.asarray(model.template)
    self._expression_std = options.expression_scale / (
      1.0 + np.arange(options.num_expression) / 10.0
    )
    self._cache: OrderedDict[int, dict] = OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(f"pair {index} out of range [0, {self.length})")
    block, offset = divmod(index, self.block_size)
    with self._lock:
      arrays = self._cache.get(block)
      if arrays is None:
        arrays = self._render_block(block)
        self._cache[block] = arrays
        while len(self._cache) > 2:
          self._cache.popitem(last=False)
    return {k: v[offset] for k, v in arrays.items()}

  def _draw(self, index: int) -> dict[str, np.ndarray]:
    """The parameters, noise and masks of example `index` (numpy, from its own generator)."""
    o = self.options
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stream, index]))
    num_joints = self.model.num_joints
    expression = rng.normal(size=(2, o.num_expression)) * self._expression_std
    expression *= rng.uniform(size=(2, 1)) >= o.neutral_probability
    pose = np.zeros((2, num_joints, 3))
    pose[:, 1] = rng.normal(0.0, o.neck_std, size=(2, 3))  # neck
    if num_joints > 2:  # jaw: opening about the x axis, a little sideways
      pose[:, 2, 0] = rng.uniform(0.0, o.jaw_open_max, size=2)
      pose[:, 2, 1:] = rng.normal(0.0, o.jaw_side_std, size=(2, 2))
    pose[:, 3:] = rng.normal(0.0, o.eye_std, size=(2, num_joints - 3, 3))  # eyes
    rotation = np.stack(
      [_axis_angle(rng, o.pose_rotation_deg), _axis_angle(rng, o.motion_rotation_deg)]
    )
    noise = rng.normal(0.0, o.noise_mm / 1000.0, size=(2, *self._template.shape))
    mask = np.ones((2, len(self._template)), bool)
    for m in range(2):
      if rng.uniform() < o.partial_probability:
        centre = self._template[rng.integers(len(self._template))]
        radius = rng.uniform(*o.partial_radius)
        mask[m] = np.linalg.norm(self._template - centre, axis=-1) > radius
    return {
      "shape": rng.normal(size=o.num_shape),
      "expression": expression,
      "pose": pose.reshape(2, -1),
      "rotation": rotation,
      "translation": rng.normal(0.0, o.translation_std, size=(2, 3)),
      "noise": noise,
      "vertex_mask": mask,
    }

  def _render_block(self, block: int) -> dict[str, np.ndarray]:
    draws = [self._draw(block * self.block_size + k) for k in range(self.block_size)]
    stack = {k: np.stack([d[k] for d in draws]) for k in draws[0]}
    vertices, transform = render_pairs(
      self.model,
      jnp.asarray(stack["shape"], jnp.float32),
      jnp.asarray(stack["expression"], jnp.float32),
      jnp.asarray(stack["pose"], jnp.float32),
      jnp.asarray(stack["rotation"], jnp.float32),
      jnp.asarray(stack["translation"], jnp.float32),
      joint=self.joint,
    )
    return {
      "vertices": (np.asarray(vertices) + stack["noise"]).astype(np.float32),
      "vertex_mask": stack["vertex_mask"],
      "transform": np.asarray(transform, np.float32),
    }
