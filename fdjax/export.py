"""Export of a task's predict function as a StableHLO artifact, and loading it back without fdjax.

Flow: `fdjax export` restores the parameters of a run (`trainer.restore_params`), takes the
task's `predict_fn` (the contract is in `fdjax.tasks`), and serialises `predict` with
`jax.export` for symbolic dims (`b`, `t`, `s`: one artifact serves any batch size and length)
or for concrete sizes (audio2mesh's `--batch 4 --time 90`: what foreign runtimes such as IREE
need). Which dims exist and which flags fix them the task declares (`export_dims`, with
`fdjax.tasks.ExportDim`); `--dim NAME=VALUE` fixes any of them. The output directory holds

    model.jaxexport   the serialized `jax.export.Exported` of `predict`
    model.mlir        its StableHLO text (`Exported.mlir_module()`)
    signature.json    input/output names, shapes (symbolic dims as names), dtypes, the task's
                      metadata (sample_rate, fps, class_names, ...), platforms, versions, and
                      the SHA-256 of the weights and of every file
    weights.npz       with --external-weights: the parameters, fed back by the loader
    defaults.npz      per-example values the server uses for inputs a request leaves out

An artifact may hold further functions beside `predict` (a streaming step, say): each is
`<name>.jaxexport` / `<name>.mlir` with its own entry under `signature["functions"]`, sharing the
weights; `export_function` and `write_artifact` take any function of `(params, **inputs)`.

Foreign runtimes get concrete sizes: IREE 3.13 compiles the concrete `model.mlir` (see
tests/test_iree.py) but cannot lower the `stablehlo.dynamic_broadcast_in_dim` that jax emits
for a softmax or a norm over a symbolic dim. A multi-platform export gives the StableHLO `main`
a leading platform-index argument (`mlir_arguments` in signature.json lists them all).

The loading half (`load`, `Artifact`, `read_signature`) needs only the standard library, numpy
and jax, so this file can be copied beside a serving program that has neither fdjax nor flax.
The exporting half imports fdjax inside its functions. Without any of this file, an artifact
loads with jax alone:

    exported = jax.export.deserialize(bytearray(open("DIR/model.jaxexport", "rb").read()))
    outputs = exported.call(x=x)                 # embedded weights
    outputs = exported.call(weights, x=x)        # --external-weights; see `load_weights`
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "fdjax-export"
FORMAT_VERSION = 1
SIGNATURE = "signature.json"
WEIGHTS = "weights.npz"
DEFAULTS = "defaults.npz"


class ArtifactError(RuntimeError):
  """The artifact directory is unreadable, tampered with, truncated or of another format."""


class SignatureError(ValueError):
  """Inputs that do not match the artifact's signature."""


