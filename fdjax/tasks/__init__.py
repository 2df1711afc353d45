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

    train_data(config, *, process_index: int, process_count: int) -> grain.IterDataset
        This process's endless stream of training batches (numpy dicts), normally built with
        `data_pipelines.pipeline.train_dataset`; its iterator state is checkpointed.

    evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict[str, float]
        (optional) Metrics over the evaluation split(s), e.g. over whole test sequences.

    predict_fn(config, model) -> (predict, example_inputs)
        `predict(params, **inputs) -> outputs` is the function that export serialises;
        `example_inputs` is a dict of arrays with the inputs' shapes and dtypes.

    init_fn(model, rngs, batch) -> variables
        (optional) When `model.init(rngs, batch)` is not how the model is initialised.

    flops_per_example(config) -> float
        (optional) FLOPs of one training example, forward and backward, from an analytic count;
        the trainer then logs model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import importlib
from types import ModuleType

REQUIRED = ("build_model", "dummy_batch", "loss_fn", "train_data")


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
  if missing:
    raise AttributeError(f"task module {module.__name__} lacks {', '.join(missing)}")
  return module
