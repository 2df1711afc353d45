"""Mesh ops: vertex files, VOCASET's packed array, .obj/.ply templates, fps, region masks."""

import pickle
import struct

import numpy as np
import pytest

from data_pipelines.ops import mesh, safe_pickle

# A unit square split into two triangles plus a quad, shared by the .obj and .ply tests.
_VERTICES = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1]], np.float32)
_TRIANGLES = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [0, 4, 3]], np.int32)


def test_load_vertices_npy_reshapes_flat_frames(tmp_path):
  vertices = np.random.default_rng(0).normal(size=(7, 5, 3)).astype(np.float32)
  np.save(tmp_path / "seq.npy", vertices.reshape(7, 15))
  loaded = mesh.load_vertices_npy(tmp_path / "seq.npy")
  assert loaded.dtype == np.float32 and loaded.shape == (7, 5, 3)
  np.testing.assert_array_equal(loaded, vertices)
  np.save(tmp_path / "seq3.npy", vertices.astype(np.float64))
  assert mesh.load_vertices_npy(tmp_path / "seq3.npy").dtype == np.float32


def test_load_vertices_npy_rejects_bad_layouts(tmp_path):
  np.save(tmp_path / "odd.npy", np.zeros((4, 10), np.float32))
  with pytest.raises(ValueError, match="multiple of 3"):
    mesh.load_vertices_npy(tmp_path / "odd.npy")
  np.save(tmp_path / "flat.npy", np.zeros(12, np.float32))
  with pytest.raises(ValueError, match="frames"):
    mesh.load_vertices_npy(tmp_path / "flat.npy")


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, "w")


def test_load_vertices_npy_never_unpickles(tmp_path):
  marker = tmp_path / "marker"
  np.save(tmp_path / "evil.npy", np.array([_Exploit(str(marker))], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match="allow_pickle"):
    mesh.load_vertices_npy(tmp_path / "evil.npy")
  assert not marker.exists()


def test_packed_sequence_gathers_rows_in_frame_order(tmp_path):
  data = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 2, 3)
  np.save(tmp_path / "data_verts.npy", data)
  packed = mesh.load_packed_vertices(tmp_path / "data_verts.npy")
  assert isinstance(packed, np.memmap)
  sequence = mesh.packed_sequence(packed, {2: 7, 0: 5, 1: 6})
  np.testing.assert_array_equal(sequence, data[[5, 6, 7]])
  with pytest.raises(ValueError, match="outside"):
    mesh.packed_sequence(packed, {0: 10})
  with pytest.raises(ValueError, match="no frames"):
    mesh.packed_sequence(packed, {})


def test_vocaset_index_and_templates_load_through_the_safe_unpickler(tmp_path):
  index = {"FaceTalk_A": {"sentence01": {0: 0, 1: 1}}}
  (tmp_path / "idx.pkl").write_bytes(pickle.dumps(index, protocol=2))
  assert mesh.load_vocaset_index(tmp_path / "idx.pkl") == index
  (tmp_path / "templates.pkl").write_bytes(pickle.dumps({"F2": np.ones(15)}))
  templates = mesh.load_templates(tmp_path / "templates.pkl")
  assert templates["F2"].shape == (5, 3) and templates["F2"].dtype == np.float32
  (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Exploit(str(tmp_path / "marker"))))
  with pytest.raises(safe_pickle.UnsafePickleError, match="io.open"):
    mesh.load_templates(tmp_path / "evil.pkl")
  assert not (tmp_path / "marker").exists()


def test_read_obj_splits_polygons_and_handles_slash_and_negative_indices(tmp_path):
  lines = ["# square and pyramid side", "o thing"]
  lines += [f"v {x} {y} {z} 0.5 0.5 0.5" for x, y, z in _VERTICES]
  lines += ["vt 0 0", "vn 0 0 1", "f 1/1/1 2/1/1 3/1/1 4/1/1", "f 1//1 2//1 -1//1", "f -5 5 4"]
  (tmp_path / "t.obj").write_text("\n".join(lines) + "\n")
  vertices, faces = mesh.read_obj(tmp_path / "t.obj")
  np.testing.assert_array_equal(vertices, _VERTICES)
  np.testing.assert_array_equal(faces, _TRIANGLES)
  (tmp_path / "bad.obj").write_text("v 0 0 0\nf 1 2 3\n")
  with pytest.raises(ValueError, match="outside"):
    mesh.read_obj(tmp_path / "bad.obj")


