"""Per-example mesh ops: load vertex sequences and templates, change frame rate, region masks.

Builders read VOCASET and BIWI through these functions: per-sequence `.npy` files (frames x V*3),
VOCASET's packed `data_verts.npy` indexed by `subj_seq_to_idx.pkl`, and `.obj` / `.ply`
templates. Metrics and configs load vertex region masks (lips, upper face) with
`load_region_mask`. Vertex arrays are float32 `[T, V, 3]` in metres; templates `[V, 3]`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import numpy as np

from data_pipelines.ops import safe_pickle


def load_vertices_npy(path: str | os.PathLike) -> np.ndarray:
  """Loads a per-sequence vertex file: `[T, V*3]` (or `[T, V, 3]`) -> float32 `[T, V, 3]`.

  Pickled (object) arrays are refused: a `.npy` may embed a pickle, which could run code.
  """
  path = os.fspath(path)
  array = np.load(path, allow_pickle=False)
  if array.ndim == 3 and array.shape[-1] == 3:
    return array.astype(np.float32, copy=False)
  if array.ndim != 2:
    raise ValueError(f"{path}: expected [frames, vertices*3], got shape {array.shape}")
  if array.shape[1] % 3:
    raise ValueError(f"{path}: {array.shape[1]} values per frame is not a multiple of 3 (x, y, z)")
  return array.reshape(array.shape[0], -1, 3).astype(np.float32, copy=False)


def load_packed_vertices(path: str | os.PathLike) -> np.ndarray:
  """VOCASET's `data_verts.npy`, memory-mapped read-only: `[N, V, 3]` over all sequences."""
  array = np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"{os.fspath(path)}: expected [rows, vertices, 3], got shape {array.shape}")
  return array


def packed_sequence(data_verts: np.ndarray, frame_to_row: Mapping[int, int]) -> np.ndarray:
  """Gathers one sequence from the packed array: `{frame: row}` -> float32 `[T, V, 3]`.

  Frames are taken in increasing frame number, whatever the order of the mapping.
  """
  if not frame_to_row:
    raise ValueError("the sequence has no frames")
  rows = np.asarray([frame_to_row[f] for f in sorted(frame_to_row)], dtype=np.int64)
  if rows.min() < 0 or rows.max() >= data_verts.shape[0]:
    raise ValueError(
      f"frame rows {rows.min()}..{rows.max()} fall outside data_verts' {data_verts.shape[0]} rows"
    )
  return np.asarray(data_verts[rows], dtype=np.float32)


def load_vocaset_index(path: str | os.PathLike) -> dict[str, dict[str, dict[int, int]]]:
  """`subj_seq_to_idx.pkl` (read safely): `{subject: {sentence: {frame: row}}}`."""
  index = safe_pickle.load_pickle(path)
  if not isinstance(index, Mapping):
    raise ValueError(f"{os.fspath(path)}: expected a dict of subjects, got {type(index).__name__}")
  return {
    str(subject): {
      str(sentence): {int(frame): int(row) for frame, row in frames.items()}
      for sentence, frames in sentences.items()
    }
    for subject, sentences in index.items()
  }


