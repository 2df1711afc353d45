"""Task families. A task is one module; the trainer finds it from `config.task` by import path.

`config.task = "audio2mesh"` imports `fdjax.tasks.audio2mesh`; a dotted name such as
`"my_project.tasks.lipsync"` is imported as it is. Nothing central is edited to add a task.
Shared pieces of a family live in a private module beside its tasks (`_video.py`, say).

The contract is `TaskModule` below: every hook a task module may define, with its signature.
`load_task(name)` imports the module, checks it against `TaskModule` (required hooks present,
every hook's parameters named and marked as there) and returns a `Task`: one attribute per
hook, so no caller probes a module with `hasattr`. The rule for optional hooks: the attribute
is always callable; a hook the module does not define is its default (written beside the hook
below), and where behaviour, not a value, depends on whether the task defines a hook (no
`evaluate`: no eval record; no `predict_fn`: nothing to export; no `flops_per_example`: no MFU;
no saliency hooks: nothing to explain) the default raises `MissingHookError` naming the task,
and callers ask `task.has(name)` first.

Conventions the hooks follow:

- Mutable collections: when the train state has collections besides params (BatchNorm
  "batch_stats"), the step calls `loss_fn(model, params, batch, rng, train, collections=...)`
  and in training the loss returns the updated collections in `aux["collections"]`; tasks
  without collections are called as today. (`evaluate` then also gets `collections=`.)
- Training step: a loss that declares a `step` keyword gets the number of updates made so far
  (an int32 scalar) in training, for schedules inside the loss (scheduled sampling).
- EMA: when `config.ema.decay > 0`, evaluate/export receive the EMA parameters.
- The adversarial pattern: two networks trained in one step by one combined loss whose parts
  stop each other's gradients (the generator's loss sees the discriminator's params through
  jax.lax.stop_gradient, the discriminator's loss sees stop_gradient'ed fakes), so each
  network's params receive only their own loss's gradient.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Protocol

REQUIRED = ("build_model", "dummy_batch", "train_data")
LOSS_HOOKS = ("loss_fn", "make_loss_fn")  # a task defines one of them


@dataclasses.dataclass(frozen=True)
class ExportDim:
  """A symbolic dim of a task's exported inputs and how `fdjax export` may fix it.

  `fdjax export` adds `flag` to its command line (and accepts `--dim SYMBOL=VALUE` for every
  dim): an integer fixes the dim, a name renames it, nothing leaves it symbolic. A dim with
  `derive` that is not given is fixed from the dims in `needs` once they all are, e.g.
  `ExportDim("s", derive=lambda sizes: round(sizes["t"] * 16000 / 30), needs=("t",))`.
  """

  symbol: str  # Its name in the `predict_fn` input specs: "b", "t", "s", "steps", "views".
  flag: str | None = None  # The `fdjax export` flag that fixes it ("--batch"); None: `--dim`.
  help: str = ""  # The flag's help text: what the dim counts.
  derive: Callable[[Mapping[str, int]], int] | None = None  # Its size from fixed sizes.
  needs: tuple[str, ...] = ()  # The dims `derive` reads.


BATCH_DIM = ExportDim("b", "--batch", "batch size, or a dim name (default: symbolic)")


class MissingHookError(ValueError):
  """A task was asked for a hook it does not define (and the hook has no default value)."""


class TaskModule(Protocol):
  """The hooks of a task module; a module satisfies it with functions of these signatures.

  Required: `build_model`, `dummy_batch`, `train_data`, and `loss_fn` or `make_loss_fn`. The
  others are optional, each with the default its docstring names. Parameters after `*` must
  be keyword-only in the task too; a parameter with a default here (`collections`) is passed
  only in some runs, by keyword, so a task that never gets it need not declare it.
  """

  def build_model(self, config: Any) -> Any:
    """The model (a `flax.linen.Module`), usually `Model(**config.model)`."""

  def dummy_batch(self, config: Any, batch_size: int) -> dict[str, Any]:
    """A batch (numpy arrays) of the right keys, shapes and dtypes (docs/design.md section 3) for
    `model.init` and shape inference. Any batch size; values need not be meaningful."""

  def train_data(self, config: Any, *, process_index: int, process_count: int) -> Any:
    """This process's endless stream of training batches (numpy dicts): a `grain.IterDataset`,
    normally built with `data_pipelines.pipeline.train_dataset`; its iterator state is
    checkpointed."""

  def loss_fn(
    self, model: Any, params: Any, batch: dict, rng: Any, train: bool, *, collections: Any = None
  ) -> tuple[Any, dict]:
    """`(loss, aux)`. `loss`: scalar mean over the batch's valid elements. `aux`: dict of
    scalar metrics; `aux["weight"]`, if present, is the number of valid elements the mean is
    over, which makes gradient accumulation exact for masked batches (see `fdjax.step`).
    `collections` (a state with mutable collections only; see the module docstring): the
    collections, and with `train` the loss returns the updated ones in `aux["collections"]`."""

  def make_loss_fn(self, config: Any) -> Callable[..., tuple[Any, dict]]:
    """Instead of `loss_fn`, for a loss with hyper-parameters: returns a function of
    `loss_fn`'s signature. Default: `loss_fn` itself."""

  def evaluate(
    self,
    config: Any,
    model: Any,
    params: Any,
    *,
    mesh: Any,
    rules: Any,
    workdir: str,
    step: int,
    collections: Any = None,
  ) -> dict[str, float]:
    """Metrics over the evaluation split(s), e.g. over whole test sequences. Absent: the trainer
    writes no eval record. `collections` as for `loss_fn`."""

  def predict_fn(self, config: Any, model: Any) -> tuple[Callable[..., Any], dict]:
    """`(predict, input_specs)`. `predict(params, **inputs) -> outputs` is the function that
    `fdjax export` serialises (`fdjax.export`); `outputs` is one array or a dict of named
    arrays. `input_specs` maps each input name to `(shape, dtype)`, the shape a string of dims
    such as `"b, s"` or `"b, 5023, 3"` and the dtype a numpy name such as `"float32"`. Named
    dims are symbolic (`jax.export.symbolic_shape`) and share one scope, so a name means the
    same size in every input: `b` batch, `t` frames, `s` audio samples; `export_dims` says
    which ones `fdjax export` may fix. A model with mutable collections gets, in place of
    `params`, its whole variables dict `{"params": ..., "batch_stats": ...}` (the EMA or raw
    parameters as chosen, and the collections as saved). Absent: the task cannot be
    exported."""

  def export_dims(self, config: Any) -> Sequence[ExportDim]:
    """The symbolic dims of the inputs and how `fdjax export` may fix them (`ExportDim`), e.g.
    `b` by `--batch`, `t` by `--time`, `s` derived from `t`. Default: `b` by `--batch`."""

  def export_metadata(self, config: Any) -> dict[str, Any]:
    """JSON values written to signature.json, e.g. `sample_rate`, `fps`, `num_vertices`,
    `class_names`, `audio_input`. Default: `{}`."""

  def export_defaults(self, config: Any) -> dict[str, Any]:
    """Per-example values (numpy arrays) the server fills in for inputs a request leaves out,
    e.g. a `template` [V, 3]. Default: `{}`."""

  def symbolic_constraints(self, config: Any) -> list[str]:
    """Constraints on the symbolic dims, e.g. `["s >= 400"]`. Default: `[]`."""

  def stream_fn(self, config: Any, model: Any) -> tuple[dict, dict] | None:
    """Further functions `fdjax export` writes beside `predict` (a causal model's
    `stream_init`, `stream_step`): `({name: (fn, input_specs)}, metadata)`, the metadata going
    to `signature["metadata"]["streaming"]`; or None. Default: None."""

  def export_functions(self, config: Any, model: Any) -> dict:
    """Further functions of the model `fdjax export` writes beside `predict`, taking the same
    parameters and dims: `{name: (fn, input_specs)}` (a talking-head run's stage-1
    `portrait_code` and `render` beside its sampler). Default: `{}`."""

  def load_pretrained(self, config: Any, params: Any) -> Any:
    """Parameters with pretrained parts filled in (e.g. from a local Hugging Face checkpoint);
    called on a fresh run only, before the first step. Shapes must not change. Default: the
    parameters as they are (the trainer skips the call)."""

  def init_fn(self, model: Any, rngs: dict, batch: dict) -> dict:
    """The model's variables, when `model.init(rngs, batch)` is not how the model is
    initialised. Default: `model.init(rngs, batch)`."""

  def flops_per_example(self, config: Any) -> float:
    """FLOPs of one training example, forward and backward, from an analytic count; the trainer
    then logs model FLOPs utilisation (MFU). Absent: no MFU."""

  def explain_example(
    self, config: Any, model: Any, params: Any, *, split: str, index: int
  ) -> dict:
    """For `fdjax explain`: example `index` of `split` ("test"/"eval": the evaluation split,
    "train": the training split, or a split's own name) prepared as evaluation prepares it, and
    the model's scores on it: `{"split": the split's name, "frames": [T, H, W, 3] uint8 (what
    the strip shows), "class_names": [K], "probabilities": [K], "predicted": int, "truth": str}`
    plus whatever `saliency_fn` needs. An `index` out of range raises IndexError naming
    `--index`. Absent (with `saliency_fn`): the task cannot be explained."""

  def saliency_fn(
    self, config: Any, model: Any, params: Any, example: dict, *, method: str, target: int
  ) -> dict:
    """For `fdjax explain`: the saliency of output `target` on `example` (from
    `explain_example`) by `method` (the task's methods; an unknown one raises ValueError naming
    them): `{"saliency": [T, H, W] >= 0, "what": a caption, "target": the output explained, or
    None for a method that explains no single output}`."""


