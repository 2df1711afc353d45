"""Experiment configs: the base config, loading config files, command-line overrides.

A config file is Python with `get_config(arg: str | None) -> ConfigDict`, optionally
`get_sweep() -> list[dict]` (big_vision style). It is named on the command line as
`path/to/file.py` or `path/to/file.py:key=value,key2=value2`; the part after `:` reaches
`get_config` as its string argument, and `parse_arg` turns it into typed fields. Overrides such
as `--config.optim.lr=3e-4` are then applied with type checking; an unknown key is an error that
names the nearest valid key. The result is frozen and written to `<workdir>/config.json`.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections import ConfigDict, FieldReference

DEFAULT_RULES = (
  # Logical axis -> mesh axes. Data parallelism over `data` and `fsdp`; parameters sharded
  # over `fsdp` on their embedding axis and over `tensor` on their wide axis.
  ("batch", ("data", "fsdp")),
  ("time", None),
  ("frames", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("head_dim", None),
  ("kv", None),
  ("vocab", "tensor"),
  ("classes", None),
  ("vertices", "tensor"),
  ("codebook", None),
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("kernel", None),
  ("norm", None),
  ("layers", None),
  ("height", None),
  ("width", None),
)


def base_config() -> ConfigDict:
  """Every key the framework reads, with its default. Experiments start from this."""
  c = ConfigDict()
  c.task = ""  # Task module: `audio2mesh` means `fdjax.tasks.audio2mesh`; or a full import path.
  c.model = ConfigDict()  # Passed as keyword arguments to the task's model (see the task).
  c.data = ConfigDict()  # Dataset name, directories and per-task input options.
  c.data.num_workers = 0  # Grain worker processes for per-example work (0: in-process).
  c.data.shuffle = True  # Shuffle the training set every epoch.

  c.optim = ConfigDict()
  # adam, adamw, sgd (from the fields below), or any optax optimizer by name (lion, adafactor,
  # ...), called with the schedule as `learning_rate` and `optimizer_kwargs`.
  c.optim.optimizer = "adamw"
  c.optim.optimizer_kwargs = ConfigDict()  # Extra keyword arguments of the optax optimizer.
  c.optim.lr = 1e-3  # Peak learning rate (constant, linear, cosine).
  # constant, linear, cosine (each after linear warmup, from lr, warmup_steps, end_lr_factor), or
  # any optax schedule by name (warmup_cosine_decay_schedule, ...) of `schedule_kwargs`.
  c.optim.schedule = "cosine"
  c.optim.schedule_kwargs = ConfigDict()  # Keyword arguments of an optax schedule by name.
  c.optim.warmup_steps = 0  # Linear warmup from 0 to `lr` over this many steps.
  c.optim.end_lr_factor = 0.0  # Final learning rate as a fraction of `lr` (linear, cosine).
  c.optim.b1 = 0.9  # Adam beta1 (also SGD momentum when `momentum` is 0).
  c.optim.b2 = 0.999  # Adam beta2.
  c.optim.eps = 1e-8  # Adam epsilon.
  c.optim.momentum = 0.0  # SGD momentum (0: plain SGD).
  # Decoupled weight decay (adamw, sgd, and any optax optimizer that takes `weight_decay`).
  c.optim.weight_decay = 0.0
  # No decay on these paths: biases, norm scales, embeddings, and the running statistics that
  # frozen batch norms keep among the parameters (HuBERT's positional-conv batch norm).
  c.optim.weight_decay_exclude = (r"bias$", r"scale$", r"embedding$", r"batch_norm/(mean|var)$")
  c.optim.clip_norm = 0.0  # Clip updates to this global gradient norm (0: no clipping).
  c.optim.freeze = ()  # Regexes over "/"-joined parameter paths: matches get no updates.
  # Parameter groups: name -> overrides of the keys above (lr, optimizer, optimizer_kwargs,
  # schedule, schedule_kwargs, weight_decay, ...) for the parameters whose path matches the
  # regex `pattern` (default: the name itself), e.g. {"^discriminator/": {"lr": 1e-4}}. A
  # parameter may match one group at most; freezing wins over groups; clipping stays global.
  c.optim.groups = ConfigDict()
  # Layer-wise lr decay d (0: off): block i of L gets d^(L - i), the embedding d^(L + 1), the
  # rest 1 (BEiT / MAE fine-tuning; fdjax/optim.py). Blocks: regex capturing the index.
  c.optim.layer_decay = 0.0
  c.optim.layer_decay_blocks = r"transformer/layers_(\d+)/"
  # Regex of the embedding (and a convolutional stem before it).
  c.optim.layer_decay_embedding = r"(tubelet|patch)_embedding/|stem_\d+_\d+/"

  c.ema = ConfigDict()
  # Exponential moving average of the parameters, used by evaluation and export (0: off).
  c.ema.decay = 0.0
  c.ema.start_step = 0  # Until this many updates the EMA copies the parameters, then averages.

  c.total_steps = 1000  # Training steps (optimizer updates).
  c.batch_size = 32  # Global batch size, over all processes and micro-batches.
  c.grad_accum_steps = 1  # Micro-batches per update, accumulated with lax.scan.
  c.seed = 0  # Seeds parameter init, dropout and the data order.

  c.mesh = ConfigDict()
  c.mesh.data = -1  # Data-parallel axis size (-1: all devices the other axes leave).
  c.mesh.fsdp = 1  # Fully-sharded data-parallel axis size.
  c.mesh.tensor = 1  # Tensor-parallel axis size.
  c.mesh.dcn_data = -1  # Across processes (multi-host): data axis part (-1: one per process).
  c.mesh.dcn_fsdp = 1  # Across processes: fsdp axis part.
  c.mesh.dcn_tensor = 1  # Across processes: tensor axis part.
  c.rules = DEFAULT_RULES  # Logical axis name -> mesh axis (or tuple, or None), in order.

  c.precision = ConfigDict()
  c.precision.compute_dtype = "auto"  # float32, bfloat16, or auto (bf16 on GPU/TPU, f32 on CPU).
  c.precision.matmul_precision = "default"  # jax_default_matmul_precision (default, highest).
  c.precision.attention_impl = "auto"  # xla, cudnn, or auto (cuDNN on GPU where it can, else XLA).

  c.log_every = 50  # Log training metrics every this many steps.
  c.eval_every = 1000  # Evaluate every this many steps (0: only at the end).
  c.max_consecutive_nonfinite = 10  # Stop after this many non-finite steps in a row.

  c.checkpoint = ConfigDict()
  c.checkpoint.every = 1000  # Save every this many steps (0: only at the end and on SIGTERM).
  c.checkpoint.keep = 3  # Keep the last this many checkpoints...
  c.checkpoint.keep_every = 0  # ...plus every checkpoint whose step divides by this (0: none).
  c.checkpoint.use_async = True  # Write checkpoints in the background.
  c.checkpoint.fallback_to_previous = False  # If the latest cannot be restored, try older ones.

  c.workdir = ""  # Set from --workdir; checkpoints, logs and config.json go there.
  c.compilation_cache_dir = "~/.cache/fdjax/xla"  # Persistent XLA compilation cache ("": off).
  c.transfer_guard = "disallow"  # jax_transfer_guard inside the train step (allow to debug).
  c.distributed_timeout_s = 300  # How long processes wait for each other to join.
  c.sweep_metric = "loss"  # Final metric that ranks sweep points.
  c.sweep_mode = "min"  # min or max: which end of `sweep_metric` is best.
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
  """Parses `key=value,key2=value2` (the part after `:`) with types taken from `defaults`.

  `parse_arg("variant=small,runlocal=True", variant="base", runlocal=False)` gives
  `ConfigDict(variant="small", runlocal=True)`. A key not in `defaults` is an error.
  """
  result = ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not of the form key=value")
    if key not in defaults:
      raise KeyError(_unknown_key_message(key, defaults.keys(), "config argument"))
    result[key] = _coerce(value, defaults[key], key)
  return result


def load_config(spec: str, overrides: Iterable[str] = ()) -> ConfigDict:
  """Loads `path.py[:arg]` (or a saved `config.json`), applies `--config.x.y=value` overrides,
  and returns it frozen."""
  path, _, arg = spec.partition(":")
  if path.endswith(".json"):
    if arg:
      raise ValueError(f"{spec}: a saved config.json takes no ':' arguments")
    with open(path) as f:
      config = fill_defaults(ConfigDict(json.load(f)))
    apply_overrides(config, overrides)
    return ml_collections.FrozenConfigDict(config)
  module = load_config_module(path)
  config = module.get_config(arg or None)
  if not isinstance(config, ConfigDict):
    raise TypeError(f"{spec}: get_config must return an ml_collections.ConfigDict")
  apply_overrides(config, overrides)
  return ml_collections.FrozenConfigDict(config)


def load_json_config(path: str) -> ml_collections.FrozenConfigDict:
  """The resolved config a run saved (`<workdir>/config.json`), frozen."""
  with open(path) as f:
    return ml_collections.FrozenConfigDict(fill_defaults(ConfigDict(json.load(f))))


def fill_defaults(config: ConfigDict) -> ConfigDict:
  """Adds, in place, the `base_config()` keys that a saved config lacks.

  A `config.json` written before a key existed (say `ema`) then reads with that key's default,
  which is the behaviour the run had.
  """

  def fill(node: ConfigDict, base: ConfigDict) -> None:
    for key, value in base.items():
      if key not in node:
        node[key] = value
      elif isinstance(value, ConfigDict) and isinstance(node[key], ConfigDict):
        fill(node[key], value)

  fill(config, base_config())
  return config


def load_config_module(path: str):
  """Imports a config file by path (its directory need not be a package)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  name = "fdjax_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config(arg)")
  return module


