"""What a speech-driven decoder's last layer predicts per frame, and how that becomes a mesh.

Where this sits: `NonAutoregressiveDecoder(output=...)` (`fdjax/models/motion_decoders.py`)
projects its features to `OutputHead.size` numbers per frame and hands them here; the task's
vertex losses and LVE then apply whatever the decoder predicts (docs/design.md section 18).

- "vertices": `V * 3` offsets added to the subject's template (FaceFormer and the rest).
- "flame": head-model coefficients, `E` expression coefficients then the jaw's axis-angle
  (EMOTE's 50 + 3), decoded through the differentiable head model (`fdjax/models/flame.py`):
  the subject's template is the model's template with its identity applied (`T + S beta`; zero
  pose adds nothing), so `shaped = template + E psi` and the jaw rotates it about its joint
  (`flame.articulate`). The head model is a `generic_model.pkl` path, "" for the synthetic one.
- "rig": `C` controller values (EmoFace's 174 MetaHuman controls) mapped to vertex offsets by a
  linear rig `[C, V, 3]`: a user's `.npy`/`.npz` file, or "" for the synthetic rig (each
  control a fixed random combination of the head model's expression blend shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models import flame

Array = jax.Array

OUTPUT_KINDS = ("vertices", "flame", "rig")
JAW = slice(6, 9)  # the jaw's axis-angle in FLAME's pose vector (global, neck, jaw, eyes)
EMOFACE_CONTROLS = 174  # MetaHuman controller values EmoFace predicts per frame


class RigFileError(ValueError):
  """A rig file that cannot be used; the message names the file."""


@functools.cache
def synthetic_rig(num_controls: int, seed: int = 0) -> np.ndarray:
  """`[C, V, 3]`: control c moves the synthetic head model's face by a fixed random
  combination of its expression blend shapes (unit-variance weights / sqrt(E))."""
  basis = np.asarray(flame.synthetic_head_model().expression_basis, np.float32)  # [V, 3, E]
  weights = np.random.default_rng(seed).normal(size=(num_controls, basis.shape[-1]))
  return np.einsum("ce,vde->cvd", weights / np.sqrt(basis.shape[-1]), basis).astype(np.float32)


@functools.cache
def load_rig(path: str, num_controls: int, num_vertices: int) -> np.ndarray:
  """A linear rig `[C, V, 3]` from an `.npy` (`[C, V, 3]` or `[C, 3 V]`) or an `.npz` whose key
  `rig` (or only array) is one; one-line `RigFileError` naming the file otherwise."""
  try:
    with open(path, "rb") as f:
      content = np.load(f, allow_pickle=False)
      if isinstance(content, np.lib.npyio.NpzFile):
        keys = content.files
        if "rig" not in keys and len(keys) != 1:
          raise RigFileError(f"{path}: an .npz rig needs a 'rig' array, has {keys}")
        content = content["rig" if "rig" in keys else keys[0]]
  except RigFileError:
    raise
  except Exception as e:  # noqa: BLE001  a stranger's file: name it, one line
    raise RigFileError(f"{path}: not a readable rig ({type(e).__name__}: {e})") from e
  rig = np.asarray(content)
  if rig.ndim == 2 and rig.shape[1] == 3 * num_vertices:
    rig = rig.reshape(rig.shape[0], num_vertices, 3)
  if rig.shape != (num_controls, num_vertices, 3) or rig.dtype.kind not in "fiu":
    raise RigFileError(
      f"{path}: rig must be [{num_controls}, {num_vertices}, 3] numbers, got {rig.dtype} "
      f"{rig.shape}"
    )
  if not np.isfinite(rig).all():
    raise RigFileError(f"{path}: rig has non-finite values")
  return rig.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class OutputHead:
  """How `size` numbers per frame become `vertices [B, T, V, 3]` (module docstring)."""

  kind: str = "vertices"  # one of OUTPUT_KINDS
  num_vertices: int = 5023  # V
  num_expression: int = 50  # E, "flame": expression coefficients predicted (first E of the model)
  head_model: str = ""  # "flame": generic_model.pkl path; "" = the synthetic head model
  num_controls: int = EMOFACE_CONTROLS  # C, "rig": controller values per frame
  rig: str = ""  # "rig": rig file path; "" = the synthetic rig

  def __post_init__(self) -> None:
    if self.kind not in OUTPUT_KINDS:
      raise ValueError(f"output={self.kind!r}: expected one of {OUTPUT_KINDS}")
    if self.kind == "flame":
      model = self.model()
      if model.num_vertices != self.num_vertices:
        raise ValueError(
          f"head model {self.head_model or 'synthetic'!r} has {model.num_vertices} vertices, the "
          f"decoder {self.num_vertices}"
        )
      if not 0 < self.num_expression <= model.expression_basis.shape[-1]:
        raise ValueError(
          f"num_expression={self.num_expression}: the head model has "
          f"{model.expression_basis.shape[-1]} expression components"
        )

  @property
  def size(self) -> int:
    """Numbers the decoder predicts per frame."""
    if self.kind == "flame":
      return self.num_expression + 3
    if self.kind == "rig":
      return self.num_controls
    return 3 * self.num_vertices

  def model(self) -> flame.FlameModel:
    return flame.head_model(self.head_model)

  def rig_matrix(self) -> np.ndarray:
    """`[C, V, 3]` the rig of kind "rig"."""
    if self.rig:
      return load_rig(os.path.abspath(self.rig), self.num_controls, self.num_vertices)
    rig = synthetic_rig(self.num_controls)
    if rig.shape[1] != self.num_vertices:
      raise ValueError(
        f"the synthetic rig is for {rig.shape[1]} vertices, the decoder has {self.num_vertices}; "
        "give a rig file"
      )
    return rig

  def to_vertices(self, outputs: Array, template: Array) -> tuple[Array, dict[str, Array]]:
    """`outputs [B, T, size]` and `template [B, V, 3]` -> `vertices [B, T, V, 3]` and the
    outputs by name: `{"expression": [B, T, E], "jaw": [B, T, 3]}` ("flame"), `{"controls":
    [B, T, C]}` ("rig"), `{}` ("vertices")."""
    outputs = outputs.astype(jnp.float32)
    template = template.astype(jnp.float32)[:, None]  # [B, 1, V, 3]
    batch, frames = outputs.shape[:2]
    if self.kind == "vertices":
      return template + outputs.reshape(batch, frames, self.num_vertices, 3), {}
    if self.kind == "rig":
      offsets = jnp.einsum(
        "btc,cvd->btvd", outputs, jnp.asarray(self.rig_matrix()), precision="highest"
      )
      return template + offsets, {"controls": outputs}
    model = self.model()
    expression, jaw = outputs[..., : self.num_expression], outputs[..., self.num_expression :]
    shaped = template + flame.blend(expression, model.expression_basis)  # [B, T, V, 3]
    pose = jnp.zeros((batch, frames, 3 * model.num_joints), jnp.float32).at[..., JAW].set(jaw)
    return flame.articulate(model, shaped, pose).vertices, {"expression": expression, "jaw": jaw}
