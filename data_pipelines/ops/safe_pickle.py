"""Reading the datasets' `.pkl` files without letting them run code.

VOCASET and BIWI ship pickles (`templates.pkl`, `raw_audio_fixed.pkl`, `subj_seq_to_idx.pkl`)
that come from strangers (docs/design.md section 4). A pickle can name any importable callable
and call it while loading, so `pickle.load` on such a file is arbitrary code execution.
`load_pickle` overrides `find_class`, the one door through which a pickle reaches a callable,
and opens it only for what numpy's own pickles of arrays, scalars and dtypes need; containers,
strings, numbers, bools and None are built by opcodes and need no callable. Anything else is
refused before it is called, with an error naming the file and the refused global.

Both numpy 1 (`numpy.core...`) and numpy 2 (`numpy._core...`) spellings are admitted, and Python
2 pickles (the real VOCASET files) load with `encoding="latin1"`. A reader of one file format may
admit a few more globals of its own (`extra_globals`; e.g. `fdjax/models/flame.py` maps chumpy
arrays and scipy sparse matrices to inert stand-ins that only collect their pickled state).
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

_core = np._core  # numpy >= 2; numpy 1 names below resolve to the same callables.


class _Latin1Encode:
  """`_codecs.encode` as pickles of bytes use it (protocols 0-2), restricted to latin-1.

  An instance without `__dict__` or `__setstate__`, so a pickle's BUILD opcode cannot alter it.
  """

  __slots__ = ()

  def __call__(self, text: str, encoding: str = "latin1") -> bytes:
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
      raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _allowed() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _Latin1Encode(),
    ("builtins", "complex"): complex,
    ("__builtin__", "complex"): complex,
  }
  for package in ("numpy.core", "numpy._core"):
    allowed[(f"{package}.multiarray", "_reconstruct")] = _core.multiarray._reconstruct
    allowed[(f"{package}.multiarray", "scalar")] = _core.multiarray.scalar
    allowed[(f"{package}.numeric", "_frombuffer")] = _core.numeric._frombuffer
  return allowed


ALLOWED_GLOBALS = _allowed()


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the allow-list; nothing of it was executed."""

  def __init__(self, path: str, module: str, name: str):
    self.path = path
    self.refused = f"{module}.{name}"
    super().__init__(
      f"{path}: refused to load pickle: it asks for the global {self.refused!r}, which is not "
      "an array, number, string or container (only numpy arrays/scalars/dtypes and plain "
      "Python data are allowed)"
    )


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(
    self,
    file: io.BufferedIOBase,
    path: str,
    extra_globals: Mapping[tuple[str, str], Any] | None = None,
  ):
    super().__init__(file, encoding="latin1")
    self._path = path
    self._allowed = {**ALLOWED_GLOBALS, **(extra_globals or {})}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(self._path, module, name) from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError(f"{self._path}: refused persistent id {pid!r}")


def load_pickle(
  path: str | os.PathLike, extra_globals: Mapping[tuple[str, str], Any] | None = None
) -> Any:
  """Loads a pickle that may hold only plain data and numpy arrays.

  `extra_globals` maps further `(module, name)` pairs to what the pickle gets instead; a file
  format's reader passes inert stand-ins here, never a real callable of the named module.

  Raises:
    UnsafePickleError: the file names any other global (e.g. `os.system`, `builtins.eval`);
      raised before that global is looked up, so nothing runs.
    pickle.UnpicklingError and friends: the file is not a valid pickle.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    return _RestrictedUnpickler(f, path, extra_globals).load()


def loads_pickle(
  data: bytes, name: str = "<bytes>", extra_globals: Mapping[tuple[str, str], Any] | None = None
) -> Any:
  """`load_pickle` for bytes already in memory; `name` stands in for the path in errors."""
  return _RestrictedUnpickler(io.BytesIO(data), name, extra_globals).load()
