"""Reference HTTP server for an exported artifact: `fdjax serve DIR [--host H] [--port P]`.

It sits after `fdjax export`: it loads DIR with `fdjax.export.load` (jax and numpy only, no
flax) and answers

    POST /predict    one of these bodies:
                     - JSON `{"inputs": {name: nested lists}}` (Content-Type application/json),
                       for small inputs; values are cast to the signature's dtypes (floats
                       never to integers);
                     - an `.npz` of named arrays (application/x-npz or application/octet-stream),
                       whose dtypes must match the signature;
                     - a WAV file (audio/wav) for the artifact's audio input (metadata
                       `audio_input`, else the input with an `s` dim): channels are averaged,
                       and audio at another rate is resampled to the metadata's `sample_rate`.
                     Inputs a request leaves out are taken from the artifact's `defaults.npz`
                     (per-example values, repeated over the batch).
                     Answer: JSON `{"outputs": {name: nested lists}}`, or an `.npz` when the
                     request's Accept header names application/x-npz.
    GET /healthz     `{"status": "ok", "queued": N}`
    GET /signature   the artifact's signature.json

A bad request (malformed JSON/npz/WAV, wrong input name, shape or dtype, a body over
`max_body_bytes`, a missing Content-Length, an unknown path) gets a 4xx and a JSON
`{"error": message}`; nothing a client sends stops the server. Handler threads check inputs,
then hand them through a bounded queue to the one worker thread that calls the artifact, so
calls never run concurrently and memory stays bounded; a full queue answers 503.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import queue
import signal
import sys
import threading
import zipfile
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from fdjax import export

DEFAULT_MAX_BODY_BYTES = 64 << 20
JSON_TYPES = ("application/json", "text/json")
NPZ_TYPES = ("application/x-npz", "application/npz", "application/octet-stream")
WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
NPZ = "application/x-npz"
# Lower sample rates are not speech; resampling from them would inflate a small body.
MIN_WAV_SAMPLE_RATE = 4000
# The dim name of audio samples in the speech tasks' inputs: a WAV request fills the one input
# that has it, when the artifact's metadata names no `audio_input`.
AUDIO_SAMPLES = "s"

log = logging.getLogger(__name__)


class RequestError(Exception):
  """A request the server answers with `status` and a JSON error message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


@dataclasses.dataclass
class _Job:
  inputs: dict[str, np.ndarray]
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  outputs: dict[str, np.ndarray] | None = None
  error: RequestError | None = None


def flat_outputs(outputs: Any) -> dict[str, np.ndarray]:
  """The artifact's outputs as `{name: host array}`, nested dict keys joined by "/"."""
  if not isinstance(outputs, Mapping):
    return {"output": np.asarray(outputs)}
  flat = {}
  for key, value in outputs.items():
    if isinstance(value, Mapping):
      flat.update({f"{key}/{k}": v for k, v in flat_outputs(value).items()})
    else:
      flat[str(key)] = np.asarray(value)
  return flat


def load_defaults(directory: str, signature: Mapping) -> dict[str, np.ndarray]:
  """The artifact's per-example default inputs (`defaults.npz`), hash-checked; {} if none."""
  if "defaults" not in signature:
    return {}
  data = export.read_checked(directory, signature["defaults"]["file"], signature)
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