# ---------------------------------------------------------------------------------------------
# Loading: standard library, numpy and jax only.
# ---------------------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
  """SHA-256 over the weights in order: each name, dtype, shape and raw bytes."""
  digest = hashlib.sha256()
  for name, value in weights.items():
    value = np.ascontiguousarray(value)
    digest.update(f"{name}\0{value.dtype.name}\0{value.shape}\0".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def read_signature(directory: str) -> dict:
  """Reads and checks `signature.json` of an artifact directory."""
  path = os.path.join(directory, SIGNATURE)
  try:
    with open(path) as f:
      signature = json.load(f)
  except FileNotFoundError:
    raise ArtifactError(f"{path}: no such file; is {directory!r} an fdjax export?") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(signature, dict) or signature.get("format") != FORMAT:
    raise ArtifactError(f"{path}: not an {FORMAT} signature")
  if signature.get("format_version", 0) > FORMAT_VERSION:
    raise ArtifactError(
      f"{path}: format version {signature['format_version']} is newer than this loader's "
      f"({FORMAT_VERSION}); use a newer fdjax export module"
    )
  return signature


def read_checked(directory: str, name: str, signature: dict) -> bytes:
  """The bytes of artifact file `name`, after checking size and SHA-256 against the signature."""
  path = os.path.join(directory, name)
  expected = signature.get("files", {}).get(name)
  if expected is None:
    raise ArtifactError(f"{path}: not listed in {SIGNATURE}")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ArtifactError(f"{path}: missing (listed in {SIGNATURE})") from None
  if len(data) != expected["bytes"]:
    how = "truncated" if len(data) < expected["bytes"] else "longer than exported"
    raise ArtifactError(
      f"{path}: {how}: {len(data)} bytes, {SIGNATURE} records {expected['bytes']}"
    )
  if hashlib.sha256(data).hexdigest() != expected["sha256"]:
    raise ArtifactError(
      f"{path}: SHA-256 does not match {SIGNATURE}: the file was modified after export"
    )
  return data


def load_weights(directory: str, signature: dict | None = None) -> list[np.ndarray]:
  """The external weights of an artifact, checked, in the order its functions take them."""
  signature = signature or read_signature(directory)
  info = signature["weights"]
  data = read_checked(directory, info["file"], signature)
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    # bfloat16 has no numpy file format: it is stored as its uint16 bit pattern.
    weights = [
      npz[name].view(jnp.dtype(dtype)) if dtype == "bfloat16" else npz[name]
      for name, dtype in zip(info["names"], info["dtypes"])
    ]
  return weights


_DIM_FUNCTIONS = {
  "floordiv": lambda a, b: a // b,
  "floor_divide": lambda a, b: a // b,
  "mod": lambda a, b: a % b,
  "max": max,
  "min": min,
  "non_negative": lambda a: max(a, 0),
}
_DIM_BINARY = {
  ast.Add: lambda a, b: a + b,
  ast.Sub: lambda a, b: a - b,
  ast.Mult: lambda a, b: a * b,
  ast.FloorDiv: lambda a, b: a // b,
  ast.Mod: lambda a, b: a % b,
}
_DIM_COMPARE = {
  ast.GtE: lambda a, b: a >= b,
  ast.LtE: lambda a, b: a <= b,
  ast.Gt: lambda a, b: a > b,
  ast.Lt: lambda a, b: a < b,
  ast.Eq: lambda a, b: a == b,
}


def evaluate_dim(expression: str, sizes: Mapping[str, int]) -> int | bool | None:
  """Evaluates a symbolic dim or constraint as jax prints them (`floordiv(s, 533)`, `s >= 400`).

  Returns None when it names a dim not in `sizes` or uses a form this evaluator does not know
  (jax then checks it itself when the function is called).
  """

  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    if isinstance(node, ast.Name):
      if node.id not in sizes:
        raise LookupError(node.id)
      return sizes[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -walk(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _DIM_BINARY:
      return _DIM_BINARY[type(node.op)](walk(node.left), walk(node.right))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _DIM_FUNCTIONS:
      return _DIM_FUNCTIONS[node.func.id](*(walk(a) for a in node.args))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _DIM_COMPARE:
      return _DIM_COMPARE[type(node.ops[0])](walk(node.left), walk(node.comparators[0]))
    raise LookupError(ast.dump(node))

  try:
    return walk(ast.parse(expression, mode="eval"))
  except (LookupError, SyntaxError, TypeError, ZeroDivisionError):
    return None


def _shape_text(shape: Sequence[int | str]) -> str:
  return "(" + ", ".join(str(d) for d in shape) + ")"


def check_inputs(
  inputs: Mapping[str, Any], input_specs: Sequence[dict], constraints: Sequence[str] = ()
) -> dict[str, int]:
  """Checks named arrays against a signature's inputs; returns the sizes of the symbolic dims.

  Raises `SignatureError` naming the input: a missing or unexpected input, a wrong rank or
  dtype, a concrete dim of another size, a symbolic dim whose size differs between inputs, or
  a violated constraint.
  """
  expected = [spec["name"] for spec in input_specs]
  missing = [name for name in expected if name not in inputs]
  if missing:
    raise SignatureError(f"missing input {missing[0]!r} (the artifact takes {', '.join(expected)})")
  extra = [name for name in inputs if name not in expected]
  if extra:
    raise SignatureError(
      f"unexpected input {extra[0]!r} (the artifact takes {', '.join(expected)})"
    )
  sizes: dict[str, int] = {}
  where: dict[str, str] = {}
  derived = []
  for spec in input_specs:
    name, dims = spec["name"], spec["shape"]
    value = inputs[name]
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
      value = np.asarray(value)
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    if dtype != jnp.dtype(spec["dtype"]):
      raise SignatureError(f"input {name!r}: dtype {dtype.name}, expected {spec['dtype']}")
    if len(shape) != len(dims):
      raise SignatureError(
        f"input {name!r}: rank {len(shape)} (shape {shape}), expected rank {len(dims)} "
        f"{_shape_text(dims)}"
      )
    for axis, (size, dim) in enumerate(zip(shape, dims)):
      if isinstance(dim, int):
        if size != dim:
          raise SignatureError(
            f"input {name!r}: dim {axis} is {size}, expected {dim} (shape {shape}, "
            f"signature {_shape_text(dims)})"
          )
      elif dim.isidentifier():
        if size < 1:
          raise SignatureError(f"input {name!r}: dim {axis} ({dim}) is {size}, must be >= 1")
        if dim in sizes and sizes[dim] != size:
          raise SignatureError(
            f"input {name!r}: dim {axis} ({dim}) is {size}, but {dim} = {sizes[dim]} from "
            f"{where[dim]}"
          )
        sizes.setdefault(dim, size)
        where.setdefault(dim, f"input {name!r} dim {axis}")
      else:
        derived.append((name, axis, size, dim, shape))
  for name, axis, size, dim, shape in derived:
    value = evaluate_dim(dim, sizes)
    if value is not None and value != size:
      raise SignatureError(
        f"input {name!r}: dim {axis} is {size}, expected {dim} = {value} (shape {shape})"
      )
  for constraint in constraints:
    if evaluate_dim(constraint, sizes) is False:
      raise SignatureError(
        f"inputs violate the constraint {constraint} "
        f"({', '.join(f'{k} = {v}' for k, v in sizes.items())})"
      )
  return sizes


def _platform_matches(exported_platforms: Sequence[str]) -> bool:
  platform = jax.devices()[0].platform
  accepted = {"gpu": ("cuda", "rocm")}.get(platform, (platform,))
  return any(p in exported_platforms for p in accepted)


class Artifact:
  """One function of an exported artifact, callable with its inputs by name.

  `Artifact(directory)(x=x)` checks the file hashes once, then on every call the inputs
  against the signature, and returns what the exported function returns (an array, or a
  dict of named arrays).
  """

  def __init__(self, directory: str, function: str = "predict"):
    self.directory = directory
    self.signature = read_signature(directory)
    functions = self.signature["functions"]
    if function not in functions:
      raise ArtifactError(
        f"{directory}: no function {function!r} (the artifact has {', '.join(functions)})"
      )
    self.function = function
    spec = functions[function]
    self.inputs: list[dict] = spec["inputs"]
    self.outputs: list[dict] = spec["outputs"]
    self.constraints: list[str] = self.signature.get("symbolic_constraints", [])
    self.metadata: dict = self.signature.get("metadata", {})
    data = read_checked(directory, spec["artifact"], self.signature)
    try:
      self.exported = jax.export.deserialize(bytearray(data))
    except Exception as e:
      raise ArtifactError(f"{os.path.join(directory, spec['artifact'])}: cannot load ({e})") from e
    if not _platform_matches(self.exported.platforms):
      raise ArtifactError(
        f"{directory}: exported for {', '.join(self.exported.platforms)}, but this process "
        f"runs on {jax.devices()[0].platform}; export again with --platforms"
      )
    self._weights = None
    if spec.get("weights_argument"):
      self._weights = jax.device_put(load_weights(directory, self.signature))
    self._call = jax.jit(self.exported.call)
    # Signatures of plain dims and no constraints take a fast check on every call; the full
    # check (with its messages) runs when that one fails.
    plain = all(isinstance(d, int) or d.isidentifier() for s in self.inputs for d in s["shape"])
    self._expected = None
    if plain and not self.constraints:
      self._expected = [(s["name"], jnp.dtype(s["dtype"]), tuple(s["shape"])) for s in self.inputs]

  def _fits(self, inputs: Mapping[str, Any]) -> bool:
    if self._expected is None or len(inputs) != len(self._expected):
      return False
    sizes: dict[str, int] = {}
    for name, dtype, dims in self._expected:
      value = inputs.get(name)
      if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        return False
      if value.dtype != dtype or len(value.shape) != len(dims):
        return False
      for size, dim in zip(value.shape, dims):
        if isinstance(dim, int):
          if size != dim:
            return False
        elif size < 1 or sizes.setdefault(dim, size) != size:
          return False
    return True

  def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, int]:
    """Raises `SignatureError` for inputs that do not fit; returns the symbolic dims' sizes."""
    return check_inputs(inputs, self.inputs, self.constraints)

  def __call__(self, inputs: Mapping[str, Any] | None = None, /, **named: Any) -> Any:
    inputs = named if inputs is None else {**inputs, **named}
    if not self._fits(inputs):
      inputs = {
        k: v if hasattr(v, "dtype") and hasattr(v, "shape") else np.asarray(v)
        for k, v in inputs.items()
      }
      self.check_inputs(inputs)
    if self._weights is not None:
      return self._call(self._weights, **inputs)
    return self._call(**inputs)


def load(directory: str, function: str = "predict") -> Artifact:
  """Loads function `function` of the artifact in `directory` (see `Artifact`)."""
  return Artifact(directory, function)


# ---------------------------------------------------------------------------------------------
# Exporting: needs fdjax (and through the task, flax); imported inside the functions.
# ---------------------------------------------------------------------------------------------


def _substitute(text: str, dims: Mapping[str, int | str]) -> str:
  for name, value in dims.items():
    text = re.sub(rf"\b{re.escape(name)}\b", str(value), text)
  return text


def resolve_constraints(constraints: Sequence[str], dims: Mapping[str, int | str]) -> list[str]:
  """Constraints with `dims` substituted; those left without symbols are checked and dropped."""
  resolved = []
  for constraint in constraints:
    text = _substitute(constraint, dims)
    # Symbols left once function names (`floordiv(`, `mod(`) are taken out.
    if re.search(r"[A-Za-z_]\w*", re.sub(r"[A-Za-z_]\w*\s*\(", "(", text)):
      resolved.append(text)
    elif evaluate_dim(text, {}) is False:
      raise ValueError(f"symbolic constraint {constraint!r} fails for {dict(dims)}: {text}")
  return resolved


def abstract_inputs(
  input_specs: Mapping[str, tuple[str, str]],
  dims: Mapping[str, int | str] | None = None,
  constraints: Sequence[str] = (),
) -> dict[str, jax.ShapeDtypeStruct]:
  """`{name: (shape string, dtype)}` -> `jax.ShapeDtypeStruct`s with symbolic dims.

  All inputs share one `jax.export.SymbolicScope`, so a dim name means one size everywhere.
  `dims` replaces names by sizes (`{"b": 4}`) or by other names (`{"b": "n"}`).
  """
  dims = dict(dims or {})
  scope = jax.export.SymbolicScope(list(resolve_constraints(constraints, dims)))
  structs = {}
  for name, spec in input_specs.items():
    if not (isinstance(spec, tuple | list) and len(spec) == 2):
      raise ValueError(f"input spec {name!r}: expected (shape string, dtype), got {spec!r}")
    shape_text, dtype = spec
    try:
      shape = jax.export.symbolic_shape(_substitute(shape_text, dims), scope=scope)
      structs[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    except (ValueError, TypeError) as e:
      raise ValueError(f"input spec {name!r} ({shape_text!r}, {dtype!r}): {e}") from None
  return structs


def _flat_weights(params: Any) -> tuple[dict[str, np.ndarray], Any]:
  """Parameters -> ({"/"-joined path: host array} in tree order, treedef)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(params))
  weights = {
    jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
    for path, leaf in leaves
  }
  if len(weights) != len(leaves):
    raise ValueError("parameter paths are not unique once joined with '/'")
  return weights, treedef


def export_function(
  fn: Callable[..., Any],
  input_specs: Mapping[str, tuple[str, str]],
  params: Any,
  *,
  dims: Mapping[str, int | str] | None = None,
  constraints: Sequence[str] = (),
  platforms: Sequence[str] = ("cpu",),
  dtype: str = "float32",
  external_weights: bool = False,
) -> tuple[jax.export.Exported, dict[str, np.ndarray]]:
  """Exports `fn(params, **inputs)` with `jax.export`.

  Returns the `Exported` and the flat weights (`{"/"-joined path: array}`, in the order an
  external-weights function takes them). Embedded weights are closed over as constants; with
  `external_weights` the function is `f(weights: list, **inputs)`. `dtype="bfloat16"` stores
  floating weights and computes in bfloat16, while floating inputs keep their declared dtype
  and floating outputs come back as float32.
  """
  compute = jnp.dtype(dtype)
  low_precision = compute != jnp.dtype("float32")

  def cast(tree, to):
    return jax.tree.map(
      lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )

  weights, treedef = _flat_weights(params)
  if low_precision:
    weights = cast(weights, compute)
  structs = abstract_inputs(input_specs, dims, constraints)

  def apply(leaves, inputs):
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    if low_precision:
      outputs = fn(tree, **cast(inputs, compute))
      return cast(outputs, jnp.float32)
    return fn(tree, **inputs)

  # keep_unused: the StableHLO `main` takes every weight and input, also those the function
  # never reads (a training-only parameter), so runtimes that see only the .mlir can pass the
  # arguments in the order `mlir_arguments` lists.
  if external_weights:
    weight_structs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights.values()]
    exported = jax.export.export(
      jax.jit(lambda weight_list, **inputs: apply(weight_list, inputs), keep_unused=True),
      platforms=platforms,
    )(weight_structs, **structs)
  else:
    constants = list(weights.values())
    exported = jax.export.export(
      jax.jit(lambda **inputs: apply(constants, inputs), keep_unused=True), platforms=platforms
    )(**structs)
  return exported, weights


def _dim_text(dim: Any) -> int | str:
  return dim if isinstance(dim, int) else str(dim)


def function_signature(
  exported: jax.export.Exported, weight_names: Sequence[str] | None = None
) -> dict:
  """The `signature["functions"][name]` entry (without file names) of an `Exported`."""
  n_in = len(exported.in_avals)
  args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, list(range(n_in)))
  inputs = [
    {
      "name": name,
      "shape": [_dim_text(d) for d in exported.in_avals[index].shape],
      "dtype": exported.in_avals[index].dtype.name,
    }
    for name, index in sorted(kwargs.items(), key=lambda item: item[1])
  ]
  if bool(args) != (weight_names is not None):
    raise ValueError("the exported function takes positional arguments other than the weights")
  n_out = len(exported.out_avals)
  structure = jax.tree_util.tree_unflatten(exported.out_tree, list(range(n_out)))
  if isinstance(structure, int):
    names = {0: "output"}
  else:
    paths, _ = jax.tree_util.tree_flatten_with_path(structure)
    names = {i: jax.tree_util.keystr(p, simple=True, separator="/") for p, i in paths}
  outputs = [
    {
      "name": names[i],
      "shape": [_dim_text(d) for d in aval.shape],
      "dtype": aval.dtype.name,
    }
    for i, aval in enumerate(exported.out_avals)
  ]
  weight_arguments = [f"weights/{n}" for n in weight_names or ()]
  flat_arguments = weight_arguments + [spec["name"] for spec in inputs]
  # Functions exported without keep_unused lose the arguments they never read from `main`.
  kept = set(exported.module_kept_var_idx)
  flat_arguments = [name for index, name in enumerate(flat_arguments) if index in kept]
  # A multi-platform module takes the index into `platforms` as its first argument.
  platform_argument = ["_platform_index"] if len(exported.platforms) > 1 else []
  return {
    "inputs": inputs,
    "outputs": outputs,
    "output_structure": "array" if isinstance(structure, int) else "dict",
    "weights_argument": weight_names is not None,
    # The flat argument order of the StableHLO `main`, for runtimes that see only model.mlir.
    "mlir_arguments": platform_argument + flat_arguments,
  }


def _write(directory: str, name: str, data: bytes, files: dict) -> None:
  path = os.path.join(directory, name)
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)
  files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _jsonable(value: Any, where: str) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v, where) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, bool | int | float | str):
    return value
  raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def write_artifact(
  directory: str,
  functions: Mapping[str, jax.export.Exported],
  weights: Mapping[str, np.ndarray],
  *,
  external_weights: bool = False,
  metadata: Mapping[str, Any] | None = None,
  defaults: Mapping[str, np.ndarray] | None = None,
  constraints: Sequence[str] = (),
  dtype: str = "float32",
  provenance: Mapping[str, Any] | None = None,
) -> dict:
  """Writes exported functions (`{"predict": exported, ...}`) and `signature.json`.

  `predict` goes to model.jaxexport / model.mlir, any other function `f` to f.jaxexport /
  f.mlir. Returns the signature written.
  """
  from fdjax import __version__ as fdjax_version

  if "predict" not in functions:
    raise ValueError("an artifact needs a 'predict' function")
  os.makedirs(directory, exist_ok=True)
  files: dict[str, dict] = {}
  entries = {}
  platforms = None
  for name, exported in functions.items():
    stem = "model" if name == "predict" else name
    entry = function_signature(exported, list(weights) if external_weights else None)
    _write(directory, f"{stem}.jaxexport", bytes(exported.serialize()), files)
    _write(directory, f"{stem}.mlir", exported.mlir_module().encode(), files)
    entries[name] = {"artifact": f"{stem}.jaxexport", "mlir": f"{stem}.mlir", **entry}
    if platforms not in (None, list(exported.platforms)):
      raise ValueError(f"function {name!r} is exported for other platforms than the others")
    platforms = list(exported.platforms)
  weight_info: dict[str, Any] = {
    "sha256": weights_sha256(weights),
    "num_parameters": int(sum(w.size for w in weights.values())),
    "embedded": not external_weights,
  }
  if external_weights:
    stored = {k: w.view(np.uint16) if w.dtype == jnp.bfloat16 else w for k, w in weights.items()}
    _write(directory, WEIGHTS, _npz_bytes(stored), files)
    weight_info.update(
      file=WEIGHTS, names=list(weights), dtypes=[w.dtype.name for w in weights.values()]
    )
  signature = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    **_jsonable(dict(provenance or {}), "provenance"),
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "fdjax_version": fdjax_version,
    "platforms": platforms,
    "dtype": dtype,
    "metadata": _jsonable(dict(metadata or {}), "metadata"),
    "symbolic_constraints": list(constraints),
    "weights": weight_info,
    "functions": entries,
  }
  if defaults:
    known = {spec["name"] for spec in entries["predict"]["inputs"]}
    unknown = sorted(set(defaults) - known)
    if unknown:
      raise ValueError(f"defaults for {unknown[0]!r}, which is not an input of predict")
    _write(directory, DEFAULTS, _npz_bytes({k: np.asarray(v) for k, v in defaults.items()}), files)
    signature["defaults"] = {"file": DEFAULTS, "names": sorted(defaults)}
  signature["files"] = files
  _write(directory, SIGNATURE, (json.dumps(signature, indent=2) + "\n").encode(), {})
  return signature


def _given(dim: Any, value: Any) -> str:
  """How a value for `dim` reads on the command line: `--batch 4`, or `--dim k=4`."""
  return f"{dim.flag} {value}" if dim.flag else f"--dim {dim.symbol}={value}"


def concrete_dims(
  declared: Sequence[Any],
  values: Mapping[str, int | str],
  input_specs: Mapping[str, tuple[str, str]],
) -> dict[str, int | str]:
  """Sizes given for a task's export dims -> dim substitutions for `abstract_inputs`.

  `declared`: the task's `ExportDim`s (`fdjax.tasks`); `values`: `{symbol: value}` from their
  flags or `--dim`. An integer fixes the dim, a name renames it, the dim's own name leaves it
  symbolic. A dim an input uses that is not given but that the task derives
  (`ExportDim.derive`) is fixed once all the dims it `needs` are. Errors name the flag.
  """
  by_symbol = {dim.symbol: dim for dim in declared}
  unknown = [symbol for symbol in values if symbol not in by_symbol]
  if unknown:
    raise ValueError(
      f"--dim {unknown[0]}: the task declares no export dim {unknown[0]!r} "
      f"(its dims: {', '.join(by_symbol)})"
    )
  dims: dict[str, int | str] = {}
  for symbol, value in values.items():
    text, dim = str(value).strip(), by_symbol[symbol]
    if text.isdigit():
      if int(text) < 1:
        raise ValueError(f"{_given(dim, text)}: must be >= 1")
      dims[symbol] = int(text)
    elif text.isidentifier():
      if text != symbol:
        dims[symbol] = text
    else:
      raise ValueError(f"{_given(dim, repr(text))}: expected a positive integer or a dim name")
  uses = {
    name
    for shape_text, _ in input_specs.values()
    for name in re.findall(r"[A-Za-z_]\w*", shape_text)
  }
  derived = True
  while derived:  # until no dim is left to derive: a derived dim may feed another
    derived = False
    for dim in declared:
      if dim.derive is None or dim.symbol in values or dim.symbol in dims:
        continue
      if dim.symbol not in uses or not all(isinstance(dims.get(n), int) for n in dim.needs):
        continue
      sources = ", ".join(
        _given(by_symbol[n], dims[n]) if n in values else f"{n} = {dims[n]}" for n in dim.needs
      )
      fixed = {k: v for k, v in dims.items() if isinstance(v, int)}
      try:
        size = int(dim.derive(fixed))
      except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise ValueError(
          f"{sources}: cannot derive {dim.symbol} ({dim.help or 'a dim'}) from it: {e}"
        ) from None
      if size < 1:
        raise ValueError(f"{sources}: gives {dim.symbol} = {size}, which must be >= 1")
      dims[dim.symbol] = size
      derived = True
  return dims


def export_checkpoint(
  config: Any,
  workdir: str,
  out_dir: str,
  *,
  step: int | None = None,
  sizes: Mapping[str, int | str] | None = None,
  platforms: Sequence[str] = ("cpu",),
  dtype: str = "float32",
  external_weights: bool = False,
  params: str | None = None,
) -> dict:
  """Restores a run's parameters and writes its task's predict function to `out_dir`.

  `sizes`: `{dim symbol: value}` for the task's export dims (`concrete_dims`), e.g.
  `{"b": 4, "t": 90}`; dims not given stay symbolic unless the task derives them.
  `params`: `raw`, `ema`, or None (the EMA when the run keeps one, else the raw parameters).

  A task whose `stream_fn(config, model)` returns functions (a causal audio2mesh model) also
  gets them in the artifact (`stream_init`, `stream_step`; `load(out_dir, "stream_step")`),
  with its streaming metadata under `metadata["streaming"]`; those of `export_functions(config,
  model)` (a talking-head run's `portrait_code`, `render`) likewise, with predict's dims and
  constraints. Returns the signature written.
  """
  from fdjax import config as config_lib
  from fdjax import trainer

  task, model, params, collections, step = trainer.restore_variables(
    config, workdir, step, params=params
  )
  if collections is not None:
    # A model with mutable collections (BatchNorm statistics) is exported with all of its
    # variables: `predict` then receives `{"params": ..., "batch_stats": ...}`.
    params = {"params": params, **collections}
  predict, input_specs = task.predict_fn(config, model)  # none: MissingHookError, naming it
  metadata = dict(task.export_metadata(config))
  defaults = task.export_defaults(config)
  constraints = list(task.symbolic_constraints(config))
  dims = concrete_dims(task.export_dims(config), sizes or {}, input_specs)
  exported, weights = export_function(
    predict,
    input_specs,
    params,
    dims=dims,
    constraints=constraints,
    platforms=platforms,
    dtype=dtype,
    external_weights=external_weights,
  )
  functions = {"predict": exported}
  for name, (fn, specs) in task.export_functions(config, model).items():
    if name == "predict":
      raise ValueError(f"task {config.task}: export_functions may not name 'predict'")
    functions[name], _ = export_function(
      fn,
      specs,
      params,
      dims=dims,
      constraints=constraints,
      platforms=platforms,
      dtype=dtype,
      external_weights=external_weights,
    )
  streaming = task.stream_fn(config, model)
  if streaming is not None:
    # Streaming functions have fixed chunks: of the dims, in practice only the batch is theirs.
    stream_functions, metadata["streaming"] = streaming
    for name, (fn, specs) in stream_functions.items():
      functions[name], _ = export_function(
        fn,
        specs,
        params,
        dims=dims,
        platforms=platforms,
        dtype=dtype,
        external_weights=external_weights,
      )
  return write_artifact(
    out_dir,
    functions,
    weights,
    external_weights=external_weights,
    metadata=metadata,
    defaults=defaults,
    constraints=resolve_constraints(constraints, dims),
    dtype=dtype,
    provenance={
      "task": config.task,
      "step": int(step),
      "config_sha256": config_lib.config_hash(config),
    },
  )


def _load_run_config(config_spec: str | None, workdir: str, overrides: list[str]):
  from fdjax import config as config_lib

  if config_spec:
    return config_lib.load_config(config_spec, overrides)
  import ml_collections

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; name the run's config with --config")
  with open(path) as f:
    config = config_lib.fill_defaults(ml_collections.ConfigDict(json.load(f)))
  config_lib.apply_overrides(config, overrides)
  return ml_collections.FrozenConfigDict(config)


def _parser(dims: Sequence[Any] = (), *, phase_one: bool = False) -> argparse.ArgumentParser:
  """The command line; `dims` (the task's `ExportDim`s) add their flags. `phase_one`: only
  what finds the run (its config names the task, whose dims give the other flags)."""
  parser = argparse.ArgumentParser(
    prog="fdjax export",
    description="Export a run's predict function as StableHLO (jax.export). Config overrides "
    "follow as --config.key=value.",
    add_help=not phase_one,
  )
  parser.add_argument("--config", help="the run's config (default: <workdir>/config.json)")
  parser.add_argument("--workdir", required=not phase_one, help="the run's workdir (checkpoints)")
  if phase_one:
    return parser
  parser.add_argument("--out", required=True, help="artifact directory to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--platforms", default="cpu", help="comma-separated: cpu,cuda,rocm,tpu")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument(
    "--external-weights", action="store_true", help="keep the weights beside the artifact"
  )
  parser.add_argument(
    "--params",
    choices=("raw", "ema"),
    default=None,
    help="which parameters to export (default: ema when the run keeps an EMA, else raw)",
  )
  parser.add_argument(
    "--dim",
    action="append",
    default=[],
    metavar="NAME=VALUE",
    help="fix (an integer) or rename (a name) any export dim the task declares; repeatable",
  )
  group = parser.add_argument_group(
    "the task's export dims", "an integer fixes the dim, a name renames it (default: symbolic)"
  )
  for dim in dims:
    if dim.flag:
      try:
        metavar = dim.flag.lstrip("-").upper().replace("-", "_")
        group.add_argument(
          dim.flag, dest=f"dim_{dim.symbol}", metavar=metavar, default=None, help=dim.help
        )
      except argparse.ArgumentError as e:
        raise ValueError(f"export dim {dim.symbol!r}: {e}") from None
  return parser


def _dim_values(parser: argparse.ArgumentParser, args: Any, dims: Sequence[Any]) -> dict:
  """`{symbol: value}` from the task's dim flags and `--dim NAME=VALUE`."""
  values = {d.symbol: getattr(args, f"dim_{d.symbol}") for d in dims if d.flag}
  values = {k: v for k, v in values.items() if v is not None}
  for item in args.dim:
    name, sep, value = item.partition("=")
    if not (sep and name.isidentifier() and value):
      parser.error(f"--dim {item!r}: expected NAME=VALUE, e.g. --dim b=4")
    if name in values and values[name] != value:
      parser.error(f"--dim {item}: {name} is also given as {values[name]}")
    values[name] = value
  return values


def main(argv: Sequence[str]) -> int:
  """`fdjax export ...`; returns the exit status."""
  from fdjax.checkpoint import CheckpointRestoreError
  from fdjax.tasks import load_task

  argv = list(argv)
  errors = (FileNotFoundError, ValueError, KeyError, AttributeError, CheckpointRestoreError)
  # Phase one finds the run and its task, whose declared dims give the rest of the flags.
  found, rest = _parser(phase_one=True).parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  config, dims = None, ()
  if found.workdir:
    try:
      config = _load_run_config(found.config, found.workdir, overrides)
      dims = tuple(load_task(config.task).export_dims(config))
    except errors as e:
      if not {"-h", "--help"} & set(argv):
        print(f"fdjax export: {e}", file=sys.stderr)
        return 1
  try:
    parser = _parser(dims)
  except ValueError as e:
    print(f"fdjax export: {e}", file=sys.stderr)
    return 1
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)}")
  sizes = _dim_values(parser, args, dims)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]

  try:
    signature = export_checkpoint(
      config,
      args.workdir,
      args.out,
      step=args.step,
      sizes=sizes,
      platforms=platforms,
      dtype=args.dtype,
      external_weights=args.external_weights,
      params=args.params,
    )
  except errors as e:
    print(f"fdjax export: {e}", file=sys.stderr)
    return 1
  predict = signature["functions"]["predict"]

  def describe(specs):
    return ", ".join(f"{s['name']}{_shape_text(s['shape'])} {s['dtype']}" for s in specs)

  size = sum(f["bytes"] for f in signature["files"].values())
  print(
    f"exported {signature['task']} step {signature['step']} to {args.out} "
    f"({size / 1e6:.2f} MB, {', '.join(signature['platforms'])}, {args.dtype}): "
    f"{describe(predict['inputs'])} -> {describe(predict['outputs'])}"
  )
  others = [name for name in signature["functions"] if name != "predict"]
  if others:
    print(f"also exported: {', '.join(others)} (load with fdjax.export.load(DIR, name))")
  return 0
