"""The restricted unpickler: plain data and numpy arrays load; anything that could run code is
refused before it runs, with an error naming the file and the refused global."""

import os
import pickle
import subprocess

import numpy as np
import pytest

from data_pipelines.ops import safe_pickle


def _data():
  return {
    "subject": {
      "sentence01": {"audio": np.arange(6, dtype=np.int16), "sample_rate": 22000},
      "sentence02": {"audio": np.linspace(0, 1, 5, dtype=np.float32), "sample_rate": 44100},
    },
    "template": np.random.default_rng(0).normal(size=(4, 3)),
    "index": {0: 10, 1: 11},
    "scalars": [np.float64(1.5), np.int32(3), np.bool_(True), 2.5, 7, True, None, 1 + 2j],
    "dtype": np.dtype("float32"),
    "text": ("a", b"raw bytes", "é"),
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "objects": np.array(["x", 1, None], dtype=object),
  }


def _assert_same(a, b):
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b):
      _assert_same(x, y)
  elif isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  else:
    assert a == b and type(a) is type(b)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_and_numpy_round_trip_at_every_protocol(tmp_path, protocol):
  path = tmp_path / "data.pkl"
  path.write_bytes(pickle.dumps(_data(), protocol=protocol))
  _assert_same(safe_pickle.load_pickle(path), _data())


def test_numpy1_module_names_as_in_old_pickles_are_accepted():
  # The real VOCASET pickles predate numpy 2, whose array pickles say `numpy._core`.
  data = pickle.dumps({"t": np.ones((2, 3), np.float32), "s": np.float32(2)}, protocol=2)
  old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert old != data
  loaded = safe_pickle.loads_pickle(old)
  np.testing.assert_array_equal(loaded["t"], np.ones((2, 3), np.float32))
  assert loaded["s"] == np.float32(2)


class _Exploit:
  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda m: _Exploit(os.system, f"touch {m}"), os.system.__module__ + ".system"),
        (lambda m: _Exploit(eval, f"open({str(m)!r}, 'w')"), "builtins.eval"),
        (lambda m: _Exploit(subprocess.call, ["touch", str(m)]), "subprocess.call"),
        (lambda m: {"ok": np.zeros(3), "bad": [_Exploit(exec, f"open({str(m)!r}, 'w')")]},
         "builtins.exec"),
        (lambda m: _Exploit(np.save, str(m), np.zeros(1)), "numpy.save"),
    ],
)  # fmt: skip
def test_pickles_that_call_code_are_refused_and_never_run(tmp_path, make, refused):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps(make(marker)))
  with pytest.raises(safe_pickle.UnsafePickleError) as error:
    safe_pickle.load_pickle(path)
  assert str(path) in str(error.value) and refused in str(error.value)
  assert error.value.refused == refused
  assert not marker.exists() and not (tmp_path / "marker.npy").exists()


def test_codecs_encode_is_limited_to_latin1():
  # Protocols 0-2 pickle bytes as _codecs.encode(text, "latin1"); other codecs are refused.
  data = pickle.dumps(b"\x00\xffabc", protocol=2)
  assert safe_pickle.loads_pickle(data) == b"\x00\xffabc"
  tampered = data.replace(b"latin1", b"rot_13")
  with pytest.raises(pickle.UnpicklingError, match="rot_13"):
    safe_pickle.loads_pickle(tampered)


def test_persistent_ids_are_refused():
  class _Persist(pickle.Pickler):
    def persistent_id(self, obj):
      return "ref" if obj == "external" else None

  import io

  buffer = io.BytesIO()
  _Persist(buffer).dump(["external"])
  with pytest.raises(pickle.UnpicklingError, match="persistent"):
    safe_pickle.loads_pickle(buffer.getvalue(), "ext.pkl")