def _ply_header(fmt):
  return (
    f"ply\nformat {fmt} 1.0\ncomment made by hand\nelement vertex 5\nproperty float x\n"
    "property float y\nproperty float z\nproperty uchar red\nelement face 3\n"
    "property list uchar int vertex_indices\nend_header\n"
  )


def _ply_faces():
  return [[0, 1, 2, 3], [0, 1, 4], [0, 4, 3]]


def test_read_ply_ascii_and_binary_agree(tmp_path):
  ascii_body = "".join(f"{x} {y} {z} 255\n" for x, y, z in _VERTICES)
  ascii_body += "".join(f"{len(f)} {' '.join(map(str, f))}\n" for f in _ply_faces())
  (tmp_path / "a.ply").write_text(_ply_header("ascii") + ascii_body)
  for fmt, order in (("binary_little_endian", "<"), ("binary_big_endian", ">")):
    body = b"".join(struct.pack(order + "fffB", *v, 255) for v in _VERTICES)
    body += b"".join(struct.pack(f"{order}B{len(f)}i", len(f), *f) for f in _ply_faces())
    (tmp_path / f"{fmt}.ply").write_bytes(_ply_header(fmt).encode() + body)
  for name in ("a.ply", "binary_little_endian.ply", "binary_big_endian.ply"):
    vertices, faces = mesh.read_ply(tmp_path / name)
    np.testing.assert_array_equal(vertices, _VERTICES)
    np.testing.assert_array_equal(faces, _TRIANGLES)
  (tmp_path / "not.ply").write_text("solid stl\n")
  with pytest.raises(ValueError, match="not a PLY"):
    mesh.read_ply(tmp_path / "not.ply")


def test_load_template_dispatches_on_suffix(tmp_path):
  (tmp_path / "t.obj").write_text("".join(f"v {x} {y} {z}\n" for x, y, z in _VERTICES))
  np.save(tmp_path / "t.npy", _VERTICES.reshape(-1))
  for name in ("t.obj", "t.npy"):
    np.testing.assert_array_equal(mesh.load_template(tmp_path / name), _VERTICES)
  with pytest.raises(ValueError, match="unknown template format"):
    mesh.load_template(tmp_path / "t.stl")


def test_downsample_60_to_30_keeps_even_frames_from_time_zero():
  vertices = np.arange(7)[:, None, None] * np.ones((7, 2, 3))
  out = mesh.downsample_fps(vertices, 60, 30)
  np.testing.assert_array_equal(out[:, 0, 0], [0, 2, 4, 6])
  assert mesh.downsample_fps(vertices, 25, 25).shape == vertices.shape
  with pytest.raises(ValueError, match="cannot downsample"):
    mesh.downsample_fps(vertices, 30, 25)


def test_subtract_template_gives_motion():
  template = np.ones((4, 3), np.float32)
  vertices = np.stack([template, template + 0.5])
  np.testing.assert_array_equal(mesh.subtract_template(vertices, template)[1], 0.5)
  with pytest.raises(ValueError, match="do not match"):
    mesh.subtract_template(vertices, np.ones((5, 3)))


def test_region_masks_from_txt_npy_and_pkl(tmp_path):
  (tmp_path / "lips.txt").write_text("1\n3, 4\n")
  np.save(tmp_path / "lips.npy", np.array([1, 3, 4]))
  np.save(tmp_path / "bool.npy", np.array([0, 1, 0, 1, 1, 0], bool))
  (tmp_path / "masks.pkl").write_bytes(pickle.dumps({"lips": np.array([1, 3, 4]), "nose": [0]}))
  expected = np.array([0, 1, 0, 1, 1, 0], bool)
  for name, key in (
    ("lips.txt", None),
    ("lips.npy", None),
    ("bool.npy", None),
    ("masks.pkl", "lips"),
  ):
    mask = mesh.load_region_mask(tmp_path / name, 6, key=key)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)
  with pytest.raises(ValueError, match="outside"):
    mesh.load_region_mask(tmp_path / "lips.txt", 4)
  with pytest.raises(ValueError, match="'lips', 'nose'"):
    mesh.load_region_mask(tmp_path / "masks.pkl", 6)
  with pytest.raises(ValueError, match="entries"):
    mesh.load_region_mask(tmp_path / "bool.npy", 7)