class PredictServer(ThreadingHTTPServer):
  """The server: HTTP threads that parse and check, one worker thread that calls the model.

  `model` is an `export.Artifact` (or anything with its `signature`, `inputs`, `metadata`,
  `check_inputs(inputs)` and `__call__(inputs)`).
  """

  daemon_threads = True
  # Listen backlog: socketserver's default of 5 drops connections when many clients start at
  # once, and each dropped SYN costs the client a 1 s retransmit.
  request_queue_size = 128

  def __init__(
    self,
    model: Any,
    address: tuple[str, int] = ("127.0.0.1", 0),
    *,
    defaults: Mapping[str, np.ndarray] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    queue_size: int = 16,
    request_timeout_s: float = 60.0,
  ):
    self.model = model
    self.defaults = dict(defaults or {})
    self.max_body_bytes = max_body_bytes
    self.request_timeout_s = request_timeout_s
    self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
    super().__init__(address, PredictHandler)
    self._worker = threading.Thread(target=self._work, name="fdjax-serve-worker", daemon=True)
    self._worker.start()

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def worker_alive(self) -> bool:
    return self._worker.is_alive()

  def _work(self) -> None:
    while (job := self.jobs.get()) is not None:
      try:
        job.outputs = flat_outputs(self.model(job.inputs))
      except export.SignatureError as e:
        job.error = RequestError(400, str(e))
      except Exception as e:
        log.exception("predict failed")
        job.error = RequestError(500, f"predict failed: {type(e).__name__}: {e}")
      finally:
        job.done.set()

  def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checks `inputs`, queues them for the worker and waits for the outputs."""
    try:
      self.model.check_inputs(inputs)
    except export.SignatureError as e:
      raise RequestError(400, str(e)) from None
    job = _Job(inputs)
    try:
      self.jobs.put_nowait(job)
    except queue.Full:
      raise RequestError(503, f"server busy: {self.jobs.maxsize} requests queued") from None
    if not job.done.wait(self.request_timeout_s):
      raise RequestError(504, f"no answer within {self.request_timeout_s:g} s")
    if job.error is not None:
      raise job.error
    return job.outputs

  def server_close(self) -> None:
    super().server_close()
    self.jobs.put(None)
    self._worker.join(timeout=10)

  # Request bodies -> named input arrays.

  def parse_body(self, body: bytes, content_type: str) -> dict[str, np.ndarray]:
    kind = content_type.partition(";")[0].strip().lower()
    if kind in JSON_TYPES or (not kind and body[:1] == b"{"):
      inputs = self._parse_json(body)
    elif kind in NPZ_TYPES or (not kind and body[:4] == b"PK\x03\x04"):
      inputs = self._parse_npz(body)
    elif kind in WAV_TYPES or (not kind and body[:4] == b"RIFF"):
      inputs = self._parse_wav(body)
    else:
      raise RequestError(
        415,
        f"unsupported Content-Type {content_type!r}: send application/json, {NPZ} or audio/wav",
      )
    return self._with_defaults(inputs)

  def _spec(self, name: str) -> dict:
    for spec in self.model.inputs:
      if spec["name"] == name:
        return spec
    names = ", ".join(s["name"] for s in self.model.inputs)
    raise RequestError(400, f"unexpected input {name!r} (the artifact takes {names})")

  def _parse_json(self, body: bytes) -> dict[str, np.ndarray]:
    try:
      payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:
      raise RequestError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), dict):
      raise RequestError(400, 'expected a JSON object {"inputs": {name: nested lists}}')
    inputs = {}
    for name, value in payload["inputs"].items():
      dtype = np.dtype(self._spec(name)["dtype"])
      try:
        array = np.asarray(value)
      except (ValueError, TypeError, RecursionError):
        raise RequestError(400, f"input {name!r}: not a rectangular array of numbers") from None
      inputs[name] = _cast_json_array(name, array, dtype)
    return inputs

  def _parse_npz(self, body: bytes) -> dict[str, np.ndarray]:
    if body[:4] != b"PK\x03\x04":
      raise RequestError(400, "malformed .npz: not a zip archive (write it with numpy.savez)")
    try:
      npz = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise RequestError(400, f"malformed .npz: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise RequestError(400, "malformed .npz: expected an archive of named arrays, not one array")
    with npz:
      # Members may be compressed: bound what they decode to, not only the body.
      decoded = sum(info.file_size for info in npz.zip.infolist())
      if decoded > self.max_body_bytes:
        raise RequestError(413, f".npz holds {decoded} bytes, over {self.max_body_bytes}")
      try:
        return {name: npz[name] for name in npz.files}
      except Exception as e:
        raise RequestError(400, f"malformed .npz: {type(e).__name__}: {e}") from None

  def _audio_input(self) -> tuple[str, int]:
    metadata = self.model.metadata
    name = metadata.get("audio_input")
    if name is None:
      candidates = [s["name"] for s in self.model.inputs if AUDIO_SAMPLES in s["shape"]]
      name = candidates[0] if len(candidates) == 1 else None
    if name is None:
      raise RequestError(400, "this artifact has no audio input: send JSON or .npz")
    if "sample_rate" not in metadata:
      raise RequestError(400, "this artifact's signature gives no sample_rate for WAV input")
    return name, int(metadata["sample_rate"])

  def _parse_wav(self, body: bytes) -> dict[str, np.ndarray]:
    import soundfile

    name, sample_rate = self._audio_input()
    try:
      audio, rate = soundfile.read(io.BytesIO(body), dtype="float32", always_2d=True)
    except Exception as e:
      raise RequestError(400, f"bad WAV: {e}") from None
    if audio.shape[0] == 0:
      raise RequestError(400, "bad WAV: no samples")
    if rate < MIN_WAV_SAMPLE_RATE:
      raise RequestError(400, f"bad WAV: sample rate {rate} Hz is below {MIN_WAV_SAMPLE_RATE}")
    waveform = audio.mean(axis=1)  # [S]
    if rate != sample_rate:
      from scipy import signal as scipy_signal

      common = math.gcd(rate, sample_rate)
      waveform = scipy_signal.resample_poly(waveform, sample_rate // common, rate // common)
    dtype = np.dtype(self._spec(name)["dtype"])
    return {name: waveform.astype(dtype)[None]}  # [1, S]

  def _with_defaults(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds default values for inputs left out, repeated over the request's batch size."""
    for spec in self.model.inputs:
      name = spec["name"]
      if name in inputs or name not in self.defaults:
        continue
      default = self.defaults[name]
      if default.ndim == len(spec["shape"]) - 1:
        batch = spec["shape"][0]
        for other in self.model.inputs:
          value = inputs.get(other["name"])
          if value is not None and other["shape"][:1] == [batch] and np.ndim(value) > 0:
            batch = np.shape(value)[0]
            break
        batch = batch if isinstance(batch, int) else 1
        default = np.broadcast_to(default, (batch, *default.shape)).copy()
      inputs[name] = default
    return inputs