def load_templates(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`templates.pkl` (read safely): `{subject: float32 [V, 3]}`."""
  templates = safe_pickle.load_pickle(path)
  if not isinstance(templates, Mapping):
    raise ValueError(f"{os.fspath(path)}: expected a dict of subjects, got {type(templates)}")
  return {
    str(subject): np.asarray(t, dtype=np.float32).reshape(-1, 3) for subject, t in templates.items()
  }


def read_obj(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Vertices and triangles of a Wavefront `.obj` (polygons split into triangle fans).

  Returns:
    `(vertices, faces)`: float32 [V, 3] and int32 [F, 3] (0-based).

  Raises:
    ValueError: one line naming the file (and the line) for anything unreadable.
  """
  path = os.fspath(path)
  vertices: list[list[float]] = []
  faces: list[list[int]] = []
  with _named_errors(path, "OBJ"), open(path, encoding="utf-8", errors="replace") as f:
    for line_number, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      try:
        if parts[0] == "v":
          if len(parts) < 4:
            raise ValueError("vertex line needs x y z")
          vertices.append([float(x) for x in parts[1:4]])
        elif parts[0] == "f":
          # Face entries are `v`, `v/vt`, `v//vn` or `v/vt/vn`; 1-based, negative counts back.
          corners = []
          for entry in parts[1:]:
            index = int(entry.split("/")[0])
            corners.append(index - 1 if index > 0 else len(vertices) + index)
          faces.extend([corners[0], corners[i], corners[i + 1]] for i in range(1, len(corners) - 1))
      except ValueError as e:
        raise ValueError(f"line {line_number}: {e}: {line.strip()[:80]!r}") from e
  return _checked_mesh(path, np.asarray(vertices, np.float32), faces)


@contextlib.contextmanager
def _named_errors(path: str, kind: str) -> Iterator[None]:
  """Turns any failure to parse a stranger's mesh file into a one-line ValueError naming it."""
  try:
    yield
  except ValueError as e:
    if str(e).startswith(path):
      raise
    raise ValueError(f"{path}: not a readable {kind} file ({_one_line(e)})") from e
  except Exception as e:  # noqa: BLE001  parsers fail in many ways; all mean "unreadable"
    raise ValueError(f"{path}: not a readable {kind} file ({_one_line(e)})") from e


def _one_line(error: Exception) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _checked_mesh(path: str, vertices: np.ndarray, faces) -> tuple[np.ndarray, np.ndarray]:
  """float32 vertices [V, 3] and int32 triangles [F, 3], checked: finite, indices in range (a
  file of faces only, without vertices, is left to its reader to check against its mesh)."""
  vertices = vertices.reshape(-1, 3)
  face_array = np.asarray(faces, np.int64).reshape(-1, 3)
  if not np.isfinite(vertices).all():
    raise ValueError(f"{path}: non-finite vertex coordinates")
  if face_array.size and (
    face_array.min() < 0 or len(vertices) and face_array.max() >= len(vertices)
  ):
    raise ValueError(f"{path}: a face refers to a vertex outside 0..{len(vertices) - 1}")
  return vertices, face_array.astype(np.int32)


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Vertices and triangles of a `.ply` (ascii or binary; polygons split into triangle fans).

  Returns:
    `(vertices, faces)`: float32 [V, 3] (the x, y, z properties) and int32 [F, 3] (0-based).

  Raises:
    ValueError: one line naming the file for a missing, truncated or malformed file, faces
      that index past the vertices, or non-finite coordinates.
  """
  path = os.fspath(path)
  with _named_errors(path, "PLY"), open(path, "rb") as f:
    if f.readline().strip() != b"ply":
      raise ValueError(f"{path}: not a PLY file (no 'ply' magic line)")
    fmt, elements = "", []  # elements: [name, count, [(prop, type) | (prop, (count_t, item_t))]]
    while True:
      line = f.readline()
      if not line:
        raise ValueError(f"{path}: PLY header has no end_header")
      parts = line.decode("ascii", "replace").split()
      if not parts or parts[0] in ("comment", "obj_info"):
        continue
      if parts[0] == "end_header":
        break
      if parts[0] == "format":
        fmt = parts[1]
      elif parts[0] == "element":
        if int(parts[2]) < 0:
          raise ValueError(f"{path}: PLY element {parts[1]} has a negative count")
        elements.append([parts[1], int(parts[2]), []])
      elif parts[0] == "property":
        if parts[1] == "list":
          elements[-1][2].append((parts[4], (_PLY_TYPES[parts[2]], _PLY_TYPES[parts[3]])))
        else:
          elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
    if fmt == "ascii":
      tokens = iter(f.read().split())
      data = {name: _ply_element_ascii(tokens, count, props) for name, count, props in elements}
    elif fmt in ("binary_little_endian", "binary_big_endian"):
      order = "<" if fmt == "binary_little_endian" else ">"
      data = {name: _ply_element_binary(f, count, props, order) for name, count, props in elements}
    else:
      raise ValueError(f"{path}: unknown PLY format {fmt!r}")
    if "vertex" not in data or not all(a in data["vertex"] for a in "xyz"):
      raise ValueError(f"{path}: PLY has no vertex element with x, y and z")
    vertex = data["vertex"]
    vertices = np.stack([np.asarray(vertex[a], np.float32) for a in "xyz"], axis=-1)
    faces = _fans(
      data.get("face", {}).get("vertex_indices", data.get("face", {}).get("vertex_index"))
    )
    return _checked_mesh(path, vertices, faces)


def _ply_element_ascii(tokens, count: int, props: list) -> dict[str, list]:
  columns: dict[str, list] = {name: [] for name, _ in props}
  for _ in range(count):
    for name, kind in props:
      if isinstance(kind, tuple):
        n = int(next(tokens))
        columns[name].append([int(next(tokens)) for _ in range(n)])
      else:
        columns[name].append(float(next(tokens)))
  return columns


def _ply_element_binary(f, count: int, props: list, order: str) -> dict[str, list | np.ndarray]:
  if not any(isinstance(kind, tuple) for _, kind in props):
    dtype = np.dtype([(name, order + kind) for name, kind in props])
    records = np.frombuffer(_read_exactly(f, dtype.itemsize * count), dtype=dtype, count=count)
    return {name: records[name] for name, _ in props}
  columns: dict[str, list] = {name: [] for name, _ in props}
  for _ in range(count):
    for name, kind in props:
      if isinstance(kind, tuple):
        count_type, item_type = (np.dtype(order + k) for k in kind)
        n = int(np.frombuffer(_read_exactly(f, count_type.itemsize), count_type)[0])
        items = _read_exactly(f, item_type.itemsize * n)
        columns[name].append(np.frombuffer(items, item_type).tolist())
      else:
        item = np.dtype(order + kind)
        columns[name].append(np.frombuffer(_read_exactly(f, item.itemsize), item)[0])
  return columns


def _read_exactly(f, size: int) -> bytes:
  data = f.read(size)
  if len(data) != size:
    raise ValueError(f"truncated: {size} bytes expected, {len(data)} left")
  return data


def _fans(polygons) -> np.ndarray:
  if polygons is None:
    return np.zeros((0, 3), np.int32)
  triangles = [[p[0], p[i], p[i + 1]] for p in polygons for i in range(1, len(p) - 1)]
  return np.asarray(triangles, np.int32).reshape(-1, 3)


def load_template(path: str | os.PathLike) -> np.ndarray:
  """A neutral mesh's vertices from `.obj`, `.ply` or `.npy` ([V, 3] or [V*3]) -> float32
  [V, 3]; an unreadable or empty file raises a one-line ValueError naming it."""
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".obj", ".ply"):
    vertices = (read_obj if suffix == ".obj" else read_ply)(path)[0]
  elif suffix == ".npy":
    with _named_errors(path, ".npy"):
      vertices = np.load(path, allow_pickle=False)
    if vertices.size % 3 or vertices.dtype.kind not in "fiu" or vertices.ndim > 2:
      raise ValueError(f"{path}: expected [V, 3] or [V*3] numbers, got {vertices.shape}")
    vertices = vertices.astype(np.float32).reshape(-1, 3)
  else:
    raise ValueError(f"{path}: unknown template format {suffix!r} (expected .obj, .ply or .npy)")
  if not len(vertices) or not np.isfinite(vertices).all():
    raise ValueError(f"{path}: no vertices, or non-finite ones")
  return vertices


def downsample_fps(vertices: np.ndarray, source_fps: float, target_fps: float) -> np.ndarray:
  """Keeps every k-th frame, `k = source_fps / target_fps` (an integer): 60 -> 30 fps is `[::2]`.

  [T, ...] -> [ceil(T / k), ...]; frame `t` of the result is frame `k * t` of the input, so
  the first frame still starts at time zero and audio alignment is kept.
  """
  ratio = source_fps / target_fps
  if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
    raise ValueError(f"cannot downsample {source_fps} fps to {target_fps} fps by dropping frames")
  return vertices[:: int(round(ratio))]


def subtract_template(vertices: np.ndarray, template: np.ndarray) -> np.ndarray:
  """Motion relative to the neutral face: [T, V, 3] - [V, 3] -> [T, V, 3]."""
  vertices = np.asarray(vertices, np.float32)
  template = np.asarray(template, np.float32)
  if vertices.shape[-2:] != template.shape:
    raise ValueError(f"vertices {vertices.shape} and template {template.shape} do not match")
  return vertices - template


def load_region_mask(
  path: str | os.PathLike, num_vertices: int, key: str | None = None
) -> np.ndarray:
  """A vertex region (lips, upper face, ...) from a file -> bool [V].

  Accepted files: `.txt` (vertex indices separated by whitespace or commas), `.npy` (indices,
  or a bool mask of length V), `.pkl` (a dict of index arrays, e.g. FLAME_masks.pkl, read
  safely; `key` names the region). Indices are 0-based.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".txt":
    with open(path, encoding="utf-8") as f:
      text = f.read().replace(",", " ")
    values = np.asarray([int(float(x)) for x in text.split()], np.int64)
  elif suffix == ".npy":
    values = np.load(path, allow_pickle=False)
  elif suffix == ".pkl":
    regions = safe_pickle.load_pickle(path)
    if key is None or not isinstance(regions, Mapping) or key not in regions:
      names = sorted(regions) if isinstance(regions, Mapping) else []
      raise ValueError(f"{path}: name a region with key=...; the file has {names}")
    values = np.asarray(regions[key])
  else:
    raise ValueError(f"{path}: unknown mask format {suffix!r} (expected .txt, .npy or .pkl)")
  values = np.asarray(values).reshape(-1)
  if values.dtype == bool:
    if values.shape[0] != num_vertices:
      raise ValueError(f"{path}: bool mask has {values.shape[0]} entries, expected {num_vertices}")
    return values
  indices = values.astype(np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= num_vertices):
    raise ValueError(
      f"{path}: vertex indices {indices.min()}..{indices.max()} outside 0..{num_vertices - 1}"
    )
  mask = np.zeros((num_vertices,), bool)  # [V]
  mask[indices] = True
  return mask
