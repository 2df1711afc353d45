"""The reference server on loopback: JSON, .npz and WAV requests, a fuzz of 200 malformed
requests, a full queue, and the `fdjax serve` command."""

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import flax.linen as nn
import jax
import numpy as np
import pytest
import soundfile
from helpers import TINY, fdjax_command, subprocess_env
from scipy import signal as scipy_signal

from fdjax import config as config_lib
from fdjax import export, serve
from fdjax.tasks import load_task

MAX_BODY = 64 << 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny task's model, exported with freshly initialised parameters, and its predict."""
  config = config_lib.load_config(TINY)
  task = load_task(config.task)
  model = task.build_model(config)
  params = model.init(jax.random.key(0), task.dummy_batch(config, 1))["params"]
  params = jax.device_get(nn.meta.unbox(params))
  predict, specs = task.predict_fn(config, model)
  out = str(tmp_path_factory.mktemp("tiny"))
  exported, weights = export.export_function(predict, specs, params)
  export.write_artifact(out, {"predict": exported}, weights)
  return out, lambda x: np.asarray(jax.jit(predict)(params, x))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
  """An audio artifact: `scaled = audio * gain * w`, 16 kHz, `gain` defaulting to 3."""

  def predict(params, audio, gain):
    return {"scaled": audio * gain[:, None] * params["w"]}

  out = str(tmp_path_factory.mktemp("speech"))
  specs = {"audio": ("b, s", "float32"), "gain": ("b", "float32")}
  exported, weights = export.export_function(predict, specs, {"w": np.float32(0.5)})
  export.write_artifact(
    out,
    {"predict": exported},
    weights,
    metadata={"sample_rate": 16000, "fps": 30},
    defaults={"gain": np.float32(3.0)},
  )
  return out


def _serving(directory, **options):
  server = serve.make_server(directory, port=0, max_body_bytes=MAX_BODY, **options)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return server, thread


@pytest.fixture
def tiny_server(tiny):
  server, thread = _serving(tiny[0])
  yield server
  server.shutdown()
  server.server_close()
  thread.join(timeout=10)


def request(server, method, path, body=None, headers=None):
  """One request on a fresh connection: (status, headers, body bytes)."""
  host, port = server.server_address[:2]
  connection = http.client.HTTPConnection(host, port, timeout=30)
  try:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()
  finally:
    connection.close()