def _cast_json_array(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """JSON numbers -> the signature's dtype; refuses strings, and floats for integer inputs."""
  kind = array.dtype.kind
  accepted = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}.get(dtype.kind, "")
  if kind not in accepted:
    found = "strings or nulls" if kind in "OUS" else f"{array.dtype.name} values"
    raise RequestError(400, f"input {name!r}: expected {dtype.name} numbers, got {found}")
  if dtype.kind in "iu" and array.size:
    info = np.iinfo(dtype)
    if array.min() < info.min or array.max() > info.max:
      raise RequestError(400, f"input {name!r}: values outside the range of {dtype.name}")
  return array.astype(dtype)


def _listed(array: np.ndarray) -> list | float | int | bool:
  # bfloat16 and other ml_dtypes have no JSON form of their own.
  return (array if array.dtype.kind in "biuf" else array.astype(np.float32)).tolist()


class PredictHandler(BaseHTTPRequestHandler):
  """One HTTP connection; all work past parsing goes through `PredictServer.predict`."""

  server: PredictServer
  protocol_version = "HTTP/1.1"
  # Answers to unparseable request lines then carry a status line (no HTTP/0.9 replies).
  default_request_version = "HTTP/1.0"
  timeout = 30  # seconds a client may stall mid-request before its connection is dropped
  # Headers and body leave in two writes; with Nagle's algorithm and the client's delayed ACK
  # each keep-alive answer would wait ~40 ms.
  disable_nagle_algorithm = True

  def log_message(self, format: str, *args: Any) -> None:
    log.debug("%s " + format, self.address_string(), *args)

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    if status == 503:
      self.send_header("Retry-After", "1")
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, payload: Any) -> None:
    self._send(status, json.dumps(payload).encode(), "application/json")

  def _error(self, status: int, message: str) -> None:
    self._json(status, {"error": message})

  def _guarded(self, handle) -> None:
    try:
      handle()
    except RequestError as e:
      self._error(e.status, e.message)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:
      log.exception("request failed")
      self.close_connection = True
      self._error(500, f"internal error: {type(e).__name__}")

  def do_GET(self) -> None:
    self._guarded(self._get)

  def do_POST(self) -> None:
    self._guarded(self._post)

  def _not_allowed(self) -> None:
    self.close_connection = True
    self._error(405, f"method {self.command} not allowed: POST /predict, GET /healthz, /signature")

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

  def _get(self) -> None:
    path = urlsplit(self.path).path
    if path == "/healthz":
      alive = self.server.worker_alive()
      status = {"status": "ok" if alive else "worker stopped", "queued": self.server.jobs.qsize()}
      self._json(200 if alive else 503, status)
    elif path == "/signature":
      self._json(200, self.server.model.signature)
    elif path == "/predict":
      raise RequestError(405, "use POST for /predict")
    else:
      raise RequestError(404, f"no such path {path!r}: POST /predict, GET /healthz, /signature")

  def _read_body(self) -> bytes:
    # Errors before the whole body is read leave the connection unusable for another request.
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self.close_connection = True
      raise RequestError(411, "chunked bodies are not accepted: send a Content-Length")
    length_text = self.headers.get("Content-Length")
    if length_text is None:
      self.close_connection = True
      raise RequestError(411, "Content-Length required")
    try:
      length = int(length_text)
      if length < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise RequestError(400, f"bad Content-Length {length_text!r}") from None
    if length > self.server.max_body_bytes:
      self.close_connection = True
      raise RequestError(413, f"body of {length} bytes is over {self.server.max_body_bytes}")
    body = self.rfile.read(length)
    if len(body) != length:
      self.close_connection = True
      raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
    return body

  def _post(self) -> None:
    path = urlsplit(self.path).path
    if path != "/predict":
      self.close_connection = True
      raise RequestError(404, f"no such path {path!r}: POST /predict")
    body = self._read_body()
    inputs = self.server.parse_body(body, self.headers.get("Content-Type", ""))
    outputs = self.server.predict(inputs)
    if NPZ in self.headers.get("Accept", ""):
      buffer = io.BytesIO()
      np.savez(buffer, **outputs)
      self._send(200, buffer.getvalue(), NPZ)
    else:
      self._json(200, {"outputs": {name: _listed(value) for name, value in outputs.items()}})


