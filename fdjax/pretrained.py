"""Weights from elsewhere merged into a fresh parameter tree: one way for every task.

Where it sits: on a fresh run (no checkpoint in the workdir yet), after the parameters are
initialised, the trainer calls `apply_init_from(config, params)`, which reads
`config.model.init_from`; task config keys that name weights (audio2mesh's
`model.encoder.checkpoint` and `model.prior_workdir`, dfer's `model.clip_checkpoint` and
`model.clip_workdir`) are aliases that the task's `load_pretrained` turns into the same specs
and merges with `merge_specs`. Nothing here builds the other run's model or imports the trainer.

A spec is `SOURCE[:SUBTREE]`, several separated by commas:

- SOURCE: an fdjax workdir (its latest checkpoint); a checkpoint directory
  (`<workdir>/checkpoints`, one step `<workdir>/checkpoints/<step>`, or an Orbax PyTree
  directory: the step's `state/` item, or a parameter tree saved with
  `orbax.checkpoint.StandardCheckpointer`); or a local Hugging Face directory (`config.json`
  and weights) of a model type fdjax converts: `wav2vec2` and `hubert` (the encoder's tree,
  `fdjax.models.hf_convert`) and `clip` (`{"vision", "text"}`, `fdjax.models.hf_clip`). In an
  Orbax tree with a top-level `params` (a train state, or flax variables) the parameters are
  that entry, otherwise the whole tree.
- SUBTREE: a '/'-path of parameter names that is the same in the source and in the model
  (`decoder/vq`, `encoder`), or `SRC=>DST` where they differ (`prior=>decoder/prior` puts
  CodeTalker stage 1's VQ-VAE under stage 2's decoder; an empty side is the root, so
  `=>encoder` puts a whole Hugging Face wav2vec2 in `encoder`). Omitted: the whole tree.
  The last `:` of a spec separates SOURCE from SUBTREE.

A spec without SUBTREE whose SOURCE is an fdjax run of a task in `RUN_SUBTREES` takes that
task's reusable subtree into the same path when the model is not that run's model (its
top-level parameter names differ): `--config.model.init_from=runs/mae` from a `mae_video` run
into a `VideoViTClassifier` means `runs/mae:encoder` (the MAE's decoder has no place in a
classifier), while into another `VideoMAE` it still means the whole tree.

From an fdjax workdir or checkpoint whose state keeps an EMA of the parameters
(`config.ema.decay > 0`), the EMA is what is read: the weights the run evaluated and exported
with (`fdjax.trainer.select_params`).

Every leaf under DST must be in SRC and every leaf of SRC under DST, with the same shape
(errors name the path and both shapes; a missing subtree names what exists there); merged
values take the dtype of the fresh parameters, and every other parameter keeps its fresh value.

    fdjax train --config experiments/audio2mesh/vocaset.py:variant=codetalker \\
        --config.model.init_from=runs/stage1:prior=>decoder/prior --workdir runs/stage2
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fdjax.optim import param_path

# Tasks whose runs, named bare in a spec, give one subtree to a model other than their own.
RUN_SUBTREES = {"mae_video": "encoder"}
# Hugging Face `model_type`s that fdjax converts, with what their converted tree holds.
HF_MODEL_TYPES = {"wav2vec2": "encoder", "hubert": "encoder", "clip": "vision, text"}


@dataclasses.dataclass(frozen=True)
class InitFrom:
  """One parsed spec: the parameters at `source_path` of `source` go to `target_path`."""

  source: str  # workdir, checkpoint directory or Hugging Face directory
  source_path: str = ""  # '/'-path in the source's parameters ("" = all of them)
  target_path: str = ""  # '/'-path in the model's parameters ("" = all of them)

  def __str__(self) -> str:
    if self.source_path == self.target_path:
      return f"{self.source}:{self.source_path}" if self.source_path else self.source
    return f"{self.source}:{self.source_path}=>{self.target_path}"


def parse_spec(spec: str) -> list[InitFrom]:
  """The `InitFrom`s of a comma-separated `SOURCE[:SUBTREE]` string (see the module docstring)."""
  parsed = []
  for item in spec.split(","):
    item = item.strip()
    if not item:
      continue
    source, sep, subtree = item.rpartition(":")
    if not sep:
      source, subtree = item, ""
    if not source:
      raise ValueError(f"init_from {item!r}: no source directory before ':'")
    if "=>" in subtree:
      src, _, dst = subtree.partition("=>")
    else:
      src = dst = subtree
    parsed.append(InitFrom(source, src.strip("/"), dst.strip("/")))
  return parsed


def apply_init_from(config: Any, params: Any) -> Any:
  """`params` with the parameters `config.model.init_from` names merged in (unchanged if unset).

  Called by the trainer on a fresh run only, after the task's own `load_pretrained`.
  """
  # Task configs without weight reuse (the tests' tiny task) have no `init_from` key at all.
  spec = config.model.get("init_from", "")
  if not spec:
    return params
  specs = [default_subtree(s, params) for s in parse_spec(spec)]
  return merge_specs(params, specs, where="config.model.init_from")


def run_config(source: str) -> Any | None:
  """The saved config (`config.json`) of the fdjax run in workdir `source`, or None when
  `source` is not a workdir with checkpoints."""
  path = os.path.join(source, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(source, "checkpoints"))):
    return None
  from fdjax import config as config_lib

  return config_lib.load_json_config(path)


def default_subtree(spec: InitFrom, params: Any) -> InitFrom:
  """`spec` with `RUN_SUBTREES`' subtree filled in when it names no subtree, its source is a
  run of such a task, and the model's top-level parameter names are not the run's."""
  if spec.source_path or spec.target_path:
    return spec
  config = run_config(spec.source)
  name = RUN_SUBTREES.get(config.get("task", "")) if config is not None else None
  if name is None or not isinstance(params, dict) or name not in params:
    return spec
  if set(params) == set(_source_params_metadata(spec.source)):
    return spec
  return InitFrom(spec.source, name, name)


def merge_specs(
  params: Any, specs: Sequence[InitFrom], *, where: str = "init_from", keep_fresh: str = ""
) -> Any:
  """`params` with each spec's subtree merged in, in order (later specs win where they overlap).

  `keep_fresh`: a regex over '/'-paths; parameters it matches keep their fresh values and may
  be absent from the source (leaves of the source that it matches are ignored), as LoRA and
  adapters do when CLIP towers are loaded under them.
  """
  hf_trees: dict[str, Any] = {}  # One conversion per Hugging Face directory and call.
  for spec in specs:
    label = f"{where} {str(spec)!r}"
    if _is_hf_directory(spec.source):
      if spec.source not in hf_trees:
        hf_trees[spec.source] = read_hf_params(spec.source)
      loaded = subtree(
        hf_trees[spec.source], spec.source_path, what=f"the parameters of {spec.source}"
      )
    else:
      loaded = read_checkpoint_params(spec.source, spec.source_path)
    params = merge_subtree(params, loaded, spec.target_path, where=label, keep_fresh=keep_fresh)
  return params


def merge_subtree(
  params: Any, loaded: Any, target_path: str, *, where: str, keep_fresh: str = ""
) -> Any:
  """`params` with the subtree at `target_path` replaced by `loaded` (same tree and shapes)."""
  fresh = subtree(params, target_path, what=f"{where}: the model's parameters")

  def full(path: str) -> str:
    return "/".join(p for p in (target_path, path) if p)

  fresh_flat, treedef = jax.tree_util.tree_flatten_with_path(fresh)
  loaded_flat = {param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}

  def kept(path: str) -> bool:
    return bool(keep_fresh) and re.search(keep_fresh, full(path)) is not None

  loaded_flat = {p: v for p, v in loaded_flat.items() if not kept(p)}
  fresh_paths = {param_path(p) for p, _ in fresh_flat}
  extra = sorted(set(loaded_flat) - fresh_paths)
  if extra:
    raise ValueError(
      f"{where}: the source has parameters the model lacks under {target_path or 'the root'}: "
      + ", ".join(full(p) for p in extra[:5])
    )
  missing = sorted(p for p in fresh_paths - set(loaded_flat) if not kept(p))
  if missing:
    raise ValueError(f"{where}: the source lacks " + ", ".join(full(p) for p in missing[:5]))
  leaves = []
  for key_path, leaf in fresh_flat:
    path = param_path(key_path)
    if path not in loaded_flat:
      leaves.append(leaf)
      continue
    value = loaded_flat[path]
    if np.shape(value) != np.shape(leaf):
      raise ValueError(
        f"{where}: {full(path)} has shape {tuple(np.shape(value))} in the source but "
        f"{tuple(np.shape(leaf))} in the model"
      )
    leaves.append(np.asarray(value, dtype=leaf.dtype))
  return _replace_subtree(params, target_path, jax.tree_util.tree_unflatten(treedef, leaves))


def subtree(tree: Any, path: str, *, what: str) -> Any:
  """The node of nested dicts `tree` at '/'-path `path`; a missing name is an error naming
  the names that exist at that level."""
  node = tree
  walked = []
  for name in path.split("/") if path else ():
    if not isinstance(node, dict) or name not in node:
      here = "/".join(walked) or "the root"
      names = sorted(map(str, node)) if isinstance(node, dict) else []
      raise ValueError(
        f"{what} have no {path!r}: at {here} there is no {name!r}, only "
        + (", ".join(names) if names else "a leaf")
      )
    node = node[name]
    walked.append(name)
  return node


def _replace_subtree(tree: Any, path: str, value: Any) -> Any:
  if not path:
    return value
  name, _, rest = path.partition("/")
  out = dict(tree)
  out[name] = _replace_subtree(tree[name], rest, value)
  return out


# ----------------------------------------------------------------------------------------------
# Sources.


def _is_hf_directory(source: str) -> bool:
  """A Hugging Face directory: a config.json and no fdjax checkpoints or Orbax metadata."""
  return (
    os.path.isfile(os.path.join(source, "config.json"))
    and not os.path.isdir(os.path.join(source, "checkpoints"))
    and _orbax_item(source) is None
  )


def read_hf_params(directory: str) -> dict:
  """The converted parameters (host numpy) of a local Hugging Face directory."""
  from fdjax.models import hf_convert

  model_type = hf_convert.read_hf_config(directory).get("model_type")
  if model_type in ("wav2vec2", "hubert"):
    return hf_convert.load_wav2vec2(directory)[1]
  if model_type == "clip":
    from fdjax.models import hf_clip

    return hf_clip.load_hf_clip(directory)[1]
  raise ValueError(
    f"{directory}: Hugging Face model_type {model_type!r} has no converter; fdjax converts "
    + ", ".join(f"{k} ({v})" for k, v in HF_MODEL_TYPES.items())
  )


def _numbered(directory: str) -> list[int]:
  """The step numbers of `directory`'s numbered subdirectories, ascending."""
  names = [n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n))]
  return sorted(int(n) for n in names if n.isdigit())