HOOKS = tuple(
  name for name, value in vars(TaskModule).items() if callable(value) and not name.startswith("_")
)


def _absent(task: str, hook: str) -> Callable[..., Any]:
  consequence = {
    "evaluate": "so it has no evaluation",
    "predict_fn": "so it cannot be exported",
    "flops_per_example": "so its FLOPs (and MFU) are unknown",
    "explain_example": "so fdjax explain cannot explain it",
    "saliency_fn": "so fdjax explain cannot explain it",
  }.get(hook, "")

  def missing(*args: Any, **kwargs: Any) -> Any:
    raise MissingHookError(
      f"task {task!r} defines no {hook}{', ' if consequence else ''}{consequence}"
    )

  return missing


def _default_export_dims(config: Any) -> Sequence[ExportDim]:
  return (BATCH_DIM,)


def _default_init_fn(model: Any, rngs: dict, batch: dict) -> dict:
  return model.init(rngs, batch)


# The default of each optional hook that has a default value (the others: `_absent`).
DEFAULTS: dict[str, Callable[..., Any]] = {
  "export_dims": _default_export_dims,
  "export_metadata": lambda config: {},
  "export_defaults": lambda config: {},
  "symbolic_constraints": lambda config: [],
  "stream_fn": lambda config, model: None,
  "export_functions": lambda config, model: {},
  "load_pretrained": lambda config, params: params,
  "init_fn": _default_init_fn,
}