def make_server(
  directory: str,
  host: str = "127.0.0.1",
  port: int = 0,
  *,
  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
  queue_size: int = 16,
  request_timeout_s: float = 60.0,
) -> PredictServer:
  """Loads the artifact in `directory` and binds a server to it (port 0: any free port)."""
  model = export.load(directory)
  return PredictServer(
    model,
    (host, port),
    defaults=load_defaults(directory, model.signature),
    max_body_bytes=max_body_bytes,
    queue_size=queue_size,
    request_timeout_s=request_timeout_s,
  )


def main(argv: Sequence[str]) -> int:
  """`fdjax serve DIR ...`; serves until SIGINT or SIGTERM, then returns 0."""
  parser = argparse.ArgumentParser(prog="fdjax serve", description=__doc__.split("\n\n")[0])
  parser.add_argument("directory", help="an artifact directory written by fdjax export")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000, help="0: any free port")
  parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
  parser.add_argument("--queue-size", type=int, default=16, help="requests waiting at most")
  parser.add_argument("--timeout-s", type=float, default=60.0, help="per-request answer limit")
  args = parser.parse_args(list(argv))
  try:
    server = make_server(
      args.directory,
      args.host,
      args.port,
      max_body_bytes=args.max_body_bytes,
      queue_size=args.queue_size,
      request_timeout_s=args.timeout_s,
    )
  except (export.ArtifactError, OSError) as e:
    print(f"fdjax serve: {e}", file=sys.stderr)
    return 1
  # shutdown() waits for serve_forever to return, so it must run off the serving thread.
  stop = lambda signum, frame: threading.Thread(target=server.shutdown, daemon=True).start()
  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  print(f"serving {args.directory} on {server.url} (POST /predict, GET /healthz, GET /signature)")
  sys.stdout.flush()
  try:
    server.serve_forever()
  finally:
    server.server_close()
  return 0
