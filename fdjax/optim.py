"""Optimizers and learning-rate schedules from `config.optim`, built from optax parts.

`make_optimizer` chains global-norm clipping, the base optimizer with its schedule and
weight-decay mask, and the trainable-parameter mask: parameters whose path matches a
`config.optim.freeze` regex go through `optax.set_to_zero()`, so they get no updates and hold
no optimizer state (`optax.masked` leaves `MaskedNode`s in their place).

The optimizer is `adam`, `adamw` or `sgd` (built from `b1`, `b2`, `eps`, `momentum`), or any
optax optimizer by name (`lion`, `adafactor`, ...), called with the schedule as its
`learning_rate` and `optimizer_kwargs`; `weight_decay` and the `weight_decay_exclude` mask go to
every optimizer that takes `weight_decay` (and `mask`). The schedule is `constant`, `linear` or
`cosine` after a linear warmup (built from `lr`, `warmup_steps`, `end_lr_factor`), or any optax
schedule by name (`warmup_cosine_decay_schedule`, ...) called with `schedule_kwargs`.

Parameter groups (`config.optim.groups`, name -> overrides of these same keys, with `pattern`
the regex over parameter paths, by default the name itself) get their own optimizer and
schedule through `optax.multi_transform`; freezing wins over groups, clipping is global.

Layer-wise learning-rate decay (`config.optim.layer_decay` d in (0, 1), as BEiT, MAE and
VideoMAE fine-tune): with L transformer blocks, block i (0-based, its index captured by the
regex `layer_decay_blocks`) gets its updates scaled by d^(L - i), the parameters matching
`layer_decay_embedding` (patch or tubelet embedding, a convolutional stem) by d^(L + 1), every
other parameter (final norm, fc_norm, head) by 1. The scale multiplies the whole update of the
optimizer, so for AdamW it is exactly a per-parameter learning rate (weight decay included, as
in MAE's param groups with `lr_scale`).
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

TRAINABLE, FROZEN = "trainable", "frozen"
BUILTIN_OPTIMIZERS = ("adam", "adamw", "sgd")
BUILTIN_SCHEDULES = ("constant", "linear", "cosine")
# Keys a parameter group cannot override: they act on the whole tree.
GLOBAL_KEYS = (
  "freeze",
  "groups",
  "clip_norm",
  "layer_decay",
  "layer_decay_blocks",
  "layer_decay_embedding",
)


def param_path(key_path: tuple) -> str:
  """`("encoder", "dense", "kernel")`-like key path as `"encoder/dense/kernel"`."""
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
  return "/".join(parts)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _path_predicate_tree(params: Any, patterns: Sequence[str]) -> Any:
  """True where a parameter's path matches any of `patterns` (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: any(c.search(param_path(kp)) for c in compiled), params, is_leaf=_is_box
  )


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
  """A tree of bools over `params` (boxed or not): False for frozen parameters."""
  return jax.tree.map(lambda frozen: not frozen, _path_predicate_tree(params, freeze))


def count_params(params: Any, freeze: Sequence[str] = ()) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  mask = trainable_mask(params, freeze)
  sizes = jax.tree.map(lambda p: int(getattr(p, "size", 0)), nn.unbox(params))
  total = sum(jax.tree.leaves(sizes))
  trainable = sum(s for s, t in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if t)
  return trainable, total


def _plain(value: Any) -> Any:
  """ConfigDicts (frozen or not) and other mappings as plain dicts, recursively."""
  if isinstance(value, Mapping) or hasattr(value, "items"):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _optax_names(accepts: Callable[[str, Callable], bool]) -> list[str]:
  names = []
  for name in dir(optax):
    fn = getattr(optax, name)
    if not name.startswith("_") and name.islower() and callable(fn):
      try:
        if accepts(name, fn):
          names.append(name)
      except (TypeError, ValueError):  # Objects without a signature are not candidates.
        continue
  return names


def optax_optimizer_names() -> list[str]:
  """optax functions that build an optimizer from a `learning_rate`."""
  return _optax_names(lambda _, fn: "learning_rate" in inspect.signature(fn).parameters)


def optax_schedule_names() -> list[str]:
  """optax schedule constructors (`*_schedule`, except `scale_by_schedule`)."""
  return _optax_names(lambda name, _: name.endswith("_schedule") and name != "scale_by_schedule")