def _orbax_item(directory: str) -> str | None:
  """The Orbax PyTree directory that `directory` holds or is (latest step first), or None."""
  if not os.path.isdir(directory):
    return None
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  steps = _numbered(directory)
  if steps:
    directory = os.path.join(directory, str(steps[-1]))
  if os.path.isdir(os.path.join(directory, "state")):
    directory = os.path.join(directory, "state")
  return directory if os.path.isfile(os.path.join(directory, "_METADATA")) else None


def checkpoint_directory(source: str) -> str:
  """The Orbax PyTree directory an fdjax workdir or checkpoint directory `source` names."""
  if not os.path.isdir(source):
    raise FileNotFoundError(f"init_from source {source!r} is not a directory")
  item = _orbax_item(source)
  if item is None:
    raise FileNotFoundError(
      f"{source}: neither an fdjax workdir with a checkpoint, nor an Orbax checkpoint "
      "directory, nor a Hugging Face directory (config.json and weights)"
    )
  return os.path.abspath(item)  # Orbax reads no metadata through a relative path


def read_checkpoint_params(source: str, path: str = "") -> Any:
  """The parameters at '/'-path `path` of an fdjax workdir or checkpoint directory, as host
  numpy arrays; only that subtree is read from disk."""
  import orbax.checkpoint as ocp

  directory = checkpoint_directory(source)
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(directory).item_metadata.tree
    root = _params_entry(tree)
    keys = "/".join(root + tuple(path.split("/") if path else ()))
    wanted = subtree(tree[root[0]] if root else tree, path, what=f"the parameters of {source}")
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    for name in reversed(keys.split("/") if keys else ()):
      item, restore_args = {name: item}, {name: restore_args}
    restored = checkpointer.restore(
      directory,
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
  return subtree(restored, keys, what=directory)


def _params_entry(tree: Any) -> tuple[str, ...]:
  """Where the parameters sit in a checkpoint's tree: `("ema",)` in a train state that keeps
  an EMA, `("params",)` in other train states and flax variables, `()` in a bare tree."""
  if not isinstance(tree, dict):
    return ()
  ema = tree.get("ema")
  if isinstance(ema, dict) and jax.tree.leaves(ema):
    return ("ema",)
  return ("params",) if "params" in tree else ()


def _source_params_metadata(source: str) -> dict:
  """The metadata tree of the parameters that `read_checkpoint_params(source)` would read."""
  import orbax.checkpoint as ocp

  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(checkpoint_directory(source)).item_metadata.tree
  root = _params_entry(tree)
  return tree[root[0]] if root else tree