@dataclasses.dataclass(frozen=True)
class Task:
  """A task module resolved against the contract: one attribute per hook (see `TaskModule`).

  `task.has(hook)` says whether the module defines `hook` itself (else the attribute is the
  contract's default); `task.module` is the module, `task.name` the `config.task` it came from.
  """

  name: str
  module: ModuleType
  defined: frozenset[str]
  build_model: Callable[..., Any]
  dummy_batch: Callable[..., Any]
  train_data: Callable[..., Any]
  loss_fn: Callable[..., Any]
  make_loss_fn: Callable[..., Any]
  evaluate: Callable[..., Any]
  predict_fn: Callable[..., Any]
  export_dims: Callable[..., Any]
  export_metadata: Callable[..., Any]
  export_defaults: Callable[..., Any]
  symbolic_constraints: Callable[..., Any]
  stream_fn: Callable[..., Any]
  export_functions: Callable[..., Any]
  load_pretrained: Callable[..., Any]
  init_fn: Callable[..., Any]
  flops_per_example: Callable[..., Any]
  explain_example: Callable[..., Any]
  saliency_fn: Callable[..., Any]

  def has(self, hook: str) -> bool:
    """Whether the task module defines `hook` (rather than taking the contract's default)."""
    if hook not in HOOKS:
      raise ValueError(f"{hook!r} is not a task hook (the contract's hooks: {', '.join(HOOKS)})")
    return hook in self.defined


def expected_signature(hook: str) -> inspect.Signature:
  """The signature `TaskModule` gives `hook`, without `self` and without annotations."""
  signature = inspect.signature(getattr(TaskModule, hook))
  parameters = [
    p.replace(annotation=inspect.Parameter.empty) for p in list(signature.parameters.values())[1:]
  ]
  return signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def signature_problem(hook: str, fn: Callable[..., Any]) -> str | None:
  """What is wrong with `fn` as hook `hook` (None: it fits the contract).

  The contract's positional parameters must come first, in order and by name; its
  keyword-only ones must be keyword-only (or taken by `**kwargs`); one with a default there
  may be left out, and if declared must be accepted by keyword; parameters the contract does
  not name need defaults.
  """
  if not callable(fn):
    return f"is a {type(fn).__name__}, not a function"
  try:
    actual = inspect.signature(fn)
  except (TypeError, ValueError):
    return None  # A builtin or extension function: nothing to read its parameters from.
  expected = list(expected_signature(hook).parameters.values())
  params = list(actual.parameters.values())
  var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
  var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
  positional = [p for p in params if p.kind in _POSITIONAL]
  by_name = {p.name: p for p in params}
  used = set()
  wanted_positional = [p for p in expected if p.kind in _POSITIONAL]
  for i, want in enumerate(wanted_positional):
    if i >= len(positional):
      if var_positional:
        continue
      return f"lacks positional parameter {i + 1} {want.name!r}"
    have = positional[i]
    if have.name != want.name:
      return f"names positional parameter {i + 1} {have.name!r}, expected {want.name!r}"
    used.add(have.name)
  for want in expected:
    if want.kind is not inspect.Parameter.KEYWORD_ONLY:
      continue
    have = by_name.get(want.name)
    optional = want.default is not inspect.Parameter.empty
    if have is None:
      if not (optional or var_keyword):
        return f"lacks keyword-only parameter {want.name!r}"
      continue
    used.add(have.name)
    if optional:
      if have.kind is inspect.Parameter.POSITIONAL_ONLY:
        return f"takes {want.name!r} positional-only, but it is passed by keyword"
    elif have.kind is not inspect.Parameter.KEYWORD_ONLY:
      return f"takes {want.name!r} positionally: it must be keyword-only (after `*`)"
  for p in params:
    if p.name in used or p.kind in (
      inspect.Parameter.VAR_POSITIONAL,
      inspect.Parameter.VAR_KEYWORD,
    ):
      continue
    if p.default is inspect.Parameter.empty:
      return f"has parameter {p.name!r}, which the contract does not pass (give it a default)"
  return None