def _unknown(field: str, name: str, candidates: Sequence[str], what: str) -> ValueError:
  close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.4)
  hint = f"; nearest: {', '.join(close)}" if close else ""
  return ValueError(f"config.{field}={name!r} is not {what}{hint}")


def _schedule(o: dict, total_steps: int, field: str) -> optax.Schedule:
  name = o["schedule"]
  if name not in BUILTIN_SCHEDULES:
    if name not in optax_schedule_names():
      raise _unknown(
        f"{field}.schedule", name, [*BUILTIN_SCHEDULES, *optax_schedule_names()], "a schedule"
      )
    if int(o["warmup_steps"]):
      raise ValueError(
        f"config.{field}.warmup_steps applies to {', '.join(BUILTIN_SCHEDULES)}; optax.{name} "
        f"takes its own warmup in config.{field}.schedule_kwargs"
      )
    try:
      return getattr(optax, name)(**o["schedule_kwargs"])
    except TypeError as e:
      raise TypeError(f"config.{field}.schedule_kwargs for optax.{name}: {e}") from None
  warmup = int(o["warmup_steps"])
  decay_steps = max(int(total_steps) - warmup, 1)
  lr = o["lr"]
  end = lr * o["end_lr_factor"]
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=o["end_lr_factor"])
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """`config.optim`'s schedule: linear warmup to `optim.lr`, then constant, linear or cosine
  decay to `end_lr_factor`; or the optax schedule `optim.schedule` of `schedule_kwargs`."""
  return _schedule(_plain(optim), total_steps, "optim")


def _base_optimizer(o: dict, schedule: optax.Schedule, field: str) -> optax.GradientTransformation:
  """The optimizer of `o` alone: no clipping, no freezing, no groups."""
  decay_mask = lambda params: jax.tree.map(
    lambda excluded: not excluded, _path_predicate_tree(params, o["weight_decay_exclude"])
  )
  name, kwargs = o["optimizer"], dict(o["optimizer_kwargs"])
  if name == "adam":
    return optax.adam(schedule, **{"b1": o["b1"], "b2": o["b2"], "eps": o["eps"], **kwargs})
  if name == "adamw":
    defaults = {"b1": o["b1"], "b2": o["b2"], "eps": o["eps"], "weight_decay": o["weight_decay"]}
    return optax.adamw(schedule, **{**defaults, "mask": decay_mask, **kwargs})
  if name == "sgd":
    parts = []
    if o["weight_decay"]:
      parts.append(optax.add_decayed_weights(o["weight_decay"], mask=decay_mask))
    parts.append(optax.sgd(schedule, **{"momentum": o["momentum"] or None, **kwargs}))
    return optax.chain(*parts)
  if name not in optax_optimizer_names():
    raise _unknown(
      f"{field}.optimizer", name, [*BUILTIN_OPTIMIZERS, *optax_optimizer_names()], "an optimizer"
    )
  fn = getattr(optax, name)
  accepted = inspect.signature(fn).parameters
  if "weight_decay" in accepted:
    kwargs.setdefault("weight_decay", o["weight_decay"])
    if "mask" in accepted:
      kwargs.setdefault("mask", decay_mask)
  elif o["weight_decay"]:
    raise ValueError(
      f"config.{field}.weight_decay={o['weight_decay']}: optax.{name} takes no weight_decay; "
      f"set its own decay argument in config.{field}.optimizer_kwargs"
    )
  try:
    return fn(learning_rate=schedule, **kwargs)
  except TypeError as e:
    raise TypeError(f"config.{field}.optimizer_kwargs for optax.{name}: {e}") from None


def _groups(o: dict) -> list[tuple[str, str, dict]]:
  """`(label, pattern, optim block with the group's overrides)` for each parameter group."""
  groups = []
  for name, overrides in o["groups"].items():
    overrides = dict(overrides)
    pattern = overrides.pop("pattern", name)
    field = f"optim.groups.{name}"
    for key in overrides:
      if key in GLOBAL_KEYS or key not in o:
        valid = [k for k in o if k not in GLOBAL_KEYS]
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"config.{field}.{key} cannot be set per group{hint}")
    group = {**o, **overrides}
    if "lr" in overrides and group["schedule"] not in BUILTIN_SCHEDULES:
      raise ValueError(
        f"config.{field}.lr has no effect on optax.{group['schedule']}: override "
        f"config.{field}.schedule_kwargs instead"
      )
    groups.append((f"group:{name}", pattern, group))
  return groups