def post_json(server, inputs):
  body = json.dumps({"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}})
  status, _, data = request(server, "POST", "/predict", body, {"Content-Type": "application/json"})
  return status, json.loads(data)


def npz_bytes(**arrays):
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def wav_bytes(audio, rate, subtype="PCM_16"):
  buffer = io.BytesIO()
  soundfile.write(buffer, audio, rate, format="WAV", subtype=subtype)
  return buffer.getvalue()


def raw_request(server, data: bytes) -> int:
  """Sends raw bytes, closes the sending side, and returns the response's status code."""
  with socket.create_connection(server.server_address[:2], timeout=30) as sock:
    received = b""
    try:
      sock.sendall(data)
      sock.shutdown(socket.SHUT_WR)
      while chunk := sock.recv(65536):
        received += chunk
    except (BrokenPipeError, ConnectionResetError, OSError):
      # The server may answer and close before reading all of a bad request.
      pass
  match = re.match(rb"HTTP/1\.[01] (\d{3})", received)
  assert match, f"no HTTP status line in answer to {data[:80]!r}: {received[:80]!r}"
  return int(match.group(1))


def http_bytes(method, path, body=b"", content_type=None, length=None, extra=b""):
  head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
  if content_type:
    head += f"Content-Type: {content_type}\r\n".encode()
  if length != "omit":
    head += f"Content-Length: {len(body) if length is None else length}\r\n".encode()
  return head + extra + b"\r\n" + body


def test_json_and_npz_requests_answer_the_artifact_outputs(tiny, tiny_server):
  _, predict = tiny
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  status, payload = post_json(tiny_server, {"x": x})
  assert status == 200
  np.testing.assert_allclose(np.asarray(payload["outputs"]["output"]), predict(x), atol=1e-6)

  headers = {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}
  status, got, data = request(tiny_server, "POST", "/predict", npz_bytes(x=x[:1]), headers)
  assert status == 200 and got["Content-Type"] == "application/x-npz"
  np.testing.assert_allclose(np.load(io.BytesIO(data))["output"], predict(x[:1]), atol=1e-6)

  status, _, data = request(tiny_server, "GET", "/healthz")
  assert status == 200 and json.loads(data)["status"] == "ok"
  status, _, data = request(tiny_server, "GET", "/signature")
  assert json.loads(data)["functions"]["predict"]["inputs"][0]["shape"] == ["b", 8]

  with ThreadPoolExecutor(4) as pool:
    xs = [x[i : i + 1] + i for i in range(3)] * 4
    answers = list(pool.map(lambda v: post_json(tiny_server, {"x": v}), xs))
  for v, (status, payload) in zip(xs, answers):
    assert status == 200
    np.testing.assert_allclose(np.asarray(payload["outputs"]["output"]), predict(v), atol=1e-6)


def malformed_requests(rng: np.random.Generator, count: int) -> list[bytes]:
  """`count` requests that are each wrong in one way, drawn from a fixed list of kinds."""
  x = rng.normal(size=(2, 8)).astype(np.float32)

  def json_request(payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http_bytes("POST", "/predict", body, "application/json")

  def garbage(n):
    return bytes(rng.integers(0, 256, size=n, dtype=np.uint8))

  def word(n):
    # Random bytes without whitespace, so that the request line keeps its three parts.
    return bytes(b if b > 32 else 95 for b in garbage(n))

  kinds = [
    lambda: json_request(garbage(int(rng.integers(1, 200)))),
    lambda: json_request(
      json.dumps({"inputs": {"x": x.tolist()}}).encode()[: -int(rng.integers(1, 30))]
    ),
    lambda: json_request(b"[" * int(rng.integers(2000, MAX_BODY))),
    lambda: json_request([1, 2, 3]),
    lambda: json_request({"x": x.tolist()}),
    lambda: json_request({"inputs": [x.tolist()]}),
    lambda: json_request({"inputs": {"x": "abc"}}),
    lambda: json_request({"inputs": {"x": None}}),
    lambda: json_request({"inputs": {"x": [[1.0] * 8, [1.0] * 7]}}),
    lambda: json_request({"inputs": {"x": [[True] * 8]}}),
    lambda: json_request({"inputs": {"x": x[:, : int(rng.integers(1, 8))].tolist()}}),
    lambda: json_request({"inputs": {"x": x[0].tolist()}}),
    lambda: json_request({"inputs": {"x": [x.tolist()]}}),
    lambda: json_request({"inputs": {"x": np.zeros((0, 8)).tolist()}}),
    lambda: json_request({"inputs": {"x": x.tolist(), "audio": [1.0]}}),
    lambda: json_request({"inputs": {}}),
    lambda: http_bytes("POST", "/predict", npz_bytes(x=x.astype(np.float64)), "application/x-npz"),
    lambda: http_bytes("POST", "/predict", npz_bytes(x=x.astype(np.int32)), "application/x-npz"),
    lambda: http_bytes("POST", "/predict", npz_bytes(y=x), "application/x-npz"),
    lambda: http_bytes("POST", "/predict", b"PK\x03\x04" + garbage(64), "application/x-npz"),
    lambda: http_bytes("POST", "/predict", garbage(100), "application/octet-stream"),
    lambda: http_bytes("POST", "/predict", b"RIFF" + garbage(60), "audio/wav"),
    lambda: http_bytes("POST", "/predict", wav_bytes(np.zeros(800), 16000), "audio/wav"),
    lambda: http_bytes("POST", "/predict", b"hello", "text/plain"),
    lambda: http_bytes("POST", "/predict", b"{}", "application/json", length=MAX_BODY + 1),
    lambda: http_bytes("POST", "/predict", b"{}", "application/json", length=1 << 40),
    lambda: http_bytes("POST", "/predict", b"{}", "application/json", length="omit"),
    lambda: http_bytes("POST", "/predict", b"{}", "application/json", length="-5"),
    lambda: http_bytes("POST", "/predict", b"{}", "application/json", length="ten"),
    lambda: http_bytes("POST", "/predict", b'{"inputs"', "application/json", length=500),
    lambda: http_bytes(
      "POST", "/predict", b"{}", "application/json", extra=b"Transfer-Encoding: chunked\r\n"
    ),
    lambda: http_bytes("POST", "/nowhere", b"{}", "application/json"),
    lambda: http_bytes("GET", "/nowhere"),
    lambda: http_bytes("GET", "/predict"),
    lambda: http_bytes("PUT", "/predict", b"{}", "application/json"),
    lambda: b"%s / %s\r\n\r\n" % (word(20), word(8)),
  ]
  return [kinds[i % len(kinds)]() for i in rng.permutation(count)]


def test_server_survives_200_malformed_requests_then_answers_correctly(tiny, tiny_server):
  _, predict = tiny
  statuses = [
    raw_request(tiny_server, data) for data in malformed_requests(np.random.default_rng(0), 200)
  ]
  assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
  assert {400, 404, 405, 411, 413, 415} <= set(statuses)
  assert tiny_server.worker_alive()
  x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
  status, payload = post_json(tiny_server, {"x": x})
  assert status == 200
  np.testing.assert_allclose(np.asarray(payload["outputs"]["output"]), predict(x), atol=1e-6)


def test_error_messages_name_the_problem(tiny_server):
  x = np.zeros((2, 7), np.float32)
  status, payload = post_json(tiny_server, {"x": x})
  assert status == 400 and "input 'x': dim 1 is 7, expected 8" in payload["error"]
  status, _, data = request(
    tiny_server,
    "POST",
    "/predict",
    npz_bytes(x=np.zeros((2, 8))),
    {"Content-Type": "application/x-npz"},
  )
  assert status == 400 and "input 'x': dtype float64, expected float32" in json.loads(data)["error"]
  status, _, data = request(
    tiny_server, "POST", "/predict", b"{" * 10, {"Content-Type": "application/json"}
  )
  assert status == 400 and json.loads(data)["error"].startswith("malformed JSON")
  status, _, data = request(
    tiny_server, "POST", "/predict", b"x" * (MAX_BODY + 1), {"Content-Type": "application/json"}
  )
  assert status == 413 and "over 65536" in json.loads(data)["error"]


def test_wav_at_another_rate_is_resampled_and_defaults_fill_the_other_inputs(speech):
  server, thread = _serving(speech)
  try:
    t = np.arange(8000) / 8000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # [S] at 8 kHz
    stereo = np.stack([audio, 0.5 * audio], axis=1)  # [S, 2]
    headers = {"Content-Type": "audio/wav"}
    status, _, data = request(server, "POST", "/predict", wav_bytes(stereo, 8000, "FLOAT"), headers)
    assert status == 200, data
    scaled = np.asarray(json.loads(data)["outputs"]["scaled"])
    mono = stereo.mean(axis=1)
    expected = scipy_signal.resample_poly(mono, 2, 1).astype(np.float32) * 3.0 * 0.5
    assert scaled.shape == (1, 16000)
    np.testing.assert_allclose(scaled[0], expected, atol=1e-6)

    at_rate = wav_bytes(audio, 16000, "FLOAT")
    status, _, data = request(server, "POST", "/predict", at_rate, headers)
    np.testing.assert_allclose(json.loads(data)["outputs"]["scaled"][0], audio * 1.5, atol=1e-6)

    status, payload = post_json(server, {"audio": np.ones((2, 5), np.float32), "gain": [1.0, 2.0]})
    assert status == 200 and payload["outputs"]["scaled"] == [[0.5] * 5, [1.0] * 5]
    status, payload = post_json(server, {"audio": np.ones((2, 5), np.float32)})
    assert payload["outputs"]["scaled"] == [[1.5] * 5] * 2

    status, _, data = request(server, "POST", "/predict", wav_bytes(audio, 2000), headers)
    assert status == 400 and "below 4000" in json.loads(data)["error"]
    truncated = wav_bytes(audio, 8000)[:30]
    status, _, data = request(server, "POST", "/predict", truncated, headers)
    assert status == 400 and json.loads(data)["error"].startswith("bad WAV")
    assert server.worker_alive()
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class GatedModel:
  """An artifact whose calls wait for a gate, to fill the server's queue."""

  def __init__(self, model):
    self.model = model
    self.signature, self.inputs, self.metadata = model.signature, model.inputs, model.metadata
    self.check_inputs = model.check_inputs
    self.gate = threading.Event()
    self.started = threading.Event()

  def __call__(self, inputs):
    self.started.set()
    self.gate.wait(30)
    return self.model(inputs)


def test_a_full_queue_answers_503_and_the_server_recovers(tiny):
  gated = GatedModel(export.load(tiny[0]))
  server = serve.PredictServer(gated, ("127.0.0.1", 0), queue_size=1)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  x = np.ones((1, 8), np.float32)
  try:
    with ThreadPoolExecutor(2) as pool:
      first = pool.submit(post_json, server, {"x": x})
      assert gated.started.wait(30)  # the worker holds the first request
      second = pool.submit(post_json, server, {"x": x})
      deadline = time.time() + 30
      while server.jobs.qsize() < 1 and time.time() < deadline:
        time.sleep(0.01)
      status, payload = post_json(server, {"x": x})
      assert status == 503 and "server busy" in payload["error"]
      gated.gate.set()
      assert first.result()[0] == 200 and second.result()[0] == 200
    assert post_json(server, {"x": x})[0] == 200
  finally:
    gated.gate.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_fdjax_serve_command_serves_until_sigterm(tiny):
  proc = subprocess.Popen(
    fdjax_command("serve", tiny[0], "--port", "0"),
    env=subprocess_env(1),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, line + proc.stderr.read()
    connection = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200
    connection.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