def apply_overrides(config: ConfigDict, overrides: Iterable[str | tuple[str, Any]]) -> ConfigDict:
  """Applies overrides in place.

  Each override is `"--config.a.b=value"`, `"a.b=value"`, or a `(dotted_key, value)` pair
  (sweeps). String values are parsed to the type of the current value; a key that does not
  exist is an error naming the nearest valid key.
  """
  valid = flat_keys(config)
  for override in overrides:
    if isinstance(override, tuple):
      key, raw = override
    else:
      text = override.removeprefix("--").removeprefix("config.")
      key, sep, raw = text.partition("=")
      if not sep:
        raise ValueError(f"override {override!r} is not of the form --config.key=value")
    if key not in valid:
      raise KeyError(_unknown_key_message(key, valid, "config key"))
    parent, _, leaf = key.rpartition(".")
    node = _get(config, parent)
    node[leaf] = _coerce(raw, node[leaf], key) if isinstance(raw, str) else raw
  return config


def flat_keys(config: Mapping) -> list[str]:
  """All dotted keys of `config`, containers and leaves, e.g. `optim`, `optim.lr`."""
  keys = []
  for k, v in config.items():
    keys.append(k)
    if isinstance(v, Mapping | ConfigDict):
      keys.extend(f"{k}.{sub}" for sub in flat_keys(v))
  return keys