def _group_labels(params: Any, freeze: Sequence[str], groups: list) -> Any:
  """Each parameter's label: FROZEN if frozen, else its group's, else TRAINABLE."""
  frozen = _path_predicate_tree(params, freeze)
  compiled = [(label, re.compile(pattern)) for label, pattern, _ in groups]
  used = set()

  def label(key_path, _, is_frozen):
    path = param_path(key_path)
    matches = [name for name, c in compiled if c.search(path)]
    if len(matches) > 1:
      raise ValueError(f"parameter {path!r} matches several optim groups: {', '.join(matches)}")
    used.update(matches)
    if is_frozen:
      return FROZEN
    return matches[0] if matches else TRAINABLE

  labels = jax.tree_util.tree_map_with_path(label, params, frozen, is_leaf=_is_box)
  for name, pattern, _ in groups:
    if name not in used:
      raise ValueError(f"config.optim.groups: {name} (pattern {pattern!r}) matches no parameter")
  return labels


def layer_decay_scales(params: Any, optim: Any) -> Any:
  """The per-parameter update scales of `config.optim.layer_decay` (see the module docstring):
  a tree of floats over `params`, all 1.0 when `layer_decay` is 0 or 1."""
  o = _plain(optim)
  decay = float(o["layer_decay"])
  paths = jax.tree_util.tree_map_with_path(lambda kp, _: param_path(kp), params)
  if decay in (0.0, 1.0):
    return jax.tree.map(lambda _: 1.0, paths)
  if not 0.0 < decay < 1.0:
    raise ValueError(f"config.optim.layer_decay={decay}: expected 0 (off) or a value in (0, 1)")
  blocks, embedding = re.compile(o["layer_decay_blocks"]), re.compile(o["layer_decay_embedding"])

  def block_index(path: str) -> int | None:
    found = blocks.search(path)
    if found is None:
      return None
    if not found.groups():
      raise ValueError(
        f"config.optim.layer_decay_blocks={blocks.pattern!r} must capture the block index "
        r"in a group, e.g. 'layers_(\d+)/'"
      )
    return int(found.group(1))

  indices = [i for i in map(block_index, jax.tree.leaves(paths)) if i is not None]
  if not indices:
    raise ValueError(
      f"config.optim.layer_decay_blocks={blocks.pattern!r} matches no parameter, so "
      "layer_decay has no blocks to decay over"
    )
  depth = max(indices) + 1

  def scale(path: str) -> float:
    index = block_index(path)
    if index is not None:
      return decay ** (depth - index)
    if embedding.search(path):
      return decay ** (depth + 1)
    return 1.0

  return jax.tree.map(scale, paths)


def scale_by_layer_decay(optim: Any) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_decay_scales` (stateless; scales are constants)."""

  def update(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, optim)
    return jax.tree.map(lambda u, k: u * k, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """Returns `(tx, schedule)` for `config.optim`; `tx` works on boxed or unboxed params.

  `schedule` is the main (ungrouped) schedule, the one the trainer logs.
  """
  o = _plain(optim)
  schedule = _schedule(o, total_steps, "optim")
  base = _base_optimizer(o, schedule, "optim")
  groups = _groups(o)
  if not groups:
    tx = optax.chain(optax.clip_by_global_norm(o["clip_norm"]), base) if o["clip_norm"] else base
    if o["freeze"]:
      labels = lambda params: jax.tree.map(
        lambda t: TRAINABLE if t else FROZEN, trainable_mask(params, o["freeze"])
      )
      tx = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
    return _with_layer_decay(tx, o), schedule
  transforms = {TRAINABLE: base, FROZEN: optax.set_to_zero()}
  for label, _, group in groups:
    field = "optim.groups." + label.removeprefix("group:")
    transforms[label] = _base_optimizer(group, _schedule(group, total_steps, field), field)
  tx = optax.multi_transform(transforms, lambda params: _group_labels(params, o["freeze"], groups))
  if o["clip_norm"]:
    tx = optax.chain(optax.clip_by_global_norm(o["clip_norm"]), tx)
  return _with_layer_decay(tx, o), schedule


def _with_layer_decay(tx: optax.GradientTransformation, o: dict) -> optax.GradientTransformation:
  if float(o["layer_decay"]) in (0.0, 1.0):
    return tx
  return optax.chain(tx, scale_by_layer_decay(o))
