"""CodeTalker stage 1: a VQ-VAE that reconstructs face motion through a discrete codebook.

The first of CodeTalker's two stages (Xing et al. 2023), on VOCASET- and BIWI-layout data; the
second stage (`audio2mesh` with `config.model.decoder.kind = "codetalker"`) predicts the codes
from audio and starts its frozen `decoder/prior` from this task's `prior` parameters. It follows
the task contract of `fdjax/tasks/__init__.py`, with the data, losses and evaluation of the
speech-mesh family (`fdjax/tasks/_speech_mesh.py`):

- model: `MotionAutoencoder` around a `MotionVQVAE` (parameters under `prior/`);
- loss: vertex MSE + velocity MSE in millimetres (optionally lip-weighted), plus the VQ loss
  (codebook + commitment), with codebook usage and perplexity logged;
- evaluation: whole test sequences reconstructed from their own motion, with the metrics and
  baselines of `audio2mesh` (how well the codebook can represent the motion, not how well
  audio predicts it);
- predict: `(params, vertices [b, t, V, 3], template [b, V, 3]) -> vertices [b, t, V, 3]`.

No FLOPs are counted (no MFU is logged). Config keys read (beyond the base config and
those of `_speech_mesh`): `model.decoder` (`kind` = "codetalker_vq", `variant`, MotionVQVAE
fields; the experiments' `num_styles` is ignored, stage 1 has no speaking style).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from fdjax import step as step_lib
from fdjax.models.audio2mesh import MotionAutoencoder
from fdjax.models.codetalker import MotionVQVAE
from fdjax.tasks import BATCH_DIM, ExportDim, _speech_mesh

KIND = "codetalker_vq"
# Keys of `config.model.decoder` that are not MotionVQVAE fields.
TASK_DECODER_KEYS = ("kind", "variant", "num_styles")

train_data = _speech_mesh.train_data


def build_model(config: Any) -> MotionAutoencoder:
  dec = config.model.decoder
  if dec.kind != KIND:
    raise ValueError(
      f"config.model.decoder.kind={dec.kind!r}: the motion_vq task trains {KIND!r} "
      "(CodeTalker stage 1); the other decoders are the audio2mesh task's"
    )
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  fields = _speech_mesh.module_fields(dec, *TASK_DECODER_KEYS)
  fields.update(dtype=dtype, attention_impl=config.precision.attention_impl)
  return MotionAutoencoder(prior=MotionVQVAE.from_variant(dec.variant, **fields))


def _num_vertices(config: Any) -> int:
  return build_model(config).prior.num_vertices


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  return _speech_mesh.dummy_batch(config, batch_size, _num_vertices(config))


def make_loss_fn(config: Any):
  """The reconstruction and VQ losses: see the module docstring."""
  return functools.partial(
    _loss,
    velocity_weight=config.loss.velocity_weight,
    lip_weights=_speech_mesh.lip_weights(config, _num_vertices(config)),
  )


def _loss(model, params, batch, rng, train, *, velocity_weight, lip_weights, collections=None):
  # With an EMA codebook (`ema_decay > 0`) the codebook is the `vq_ema` collection of the train
  # state: read here, and in training updated by the model and returned to the step.
  variables = {"params": params, **(collections or {})}
  mutable = list(collections) if train and collections else False
  outputs = model.apply(variables, batch, train=train, rngs={"dropout": rng}, mutable=mutable)
  (predicted, aux), updated = outputs if mutable else (outputs, None)
  loss, metrics = _speech_mesh.vertex_losses(
    predicted, batch, velocity_weight=velocity_weight, lip_weights=lip_weights
  )
  metrics.update(
    vq_loss=aux["vq_loss"], codebook_usage=aux["codebook_usage"], perplexity=aux["perplexity"]
  )
  if updated is not None:
    metrics["collections"] = updated
  return loss + aux["vq_loss"], metrics


@functools.partial(jax.jit, static_argnames=("model",))
def _reconstruct(model, variables, vertices, template):
  return model.apply(variables, vertices, template, method="generate")[0]


def evaluate(
  config, model, params, *, mesh, rules, workdir: str, step: int, collections=None
) -> dict[str, float]:
  """Metrics of the reconstructions of whole sequences of `config.data.eval_split`."""
  variables = {"params": params, **(collections or {})}

  def predict(batch, put):
    return _reconstruct(model, variables, put(batch["vertices"]), put(batch["template"]))

  return _speech_mesh.evaluate_sequences(
    config, predict, _num_vertices(config), mesh=mesh, workdir=workdir, step=step
  )


def predict_fn(config: Any, model: nn.Module):
  """`reconstruct(params, vertices [b, t, V, 3], template [b, V, 3]) -> vertices [b, t, V, 3]`."""
  num_vertices = _num_vertices(config)

  # An EMA codebook is a collection, so the export passes the variables dict (the contract).
  has_collections = config.model.decoder.get("ema_decay", 0.0) > 0

  def reconstruct(params, vertices, template):
    variables = params if has_collections else {"params": params}
    return model.apply(variables, vertices, template, method="generate")[0]

  return reconstruct, {
    "vertices": (f"b, t, {num_vertices}, 3", "float32"),
    "template": (f"b, {num_vertices}, 3", "float32"),
  }


def export_dims(config: Any) -> list[ExportDim]:
  """`b` by `--batch`, `t` (mesh frames) by `--time`."""
  return [BATCH_DIM, ExportDim("t", "--time", "mesh frames, or a dim name (default: symbolic)")]


def export_metadata(config: Any) -> dict:
  return _speech_mesh.export_metadata(config, _num_vertices(config))


def export_defaults(config: Any) -> dict[str, np.ndarray]:
  """None: a request sends the motion and its template, there is nothing to fill in."""
  return {}


def symbolic_constraints(config: Any) -> list[str]:
  """A reconstructed sequence has at least one frame."""
  return ["t >= 1"]
