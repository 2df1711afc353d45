"""Load local Hugging Face checkpoints into the Flax parameter trees of fdjax models.

Where it sits: between a pretrained checkpoint directory on disk (what `save_pretrained` writes:
`config.json` plus `model.safetensors`, sharded `model-0000x-of-0000n.safetensors` with an index,
or the older `pytorch_model.bin`) and the modules in `fdjax/models`. Nothing is downloaded.

The first half is generic and meant to be shared by every converter (wav2vec2/HuBERT here, CLIP
and others beside it):
- `read_hf_config(directory)` -> dict,
- `read_state_dict(directory)` -> `StateDict`, whose `take(key)` hands out each tensor once and
  names the key and the file when one is missing, and whose `check_all_taken()` names the keys
  nobody used,
- `torch_dense_kernel` / `torch_conv1d_kernel`: torch weight layouts -> Flax kernel layouts,
- `expected_param_shapes(module, *args)` and `check_params_match(params, expected, source)`:
  the converted tree must have exactly the module's own paths and shapes.

The second half maps `Wav2Vec2Model` / `HubertModel` names (also inside `...ForCTC` and other
head checkpoints, whose head weights are ignored) onto `fdjax.models.wav2vec2.Wav2Vec2Encoder`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fdjax.models.wav2vec2 import Wav2Vec2Encoder

logger = logging.getLogger(__name__)

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
  """A checkpoint does not match the model: missing, unexpected or misshapen tensors."""


# ---------------------------------------------------------------------------------------------
# Generic: reading config and tensors.


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads `<directory>/config.json`."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


class StateDict:
  """Named tensors of one checkpoint, handed out by `take` so unused ones can be reported.

  Keys are the torch state-dict names (`encoder.layers.0.attention.q_proj.weight`). `source`
  names the file(s) the tensors came from, for error messages.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self.tensors = dict(tensors)
    self.source = source
    self.taken: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.tensors

  def keys(self) -> list[str]:
    return list(self.tensors)

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Returns tensor `key` (float32 for floating tensors), checking its shape if given."""
    if key not in self.tensors:
      near = [k for k in self.tensors if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
      hint = f"; present under that module: {near}" if near else ""
      raise CheckpointError(f"{self.source}: missing tensor {key!r}{hint}")
    value = self.tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise CheckpointError(
        f"{self.source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
        f"{tuple(shape)}"
      )
    self.taken.add(key)
    if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
      value = value.astype(np.float32)
    return value

  def skip(self, key: str) -> None:
    """Marks `key` as deliberately unused (a buffer such as `num_batches_tracked`)."""
    self.taken.add(key)

  def untaken(self, prefix: str = "") -> list[str]:
    """Keys starting with `prefix` that nothing took."""
    return sorted(k for k in self.tensors if k.startswith(prefix) and k not in self.taken)

  def check_all_taken(self, prefix: str = "") -> None:
    """Raises if any tensor under `prefix` was not used: the model would silently differ."""
    left = self.untaken(prefix)
    if left:
      shown = ", ".join(repr(k) for k in left[:10])
      more = f" and {len(left) - 10} more" if len(left) > 10 else ""
      raise CheckpointError(
        f"{self.source}: unexpected tensors the model has no place for: {shown}{more}"
      )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except TypeError:
    # numpy has no bfloat16: read through JAX on the host CPU, which yields ml_dtypes arrays.
    with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
      return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
  except Exception as e:  # safetensors raises its own error types; name the file.
    raise ValueError(f"{path}: cannot read safetensors file ({e})") from e


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{path}: reading pytorch_model.bin needs torch, which is not installed; convert the "
      "checkpoint to model.safetensors or install torch"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
  tensors = {}
  for key, value in state.items():
    if value.dtype == torch.bfloat16:
      value = value.float()
    tensors[key] = value.detach().cpu().numpy()
  return tensors


def _read_index(path: str) -> list[str]:
  with open(path) as f:
    index = json.load(f)
  if "weight_map" not in index:
    raise ValueError(f"{path}: index has no 'weight_map'")
  return sorted(set(index["weight_map"].values()))


def read_state_dict(directory: str | os.PathLike) -> StateDict:
  """Reads the weights of a checkpoint directory, preferring safetensors.

  Looks for, in order: model.safetensors, model.safetensors.index.json (shards),
  pytorch_model.bin, pytorch_model.bin.index.json (shards). `.bin` files need torch.
  """
  directory = os.fspath(directory)
  candidates = [
    (_SAFETENSORS, None, _read_safetensors),
    (_SAFETENSORS_INDEX, _read_index, _read_safetensors),
    (_TORCH_BIN, None, _read_torch_bin),
    (_TORCH_BIN_INDEX, _read_index, _read_torch_bin),
  ]
  for name, read_index, read_file in candidates:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    files = [path] if read_index is None else [os.path.join(directory, f) for f in read_index(path)]
    tensors: dict[str, np.ndarray] = {}
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: lists shard {file}, which does not exist")
      tensors.update(read_file(file))
    return StateDict(tensors, path)
  raise FileNotFoundError(
    f"{directory}: no weights found (looked for {', '.join(c[0] for c in candidates)})"
  )


def find_prefix(state: StateDict, anchor: str) -> str:
  """The prefix under which `anchor` sits: "" for a bare model, "wav2vec2." inside ForCTC."""
  prefixes = [k[: -len(anchor)] for k in state.keys() if k.endswith(anchor)]
  prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
  if len(prefixes) != 1:
    found = "none" if not prefixes else f"several: {prefixes}"
    raise CheckpointError(f"{state.source}: expected one tensor named '*{anchor}', found {found}")
  return prefixes[0]


# ---------------------------------------------------------------------------------------------
# Generic: layouts and tree checks.


def torch_dense_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def torch_conv1d_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv1d weight [out, in / groups, K] -> Flax kernel [K, in / groups, out]."""
  return np.ascontiguousarray(weight.transpose(2, 1, 0))


