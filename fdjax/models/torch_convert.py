"""Reading a local PyTorch checkpoint file into the variables of a Flax module named like it.

Where it sits: between a `.pth` / `.pt` / `.model` file the user gives (a state dict, as
`torch.save(model.state_dict(), f)` writes it) and the evaluation networks whose Flax module
names mirror the torch module names (`fdjax/models/fid_inception.py`, `i3d.py`, `syncnet.py`).
Nothing is downloaded. Reading the file needs `torch` (a test dependency, not a runtime one).

The mapping is by name: a Flax path `a/b/kernel` is torch's `a.b.weight` (transposed from torch's
`[out, in, *window]` to Flax's `[*window, in, out]`), `a/b/scale` is `a.b.weight` (a norm),
`a/b/bias` is `a.b.bias`, and the `batch_stats` `a/b/mean`, `a/b/var` are `a.b.running_mean`,
`a.b.running_var`. Every tensor the module needs must be present with its shape and every tensor
in the file must be used (BatchNorm's `num_batches_tracked` aside), or one error names the file
and the tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from fdjax.models.hf_convert import CheckpointError, StateDict

_PARAM_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_SUFFIX = {"mean": "running_mean", "var": "running_var"}
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")


def read_torch_state_dict(path: str | os.PathLike, *, what: str) -> StateDict:
  """The tensors of the state dict saved in `path` (a `{"state_dict": ...}` wrapper and a
  DataParallel `module.` prefix are removed). `what` names the network in error messages."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such {what} checkpoint file")
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path}: reading a PyTorch checkpoint needs torch, not installed") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors alike; name the file.
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"{path}: not a readable PyTorch {what} checkpoint ({reason})") from e
  for wrapper in _WRAPPERS:
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a {what} state dict, found {type(state).__name__}")
  not_tensors = [str(k) for k, v in state.items() if not torch.is_tensor(v)]
  if not_tensors:
    raise ValueError(
      f"{path}: not a state dict of the {what} weights (entries {not_tensors[:5]} are not tensors)"
    )
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return StateDict({k: v.detach().float().numpy() for k, v in state.items()}, path)


def _torch_layout(flax_value: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """The map from a torch weight to the Flax layout of a leaf shaped like `flax_value`."""
  ndim = len(flax_value.shape)
  if ndim <= 1:
    return lambda w: w
  # torch [out, in, *window] -> Flax [*window, in, out]; Linear [out, in] -> Dense [in, out].
  order = tuple(range(2, ndim)) + (1, 0)
  return lambda w: np.ascontiguousarray(w.transpose(order))


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) <= 1:
    return tuple(flax_shape)
  return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])


def torch_keys(variables: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
  """Each (collection, *path) leaf of `variables` -> (its torch name, its torch shape)."""
  keys = {}
  for collection, suffixes in (("params", _PARAM_SUFFIX), ("batch_stats", _STAT_SUFFIX)):
    for path, leaf in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      name = ".".join((*path[:-1], suffixes[path[-1]]))
      keys[(collection, *path)] = (name, _torch_shape(tuple(leaf.shape)))
  return keys


def variables_from_state_dict(state: StateDict, module: nn.Module, *args: Any) -> dict[str, Any]:
  """`{"params", "batch_stats"}` of `module` (called on `args`, arrays or ShapeDtypeStructs)
  from the torch tensors of `state`, checking that every needed tensor is there with its shape
  and that none is left over."""
  expected = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)
  keys = torch_keys(expected)
  missing = [name for name, _ in keys.values() if name not in state]
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise CheckpointError(
      f"{state.source}: {len(missing)} of the {len(keys)} tensors of {type(module).__name__} "
      f"missing: {shown}"
    )
  leaves = traverse_util.flatten_dict(dict(expected))
  flat = {
    path: _torch_layout(leaves[path])(state.take(name, shape))
    for path, (name, shape) in keys.items()
  }
  for name in state.keys():
    if name.endswith("num_batches_tracked"):
      state.skip(name)
  state.check_all_taken()
  return traverse_util.unflatten_dict(flat)


def state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The torch state dict (numpy arrays) that `variables_from_state_dict` reads back as
  `variables`: for writing random checkpoints in tests and for exporting."""
  out = {}
  flat = traverse_util.flatten_dict({k: dict(v) for k, v in variables.items()})
  for path, (name, _) in torch_keys(variables).items():
    value = np.asarray(flat[path])
    if value.ndim > 1:
      order = (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
      value = value.transpose(order)
    out[name] = np.ascontiguousarray(value)
  return out