def _one_line_error_naming(path, read):
  with pytest.raises(ValueError) as raised:
    read(path)
  message = str(raised.value)
  assert str(path) in message and "\n" not in message, message
  return message


def test_truncated_garbage_and_inconsistent_mesh_files_give_one_line_errors_naming_the_file(
  tmp_path,
):
  from fdjax import render

  ascii_body = "".join(f"{x} {y} {z} 255\n" for x, y, z in _VERTICES)
  ascii_body += "".join(f"{len(f)} {' '.join(map(str, f))}\n" for f in _ply_faces())
  binary = b"".join(struct.pack("<fffB", *v, 255) for v in _VERTICES)
  binary += b"".join(struct.pack(f"<B{len(f)}i", len(f), *f) for f in _ply_faces())
  originals = {
    "a.ply": (_ply_header("ascii") + ascii_body).encode(),
    "b.ply": _ply_header("binary_little_endian").encode() + binary,
    "c.obj": "".join(f"v {x} {y} {z}\n" for x, y, z in _VERTICES).encode() + b"f 1 2 3\n",
  }
  readers = [mesh.load_template, render.load_faces]
  cases = 0
  for name, content in originals.items():
    suffix = name[-4:]
    header_end = content.find(b"end_header") + len("end_header\n")
    cuts = sorted({0, 1, 10, header_end - 3, header_end, header_end + 7, len(content) - 5})
    variants = {f"cut{n}": content[:n] for n in cuts}
    rng = np.random.default_rng(len(name))
    variants["garbage"] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    variants["utf16"] = "ply\nformat ascii 1.0\n".encode("utf-16")
    for label, data in variants.items():
      path = tmp_path / f"{label}_{name}"
      path.write_bytes(data)
      for read in readers[:2]:
        if suffix == ".obj" and label.startswith("cut"):  # a cut .obj may be a shorter valid one
          try:
            read(path)
          except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e), e
        else:
          _one_line_error_naming(path, read)
        cases += 1
  bad = {
    "negative_count.ply": _ply_header("ascii").replace("vertex 5", "vertex -5") + ascii_body,
    "unknown_type.ply": _ply_header("ascii").replace("property float y", "property cake y")
    + ascii_body,
    "no_z.ply": _ply_header("ascii").replace("property float z\n", "") + ascii_body,
    "face_past_vertices.ply": _ply_header("ascii") + ascii_body.replace("0 4 3", "0 4 9"),
    "nan_vertex.ply": _ply_header("ascii") + ascii_body.replace("0.5 0.5 1.0", "nan 0.5 1.0"),
    "bad_number.obj": "v 0 0 zero\nf 1 2 3\n",
    "face_past_vertices.obj": "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n",
    "garbage.npy": "\x93NUMPY garbage",
  }
  for name, text in bad.items():
    path = tmp_path / name
    path.write_text(text)
    _one_line_error_naming(path, mesh.load_template)
    cases += 1
  assert "vertex outside" in _one_line_error_naming(
    tmp_path / "face_past_vertices.ply", mesh.read_ply
  )
  _one_line_error_naming(tmp_path / "absent.ply", mesh.read_ply)
  assert cases > 40


def test_render_names_the_sequence_whose_vertex_count_does_not_fit_the_faces(tmp_path, capsys):
  from fdjax import render

  path = tmp_path / "faces.ply"
  ascii_body = "".join(f"{x} {y} {z} 255\n" for x, y, z in _VERTICES)
  ascii_body += "".join(f"{len(f)} {' '.join(map(str, f))}\n" for f in _ply_faces())
  path.write_text(_ply_header("ascii") + ascii_body)
  np.save(tmp_path / "short.npy", np.zeros((2, 4, 3), np.float32))  # 4 vertices, faces need 5
  args = ["--vertices", str(tmp_path / "short.npy"), "--faces", str(path)]
  assert render.main([*args, "--out", str(tmp_path / "x.mp4")]) == 1
  error = capsys.readouterr().err.strip()
  assert "short.npy" in error and "faces.ply" in error and "\n" not in error, error
