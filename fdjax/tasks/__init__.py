"""Task families. A task is one module; the trainer finds it from `config.task` by import path.

`config.task = "audio2mesh"` imports `fdjax.tasks.audio2mesh`; a dotted name such as
`"my_project.tasks.lipsync"` is imported as it is. Nothing central is edited to add a task.

A task module provides:

    build_model(config) -> flax.linen.Module
        The model, usually `Model(**config.model)`.

    dummy_batch(config, batch_size: int) -> dict[str, np.ndarray]
        A batch of the right keys, shapes and dtypes (DESIGN section 3) for `model.init` and
        shape inference. Any batch size; values need not be meaningful.

    loss_fn(model, params, batch, rng, train: bool) -> (loss, aux)
        `loss`: scalar mean over the batch's valid elements. `aux`: dict of scalar metrics;
        `aux["weight"]`, if present, is the number of valid elements the mean is over, which
        makes gradient accumulation exact for masked batches (see `fdjax.step`).
        A task whose loss has hyper-parameters provides instead
    make_loss_fn(config) -> loss_fn
        returning a function of that signature.

    train_data(config, *, process_index: int, process_count: int) -> grain.IterDataset
        This process's endless stream of training batches (numpy dicts), normally built with
        `data_pipelines.pipeline.train_dataset`; its iterator state is checkpointed.

    evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict[str, float]
        (optional) Metrics over the evaluation split(s), e.g. over whole test sequences.

    predict_fn(config, model) -> (predict, input_specs)
        `predict(params, **inputs) -> outputs` is the function that `fdjax export` serialises
        (`fdjax.export`); `outputs` is one array or a dict of named arrays. `input_specs` maps
        each input name to `(shape, dtype)`, the shape a string of dims such as `"b, s"` or
        `"b, 5023, 3"` and the dtype a numpy name such as `"float32"`. Named dims are symbolic
        (`jax.export.symbolic_shape`) and share one scope, so a name means the same size in
        every input: `b` batch, `t` frames, `s` audio samples. `fdjax export --batch 4
        --time 90` replaces `b` and `t` (and `s`, as `t * sample_rate / fps`) by sizes.
        Optional companions: `export_metadata(config) -> dict` (JSON values written to
        signature.json, e.g. `sample_rate`, `fps`, `num_vertices`, `class_names`,
        `audio_input`); `export_defaults(config) -> dict[str, np.ndarray]` (per-example values
        the server fills in for inputs a request leaves out, e.g. a `template` [V, 3]);
        `symbolic_constraints(config) -> list[str]` (e.g. `["s >= 400"]`).

    load_pretrained(config, params) -> params
        (optional) Parameters with pretrained parts filled in (e.g. from a local Hugging Face
        checkpoint); called on a fresh run only, before the first step. Shapes must not change.

    init_fn(model, rngs, batch) -> variables
        (optional) When `model.init(rngs, batch)` is not how the model is initialised.

    flops_per_example(config) -> float
        (optional) FLOPs of one training example, forward and backward, from an analytic count;
        the trainer then logs model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import importlib
from types import ModuleType

REQUIRED = ("build_model", "dummy_batch", "train_data")


def load_task(name: str) -> ModuleType:
  """Imports the task module named by `config.task` and checks it provides the contract."""
  if not name:
    raise ValueError("config.task is empty: name a task module, e.g. 'audio2mesh'")
  candidates = [name] if "." in name else [f"fdjax.tasks.{name}", name]
  errors = []
  for candidate in candidates:
    try:
      module = importlib.import_module(candidate)
      break
    except ModuleNotFoundError as e:
      if e.name is None or not candidate.startswith(e.name):
        raise
      errors.append(candidate)
  else:
    raise ModuleNotFoundError(f"config.task={name!r}: no module {' or '.join(errors)}")
  missing = [f for f in REQUIRED if not hasattr(module, f)]
  if not hasattr(module, "loss_fn") and not hasattr(module, "make_loss_fn"):
    missing.append("loss_fn (or make_loss_fn)")
  if missing:
    raise AttributeError(f"task module {module.__name__} lacks {', '.join(missing)}")
  return module


def task_loss_fn(task: ModuleType, config) -> object:
  """The task's loss function for `config` (`make_loss_fn(config)` or `loss_fn`)."""
  if hasattr(task, "make_loss_fn"):
    return task.make_loss_fn(config)
  return task.loss_fn