def _get(config: ConfigDict, dotted: str) -> ConfigDict:
  node = config
  for part in filter(None, dotted.split(".")):
    node = node[part]
  return node


def _unknown_key_message(key: str, valid: Iterable[str], what: str) -> str:
  close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return f"unknown {what} {key!r}{hint}"


def _coerce(raw: str, current: Any, key: str) -> Any:
  """Parses `raw` to the type of `current`; errors name the key and the expected type."""
  if isinstance(current, FieldReference):
    current = current.get()
  if isinstance(current, bool):
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"config key {key!r} is a bool; cannot parse {raw!r}")
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw
    raise ValueError(f"config key {key!r} expects {type(current).__name__}; got {raw!r}") from None
  if current is None:
    return value
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  if isinstance(current, tuple | list) and isinstance(value, tuple | list):
    return type(current)(value)
  if isinstance(current, tuple | list) and not isinstance(value, tuple | list):
    return type(current)((value,))
  if isinstance(current, Mapping | ConfigDict) and isinstance(value, dict):
    return value
  if not isinstance(value, type(current)):
    raise ValueError(
      f"config key {key!r} expects {type(current).__name__}; got {raw!r} ({type(value).__name__})"
    )
  return value


def to_dict(config: ConfigDict) -> dict:
  """A plain, JSON-friendly dict of `config` (tuples become lists)."""
  return json.loads(config.to_json())


def config_hash(config: ConfigDict) -> str:
  """SHA-256 of the config's canonical JSON, ignoring the workdir (identical across hosts)."""
  d = to_dict(config)
  d.pop("workdir", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def save_config(config: ConfigDict, workdir: str) -> str:
  """Writes the resolved config to `<workdir>/config.json` and returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump(to_dict(config), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path
