"""Optimizers and learning-rate schedules from `config.optim`, built from optax parts.

`make_optimizer` chains global-norm clipping, the base optimizer (adam, adamw, sgd) with its
schedule and weight-decay mask, and the trainable-parameter mask: parameters whose path matches
a `config.optim.freeze` regex go through `optax.set_to_zero()`, so they get no updates and hold
no optimizer state (`optax.masked` leaves `MaskedNode`s in their place).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

TRAINABLE, FROZEN = "trainable", "frozen"


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


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then constant, linear or cosine decay to `end_lr_factor`."""
  warmup = int(optim.warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)
  end = optim.lr * optim.end_lr_factor
  if optim.schedule == "constant":
    main = optax.constant_schedule(optim.lr)
  elif optim.schedule == "linear":
    main = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor)
  else:
    raise ValueError(
      f"config.optim.schedule={optim.schedule!r}: expected constant, linear or cosine"
    )
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), main], [warmup])


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """Returns `(tx, schedule)` for `config.optim`; `tx` works on boxed or unboxed params."""
  schedule = make_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(
    lambda excluded: not excluded, _path_predicate_tree(params, optim.weight_decay_exclude)
  )
  if optim.optimizer == "adam":
    base = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif optim.optimizer == "adamw":
    base = optax.adamw(
      schedule,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    )
  elif optim.optimizer == "sgd":
    parts = []
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=optim.momentum or None))
    base = optax.chain(*parts)
  else:
    raise ValueError(f"config.optim.optimizer={optim.optimizer!r}: expected adam, adamw or sgd")
  tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), base) if optim.clip_norm else base
  if optim.freeze:
    labels = lambda params: jax.tree.map(
      lambda t: TRAINABLE if t else FROZEN, trainable_mask(params, optim.freeze)
    )
    tx = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule
