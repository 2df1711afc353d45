"""Face stabilisation: the rigid motion between the skulls under two meshes of one person.

"Learning to Stabilize Faces" (Bednarik et al. 2020), trained on pairs synthesised from the head
model (`data_pipelines/head_pairs.py`), whose parameters separate skull motion from skin motion.
It follows the task contract of `fdjax/tasks/__init__.py`:

- data: `vertices [B, 2, V, 3]` (mesh A, mesh B), `vertex_mask [B, 2, V]` (observed vertices),
  `transform [B, 4, 4]` (A's skull onto B's: `x_B = R x_A + t`), an endless stream of pairs;
- model: `fdjax.models.stabilizer.Stabilizer` (`config.model` holds its fields), given the head
  model's template as the reference of its canonical frame and the rigid region as the anchor
  of its initial alignment (so it starts from Procrustes on the rigid region and learns what
  that misses);
- loss: the skull vertex error in mm (`fdjax.metrics.rigid`) over the rigid region of mesh A,
  averaged over the refinement steps (each step's encoder learns from its own estimate);
- evaluation: `data.eval_pairs` held-out pairs (another stream of the generator: other
  identities, expressions and motions), with the model and two Procrustes baselines computed by
  the same code: Kabsch on all observed vertices (`procrustes_all`) and on the observed
  vertices of the rigid region (`procrustes_rigid`). Rotation error (deg), translation error
  (mm) and skull vertex error (mm) per system, and how far the rigid region itself moves
  non-rigidly within a pair (`rigid_region_motion_mm`: mean `|x_B - T x_A|` over the region,
  noise included);
- predict: `(params, vertices [b, 2, V, 3], vertex_mask [b, 2, V] bool) -> transform [b, 4, 4]`.

Config keys read (beyond the base config): `data.head_model` (a `generic_model.pkl`; "" = the
synthetic head model, seed 0), `data.rigid_region` (a vertex-index file; "" = the synthetic
model's `regions/rigid.txt`), the `head_pairs.PairOptions` fields under `data`,
`data.block_size`, `data.eval_pairs`, `data.eval_seed`, `data.eval_batch_size`, and
`config.model` (the `Stabilizer` fields).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import head_pairs, pipeline
from data_pipelines.synthetic import head_regions
from fdjax import step as step_lib
from fdjax.metrics import mesh as mesh_metrics
from fdjax.metrics import rigid
from fdjax.models import flame
from fdjax.models.stabilizer import Stabilizer

SYSTEMS = ("model", "procrustes_all", "procrustes_rigid")
METRICS = ("rotation_error_deg", "translation_error_mm", "skull_vertex_error_mm")


def head_model(config: Any) -> flame.FlameModel:
  """The head model `config.data.head_model` names ("" for the synthetic one)."""
  return flame.head_model(config.data.head_model)


def rigid_region(config: Any) -> mesh_metrics.RegionMask:
  """The named rigid (skull) region of the head model: Procrustes baseline and metric mask."""
  num_vertices = head_model(config).num_vertices
  if config.data.rigid_region:
    return mesh_metrics.load_region_mask(config.data.rigid_region, num_vertices)
  if config.data.head_model:
    raise ValueError(
      f"data.head_model={config.data.head_model!r} needs its rigid region: set "
      "data.rigid_region to a vertex-index file of its forehead, nose bridge and ear roots"
    )
  return mesh_metrics.RegionMask.from_array(
    head_regions.rigid_region(0), num_vertices, head_regions.RIGID
  )


def reference(config: Any) -> np.ndarray:
  """`[V, 3]`: the head model's template, the stabiliser's canonical frame."""
  return np.asarray(head_model(config).template, np.float32)


def anchor(config: Any) -> np.ndarray:
  """`[V]`: 1 on the rigid region, 0 elsewhere (the stabiliser's initial alignment, and the
  rigid-region Procrustes baseline)."""
  region = rigid_region(config)
  weights = np.zeros(region.num_vertices, np.float32)
  weights[region.indices] = 1.0
  return weights


def pair_source(config: Any, *, seed: int, stream: int, length: int = head_pairs.ENDLESS):
  return head_pairs.HeadPairSource(
    head_model(config),
    rigid_region(config).indices,
    head_pairs.PairOptions.from_config(config.data),
    seed=seed,
    stream=stream,
    length=length,
    block_size=config.data.block_size,
  )


def build_model(config: Any) -> Stabilizer:
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  return Stabilizer(**config.model, dtype=dtype)


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  num_vertices = head_model(config).num_vertices
  return {
    "vertices": np.zeros((batch_size, 2, num_vertices, 3), np.float32),
    "vertex_mask": np.ones((batch_size, 2, num_vertices), bool),
    "transform": np.tile(np.eye(4, dtype=np.float32), (batch_size, 1, 1)),
  }


def init_fn(model: Stabilizer, rngs: dict, batch: dict) -> dict:
  """The parameters depend on the shapes of the reference and the anchor only, so mesh B of the
  batch and all ones stand in for them."""
  vertices = batch["vertices"]
  return model.init(
    rngs, vertices, batch["vertex_mask"], vertices[0, 1], np.ones(vertices.shape[2])
  )


def train_data(config: Any, *, process_index: int, process_count: int):
  """The endless stream of training pairs (every index a fresh draw: no shuffling needed).

  The source renders blocks of pairs with JAX in the reading process (one call per block is
  the bulk of the work), so it runs without Grain worker processes.
  """
  if config.data.num_workers:
    raise ValueError(
      f"data.num_workers={config.data.num_workers}: the stabilize pairs are rendered with JAX "
      "in the training process; set it to 0"
    )
  return pipeline.train_dataset(
    pair_source(config, seed=config.seed, stream=head_pairs.TRAIN_STREAM),
    None,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    shuffle=False,
  )


def make_loss_fn(config: Any):
  """The skull vertex error (mm) over the rigid region, averaged over refinement steps."""
  return functools.partial(
    _loss,
    region=jnp.asarray(rigid_region(config).indices),
    reference=reference(config),
    anchor=anchor(config),
  )


def _loss(model, params, batch, rng, train, *, region, reference, anchor):
  del rng, train  # deterministic model
  transform, estimates = model.apply(
    {"params": params}, batch["vertices"], batch["vertex_mask"], reference, anchor
  )
  points = batch["vertices"][:, 0][:, region]  # [B, R, 3] the rigid region of mesh A
  truth = batch["transform"]
  per_step = rigid.skull_vertex_error_mm(estimates, truth[:, None], points[:, None])  # [B, I]
  return jnp.mean(per_step), {
    "skull_vertex_error_mm": jnp.mean(per_step[:, -1]),
    "rotation_error_deg": jnp.mean(rigid.rotation_error_deg(transform, truth)),
    "translation_error_mm": jnp.mean(rigid.translation_error_mm(transform, truth)),
  }


@functools.partial(jax.jit, static_argnames=("model",))
def _systems(model, params, vertices, vertex_mask, reference, anchor):
  """The transforms `[S, B, 4, 4]` of the model and of both baselines."""
  observed = jnp.all(vertex_mask, axis=1).astype(jnp.float32)  # [B, V]
  source, target = vertices[:, 0], vertices[:, 1]
  return jnp.stack(
    [
      model.apply({"params": params}, vertices, vertex_mask, reference, anchor)[0],
      rigid.kabsch(source, target, observed),
      rigid.kabsch(source, target, observed * anchor),
    ]
  )


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict[str, float]:
  """Rigid errors of the model and the Procrustes baselines on the held-out pairs."""
  region = rigid_region(config)
  source = pair_source(
    config, seed=config.data.eval_seed, stream=head_pairs.EVAL_STREAM, length=config.data.eval_pairs
  )
  batches = pipeline.eval_dataset(source, None, batch_size=config.data.eval_batch_size)
  replicated = NamedSharding(mesh, PartitionSpec())
  put = lambda x: jax.make_array_from_process_local_data(replicated, x)
  sums = {f"{s}/{m}": 0.0 for s in SYSTEMS for m in METRICS}
  sums["rigid_region_motion_mm"] = 0.0
  count = 0
  for batch in batches:
    transforms = np.asarray(
      jax.device_get(
        _systems(
          model,
          params,
          put(batch["vertices"]),
          put(batch["vertex_mask"]),
          put(reference(config)),
          put(anchor(config)),
        )
      )
    )
    truth, points = batch["transform"], batch["vertices"][:, 0][:, region.indices]
    for system, predicted in zip(SYSTEMS, transforms):
      errors = {
        "rotation_error_deg": rigid.rotation_error_deg(predicted, truth),
        "translation_error_mm": rigid.translation_error_mm(predicted, truth),
        "skull_vertex_error_mm": rigid.skull_vertex_error_mm(predicted, truth, points),
      }
      for metric, values in errors.items():
        sums[f"{system}/{metric}"] += float(np.sum(np.asarray(values, np.float64)))
    moved = np.asarray(rigid.apply_transform(truth, points))
    motion = np.linalg.norm(batch["vertices"][:, 1][:, region.indices] - moved, axis=-1)
    sums["rigid_region_motion_mm"] += float(rigid.MM_PER_METRE * motion.mean(-1).sum())
    count += len(truth)
  metrics = {key.removeprefix("model/"): value / count for key, value in sums.items()}
  metrics["num_pairs"] = float(count)
  if jax.process_index() == 0:
    _print_table(metrics, region.name, step)
    with open(os.path.join(workdir, "eval_masks.json"), "w") as f:
      json.dump({"skull_region": region.name}, f)
  return metrics


def _print_table(metrics: dict, region: str, step: int) -> None:
  rows = [
    ("rotation (deg)", "rotation_error_deg"),
    ("translation (mm)", "translation_error_mm"),
    (f"skull vertex [{region}] (mm)", "skull_vertex_error_mm"),
  ]
  print(
    f"\nheld-out pairs, step {step}: {int(metrics['num_pairs'])} pairs; the {region!r} region "
    f"moves {metrics['rigid_region_motion_mm']:.3f} mm non-rigidly (mean, noise included)"
  )
  print(f"{'error':<30}" + "".join(f"{s:>18}" for s in SYSTEMS))
  for label, key in rows:
    values = [metrics[key if s == "model" else f"{s}/{key}"] for s in SYSTEMS]
    print(f"{label:<30}" + "".join(f"{v:>18.4f}" for v in values))
  print(flush=True)


def predict_fn(config: Any, model: nn.Module):
  """`stabilize(params, vertices [b, 2, V, 3], vertex_mask [b, 2, V]) -> transform [b, 4, 4]`:
  the rigid motion taking the skull under `vertices[:, 0]` onto the one under `vertices[:, 1]`."""
  num_vertices = head_model(config).num_vertices
  template, weights = reference(config), anchor(config)

  def stabilize(params, vertices, vertex_mask):
    return model.apply({"params": params}, vertices, vertex_mask, template, weights)[0]

  return stabilize, {
    "vertices": (f"b, 2, {num_vertices}, 3", "float32"),
    "vertex_mask": (f"b, 2, {num_vertices}", "bool"),
  }


def export_metadata(config: Any) -> dict:
  return {
    "num_vertices": head_model(config).num_vertices,
    "rigid_region": rigid_region(config).name,
    "transform": (
      "[b, 4, 4] rigid motion taking the skull under vertices[:, 0] onto the skull under "
      "vertices[:, 1]: x1 = R x0 + t (R = T[:3, :3], t = T[:3, 3]); metres"
    ),
  }
