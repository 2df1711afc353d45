"""Facial action-unit (AU) detection: a short face video window in, the AUs of its centre frame out.

The task family of the AU detectors (JAA-Net, ME-GraphAU, Hugging Rain Man) on BP4D- and
DISFA-layout data, multi-label. It follows the task contract of `fdjax/tasks/__init__.py` and
shares the model, batches and evaluation loop of `fdjax.tasks.dfer`:

- model: the same `clip` (`VideoClassifier`), `vivit` or `vit_mae` (`VideoViTClassifier`, a
  `mae_video` run's encoder by `config.model.init_from`) models with one logit per AU;
- loss: sigmoid binary cross-entropy per AU, averaged over AUs and clips, with per-AU positive
  weights `(1 - p_a) / p_a` from the training split's frame-level base rates `p_a` (capped at
  `config.loss.max_positive_weight`), so rare AUs are not drowned by their absence
  (`config.loss.positive_weighting`);
- evaluation: every window of the evaluation split once, at its centre frame: F1 per AU at
  `config.loss.threshold` (0.5 by docs/design.md section 5) and their mean `au_f1`;
- predict: `(params, video uint8 [b, T, H, W, 3]) -> {"probabilities", "logits"}` [b, A].

Config keys read (beyond the base config): those of `fdjax.tasks.dfer` with `data.aus` (the AU
numbers) in place of `data.class_names`, and `loss.positive_weighting`,
`loss.max_positive_weight`, `loss.threshold`, and `data.train_subjects` (train on the windows of
that many training subjects only, 0: all; `train_indices`) in place of
`data.train_examples_per_class`. The text classifier's prompts are keyed by AU
name (`"AU12"`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax import sharding as sharding_lib
from fdjax.metrics import classification
from fdjax.tasks import BATCH_DIM, ExportDim, dfer

init_fn = dfer.init_fn
load_pretrained = dfer.load_pretrained
saliency_fn = dfer.saliency_fn


def au_names(config: Any) -> tuple[str, ...]:
  """`("AU1", "AU2", ...)` for `config.data.aus`."""
  return tuple(f"AU{int(au)}" for au in config.data.aus)


def build_model(config: Any) -> nn.Module:
  names = au_names(config)
  return dfer.build_video_model(config, len(names), names)


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  batch = dfer.video_dummy_batch(config, batch_size, build_model(config))
  batch["aus"] = np.zeros((batch_size, len(config.data.aus)), np.float32)  # [B, A]
  return batch


def num_train_subjects(config: Any) -> int:
  """`config.data.train_subjects`, checked: a whole number >= 0 (0: every subject)."""
  return dfer.subset_size(
    config,
    "train_subjects",
    "subjects whose labelled windows are trained on; 0 keeps every subject",
  )


def window_subjects(config: Any) -> list[str]:
  """The subject of every window of the training split, in its order (cached in the workdir)."""
  split = dfer.split_name(config, "train")

  def compute() -> dict:
    source = dfer.open_split(config, split)
    subjects = []
    for i in range(len(source)):
      subject = source[i]["subject"]
      subjects.append(subject.decode() if isinstance(subject, bytes) else str(subject))
    return {"subjects": subjects}

  return dfer.cached_label_stats(config, f"{split}_subjects", compute)["subjects"]


def train_indices(config: Any) -> np.ndarray | None:
  """Ascending indices of the training windows of the `data.train_subjects` subjects kept (the
  first ones of the split's subjects in a fixed random order, `dfer.SUBSET_SEED`, so every seed
  and initialisation sees the same labels and a smaller set lies inside a larger one); None:
  every window."""
  k = num_train_subjects(config)
  if not k:
    return None
  subjects = np.asarray(window_subjects(config))
  names = np.unique(subjects)  # sorted
  kept = names[np.random.default_rng(dfer.SUBSET_SEED).permutation(len(names))[:k]]
  return np.flatnonzero(np.isin(subjects, kept))


def train_source(config: Any):
  """The training split, restricted to the windows of `data.train_subjects` subjects."""
  source = dfer.open_split(config, dfer.split_name(config, "train"))
  indices = train_indices(config)
  if indices is None:
    return source
  if jax.process_index() == 0:
    subjects = sorted(set(np.asarray(window_subjects(config))[indices].tolist()))
    print(
      f"data.train_subjects={num_train_subjects(config)}: training on the {len(indices)} of "
      f"{len(source)} windows of {dfer.split_name(config, 'train')} by {len(subjects)} "
      f"subjects ({', '.join(subjects)})",
      flush=True,
    )
  return dfer.IndexedSource(source, indices)


def train_data(config: Any, *, process_index: int, process_count: int):
  return dfer.video_train_data(
    config,
    build_model(config),
    process_index=process_index,
    process_count=process_count,
    source=train_source(config),
  )


def flops_per_example(config: Any) -> float:
  """As `fdjax.tasks.dfer.flops_per_example`, with one logit per AU."""
  model = build_model(config)
  backbone, head = dfer.forward_flops(config, model)
  backbone_factor = 1.0 if getattr(model, "stop_backbone_gradient", False) else 3.0
  return backbone_factor * backbone + 3.0 * head


def positive_rates(config: Any) -> np.ndarray:
  """Share of training frames on which each AU is present [A] (cached in the workdir), over the
  windows trained on (those of `data.train_subjects`)."""
  split = dfer.split_name(config, "train")
  k = num_train_subjects(config)
  name = f"{split}_{k}_subjects" if k else split

  def compute() -> dict:
    source = dfer.open_split(config, split)
    indices = train_indices(config)
    positives = np.zeros(len(config.data.aus), np.float64)
    frames = 0
    for i in range(len(source)) if indices is None else indices:
      frame_aus = np.asarray(source[i]["frame_aus"], np.float64)  # [T, A]
      positives += frame_aus.sum(axis=0)
      frames += len(frame_aus)
    if frames == 0:
      raise ValueError(f"{config.data.name} split {split!r} has no frames")
    return {"au_positive_rates": (positives / frames).tolist(), "num_frames": frames}

  return np.asarray(dfer.cached_label_stats(config, name, compute)["au_positive_rates"])


def positive_weights(rates: np.ndarray, max_weight: float) -> np.ndarray:
  """Per-AU weights of the positive term [A]: `(1 - p) / p`, in [1, max_weight].

  Never below 1 (a frequent AU is not down-weighted) and `max_weight` for an AU that never
  occurs in training.
  """
  rates = np.asarray(rates, np.float64)
  with np.errstate(divide="ignore"):
    weights = np.where(rates > 0, (1.0 - rates) / np.maximum(rates, 1e-12), max_weight)
  return np.clip(weights, 1.0, max_weight).astype(np.float32)


def make_loss_fn(config: Any):
  """Binary cross-entropy per AU, positives weighted if configured (see the module docstring)."""
  weights = np.ones(len(config.data.aus), np.float32)
  if config.loss.positive_weighting:
    weights = positive_weights(positive_rates(config), config.loss.max_positive_weight)
  return functools.partial(
    _loss, positive_weights=jnp.asarray(weights), threshold=config.loss.threshold
  )


def _loss(model, params, batch, rng, train, *, positive_weights, threshold):
  logits, _ = model.apply({"params": params}, batch["video"], train=train, rngs={"dropout": rng})
  labels = batch["aus"]  # [B, A]
  positive = -labels * jax.nn.log_sigmoid(logits) * positive_weights
  negative = -(1.0 - labels) * jax.nn.log_sigmoid(-logits)
  loss = jnp.mean(positive + negative)
  predicted = jax.nn.sigmoid(logits) >= threshold
  accuracy = jnp.mean(predicted == (labels > 0.5))
  return loss, {"au_accuracy": accuracy}


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict:
  """F1 per AU and the mean over AUs on `config.data.eval_split`, at the windows' centre frames.

  Every process evaluates the whole split (each batch sharded over the devices).
  """
  names = au_names(config)
  accumulator = classification.AUF1Accumulator(
    len(names), threshold=config.loss.threshold, au_names=names
  )
  split = dfer.split_name(config, "eval")
  for batch in dfer.eval_batches(
    config, model, split, sharding_lib.data_parallel_size(mesh, rules)
  ):
    logits = dfer.predict_logits(model, params, batch["video"], mesh, rules)
    accumulator.add(batch["aus"], jax.nn.sigmoid(logits), mask=batch["mask"])
  metrics = accumulator.compute()
  if jax.process_index() == 0:
    shown = "  ".join(f"{n} {metrics[f'au_f1/{n}']:.3f}" for n in names)
    print(
      f"\n{split} split, step {step}: {metrics['num_examples']} windows, mean AU F1 "
      f"{metrics['au_f1']:.4f}\n{shown}\n",
      flush=True,
    )
  return metrics


def predict_fn(config: Any, model: nn.Module):
  """`predict(params, video uint8 [b, T, H, W, 3]) -> {"probabilities", "logits"}` [b, A]:
  the probability of each AU at the centre frame of T consecutive frames."""
  size = dfer.image_size(model)

  def predict(params, video):
    logits = model.apply({"params": params}, video)[0]
    return {"probabilities": jax.nn.sigmoid(logits), "logits": logits}

  return predict, {"video": (f"b, {config.data.num_frames}, {size}, {size}, 3", "uint8")}


def export_dims(config: Any) -> list[ExportDim]:
  """`b` by `--batch`; the frames and the image size are the trained ones."""
  return [BATCH_DIM]


def export_metadata(config: Any) -> dict:
  model = build_model(config)
  return {
    "dataset": config.data.name,
    "class_names": list(au_names(config)),
    "aus": [int(a) for a in config.data.aus],
    "threshold": config.loss.threshold,
    "num_frames": config.data.num_frames,
    "image_size": dfer.image_size(model),
    "video": (
      "RGB uint8 frames [b, num_frames, image_size, image_size, 3]: consecutive frames centred "
      "on the frame whose AUs are predicted, each the centred face crop resized to image_size"
    ),
  }


def explain_example(config: Any, model: nn.Module, params: Any, *, split: str, index: int) -> dict:
  """The clip with each AU's probability (sigmoid) and its labelled AUs (for `fdjax explain`)."""
  found = dfer.explain_clip(config, model, params, split, index)
  logits, names = found["logits"], list(au_names(config))
  truth = ", ".join(n for n, y in zip(names, found["example"]["aus"]) if y > 0.5) or "none"
  return {
    **found,
    "class_names": names,
    "probabilities": 1.0 / (1.0 + np.exp(-logits)),
    "predicted": int(np.argmax(logits)),
    "truth": truth,
  }