def _unbox(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def expected_param_shapes(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
  """The module's own (unboxed) param tree as ShapeDtypeStructs, without computing anything."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return _unbox(variables["params"])


def check_params_match(params: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> None:
  """Raises CheckpointError naming every path that is missing, unexpected or misshapen."""
  got = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(expected, sep="/")
  problems = [f"missing {p} {tuple(want[p].shape)}" for p in sorted(set(want) - set(got))]
  problems += [f"unexpected {p}" for p in sorted(set(got) - set(want))]
  problems += [
    f"{p} has shape {tuple(got[p].shape)}, the model expects {tuple(want[p].shape)}"
    for p in sorted(set(got) & set(want))
    if tuple(got[p].shape) != tuple(want[p].shape)
  ]
  if problems:
    raise CheckpointError(
      f"{source}: converted parameters do not fit the model: " + "; ".join(problems)
    )


def _stack(layers: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Per-layer trees -> one tree with a leading layer axis (the layout of scanned layers)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *layers)


# ---------------------------------------------------------------------------------------------
# wav2vec2 / HuBERT.

_WAV2VEC2_ANCHOR = "feature_extractor.conv_layers.0.conv.weight"
_WEIGHT_NORM_NAMES = (
  ("parametrizations.weight.original0", "parametrizations.weight.original1"),  # torch >= 2.1
  ("weight_g", "weight_v"),  # torch.nn.utils.weight_norm, older checkpoints
)


def _dense(state: StateDict, key: str, shape_in: int, shape_out: int) -> dict[str, np.ndarray]:
  return {
    "kernel": torch_dense_kernel(state.take(f"{key}.weight", (shape_out, shape_in))),
    "bias": state.take(f"{key}.bias", (shape_out,)),
  }


def _norm(state: StateDict, key: str, width: int) -> dict[str, np.ndarray]:
  return {
    "scale": state.take(f"{key}.weight", (width,)),
    "bias": state.take(f"{key}.bias", (width,)),
  }


def _positional_conv(state: StateDict, key: str, module: Wav2Vec2Encoder) -> dict[str, Any]:
  width, taps = module.hidden_size, module.num_conv_pos_embeddings
  shape = (width, width // module.num_conv_pos_embedding_groups, taps)  # torch [out, in / G, K]
  conv = f"{key}.conv"
  tree: dict[str, Any] = {"bias": state.take(f"{conv}.bias", (width,))}
  if module.conv_pos_batch_norm:
    norm = f"{key}.batch_norm"
    tree["batch_norm"] = {
      "scale": state.take(f"{norm}.weight", (width,)),
      "bias": state.take(f"{norm}.bias", (width,)),
      "mean": state.take(f"{norm}.running_mean", (width,)),
      "var": state.take(f"{norm}.running_var", (width,)),
    }
    if f"{norm}.num_batches_tracked" in state:
      state.skip(f"{norm}.num_batches_tracked")
    tree["kernel"] = torch_conv1d_kernel(state.take(f"{conv}.weight", shape))
    return tree
  for magnitude_name, direction_name in _WEIGHT_NORM_NAMES:
    if f"{conv}.{direction_name}" in state:
      magnitude = state.take(f"{conv}.{magnitude_name}", (1, 1, taps))
      direction = state.take(f"{conv}.{direction_name}", shape)
      break
  else:
    if f"{conv}.weight" not in state:
      looked = [f"{conv}.{n}" for pair in _WEIGHT_NORM_NAMES for n in pair] + [f"{conv}.weight"]
      raise CheckpointError(
        f"{state.source}: missing the positional conv weight (looked for {looked})"
      )
    # Weight norm already folded into a plain weight: any direction with the same tap norms works.
    direction = state.take(f"{conv}.weight", shape)
    magnitude = np.sqrt(np.sum(np.square(direction), axis=(0, 1), keepdims=True))
  tree["kernel_v"] = torch_conv1d_kernel(direction)
  tree["kernel_g"] = magnitude.reshape(taps)
  return tree


def _encoder_layer(state: StateDict, key: str, module: Wav2Vec2Encoder) -> dict[str, Any]:
  width, heads = module.hidden_size, module.num_attention_heads
  head_dim = width // heads
  attention: dict[str, Any] = {}
  for name in ("q_proj", "k_proj", "v_proj"):
    dense = _dense(state, f"{key}.attention.{name}", width, width)
    attention[name] = {
      "kernel": dense["kernel"].reshape(width, heads, head_dim),
      "bias": dense["bias"].reshape(heads, head_dim),
    }
  out = _dense(state, f"{key}.attention.out_proj", width, width)
  attention["out_proj"] = {
    "kernel": out["kernel"].reshape(heads, head_dim, width),
    "bias": out["bias"],
  }
  mlp = module.intermediate_size
  return {
    "attention": attention,
    "layer_norm": _norm(state, f"{key}.layer_norm", width),
    "feed_forward": {
      "intermediate_dense": _dense(state, f"{key}.feed_forward.intermediate_dense", width, mlp),
      "output_dense": _dense(state, f"{key}.feed_forward.output_dense", mlp, width),
    },
    "final_layer_norm": _norm(state, f"{key}.final_layer_norm", width),
  }


def convert_wav2vec2(state: StateDict, module: Wav2Vec2Encoder) -> dict[str, Any]:
  """Maps a `Wav2Vec2Model` / `HubertModel` state dict onto `module`'s param tree (numpy).

  Tensors outside the base model (CTC or classification heads, quantizer) are ignored and
  logged; an unused tensor inside it is an error, as is a missing one.
  """
  prefix = find_prefix(state, _WAV2VEC2_ANCHOR)
  p = prefix
  conv_layers = {}
  in_channels = 1
  for i, (channels, kernel) in enumerate(zip(module.conv_dim, module.conv_kernel, strict=True)):
    key = f"{p}feature_extractor.conv_layers.{i}"
    weight = state.take(f"{key}.conv.weight", (channels, in_channels, kernel))
    conv = {"kernel": torch_conv1d_kernel(weight)}
    if module.conv_bias:
      conv["bias"] = state.take(f"{key}.conv.bias", (channels,))
    layer: dict[str, Any] = {"conv": conv}
    if module.feat_extract_norm == "layer" or i == 0:
      layer["layer_norm"] = _norm(state, f"{key}.layer_norm", channels)
    conv_layers[f"conv_layers_{i}"] = layer
    in_channels = channels

  params: dict[str, Any] = {"feature_extractor": conv_layers}
  projection: dict[str, Any] = {
    "projection": _dense(
      state, f"{p}feature_projection.projection", in_channels, module.hidden_size
    )
  }
  if module.feat_proj_layer_norm:
    projection["layer_norm"] = _norm(state, f"{p}feature_projection.layer_norm", in_channels)
  params["feature_projection"] = projection

  if module.mask_time_prob > 0 or module.mask_feature_prob > 0:
    params["masked_spec_embed"] = state.take(f"{p}masked_spec_embed", (module.hidden_size,))
  elif f"{p}masked_spec_embed" in state:
    state.skip(f"{p}masked_spec_embed")  # the model masks nothing, so the embedding is unused

  encoder: dict[str, Any] = {
    "pos_conv_embed": _positional_conv(state, f"{p}encoder.pos_conv_embed", module),
    "layer_norm": _norm(state, f"{p}encoder.layer_norm", module.hidden_size),
  }
  layers = [
    _encoder_layer(state, f"{p}encoder.layers.{i}", module) for i in range(module.num_hidden_layers)
  ]
  if module.scan_layers:
    encoder["layers"] = _stack(layers)
  else:
    encoder.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  params["encoder"] = encoder

  state.check_all_taken(prefix)
  ignored = [k for k in state.keys() if not k.startswith(prefix)]
  if ignored:
    logger.info(
      "%s: ignoring %d tensors outside the base model: %s", state.source, len(ignored), ignored
    )
  dtype = np.dtype(module.param_dtype)
  return jax.tree.map(lambda x: np.asarray(x, dtype), params)


def load_wav2vec2(
  directory: str | os.PathLike, **overrides: Any
) -> tuple[Wav2Vec2Encoder, dict[str, Any]]:
  """Loads a local wav2vec2 / HuBERT checkpoint directory.

  Args:
    directory: holds config.json and model.safetensors (or pytorch_model.bin, or shards).
    **overrides: encoder fields to set beyond the checkpoint's config (dtype, scan_layers,
      dropout rates, ...).

  Returns:
    (module, params): the `Wav2Vec2Encoder` and its param tree as host numpy arrays of
    `param_dtype`; place them with `jax.device_put(params, shardings)`. Use as
    `module.apply({"params": params}, audio, audio_mask)`.
  """
  module = Wav2Vec2Encoder.from_hf_config(read_hf_config(directory), **overrides)
  state = read_state_dict(directory)
  params = convert_wav2vec2(state, module)
  dummy = jnp.zeros((1, module.receptive_field), jnp.float32)
  check_params_match(params, expected_param_shapes(module, dummy), state.source)
  return module, params


__all__ = [
  "CheckpointError",
  "StateDict",
  "check_params_match",
  "convert_wav2vec2",
  "expected_param_shapes",
  "find_prefix",
  "load_wav2vec2",
  "read_hf_config",
  "read_state_dict",
  "torch_conv1d_kernel",
  "torch_dense_kernel",
]