def missing_hooks(module: ModuleType) -> list[str]:
  """The required hooks `module` lacks, each with its expected signature."""
  name = module.__name__
  missing = [
    f"{name} lacks {hook}{expected_signature(hook)}"
    for hook in REQUIRED
    if not hasattr(module, hook)
  ]
  if not any(hasattr(module, hook) for hook in LOSS_HOOKS):
    missing.append(
      f"{name} lacks loss_fn{expected_signature('loss_fn')} "
      f"(or make_loss_fn{expected_signature('make_loss_fn')})"
    )
  return missing


def wrong_signatures(module: ModuleType) -> list[str]:
  """The hooks of `module` whose signatures do not fit the contract, with the expected ones."""
  wrong = []
  for hook in HOOKS:
    if hasattr(module, hook):
      problem = signature_problem(hook, getattr(module, hook))
      if problem:
        wrong.append(
          f"{module.__name__}.{hook} {problem}; expected {hook}{expected_signature(hook)}"
        )
  return wrong


def check_task(module: ModuleType) -> list[str]:
  """The contract problems of a task module, one message each (empty: it conforms).

  Each message names the module, the hook and the expected signature.
  """
  return missing_hooks(module) + wrong_signatures(module)


def import_task_module(name: str) -> ModuleType:
  """The module `config.task = name` names (`fdjax.tasks.<name>`, else `name` itself)."""
  if not name:
    raise ValueError("config.task is empty: name a task module, e.g. 'audio2mesh'")
  candidates = [name] if "." in name else [f"fdjax.tasks.{name}", name]
  errors = []
  for candidate in candidates:
    try:
      return importlib.import_module(candidate)
    except ModuleNotFoundError as e:
      if e.name is None or not candidate.startswith(e.name):
        raise
      errors.append(candidate)
  raise ModuleNotFoundError(f"config.task={name!r}: no module {' or '.join(errors)}")


def resolve_task(module: ModuleType, name: str | None = None) -> Task:
  """`module` checked against the contract and resolved into a `Task` (see `load_task`)."""
  name = name or module.__name__
  missing, wrong = missing_hooks(module), wrong_signatures(module)
  if missing:
    raise AttributeError(f"task module {module.__name__}: " + "; ".join(missing + wrong))
  if wrong:
    raise TypeError(f"task module {module.__name__}: " + "; ".join(wrong))
  defined = frozenset(hook for hook in HOOKS if hasattr(module, hook))
  hooks = {}
  for hook in HOOKS:
    if hook in defined:
      hooks[hook] = getattr(module, hook)
    elif hook in DEFAULTS:
      hooks[hook] = DEFAULTS[hook]
    else:
      hooks[hook] = _absent(name, hook)
  if "make_loss_fn" not in defined:
    loss = module.loss_fn
    hooks["make_loss_fn"] = lambda config: loss
  return Task(name=name, module=module, defined=defined, **hooks)


def load_task(name: str) -> Task:
  """Imports the task module named by `config.task`, checks it against the contract
  (`TaskModule`) and returns it resolved (`Task`).

  Raises AttributeError for a missing required hook and TypeError for a hook of the wrong
  signature, naming the module, the hook and the expected signature.
  """
  return resolve_task(import_task_module(name), name)


def task_loss_fn(task: Task, config: Any) -> Callable[..., Any]:
  """The task's loss function for `config` (`make_loss_fn(config)`, or `loss_fn`)."""
  return task.make_loss_fn(config)
