"""Streaming speech-to-animation: a causal audio2mesh model run chunk by chunk, in bounded state.

Where it sits: a causal `SpeechToMesh` (`experiments/audio2mesh/vocaset.py:causal=True`) is
trained like any other; `fdjax export` then writes, beside `predict`, the `stream_init` and
`stream_step` functions built here (the task's `stream_fn` calls `export_functions`). A serving
program loads them with jax alone (`fdjax.export.load(DIR, "stream_step")`) and feeds fixed
chunks of audio as they arrive; the frames equal those of `predict` over the whole audio to
float rounding (tests/test_streaming.py). Chunk sizes, the alignment of chunks to mesh and audio
frames, and the state layout are described in docs/design.md section 11.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models.audio2mesh import SpeechToMesh

Array = jax.Array
State = dict[str, Array]


class StreamGeometry(NamedTuple):
  """The fixed chunk of a stream: F mesh frames = S samples = A audio frames (conv frames; the
  transformer runs on F of them when the encoder resamples to the mesh frame rate)."""

  chunk_frames: int  # F, mesh frames per chunk
  chunk_samples: int  # S, audio samples per chunk
  audio_frames: int  # A, encoder frames per chunk
  sample_rate: int  # audio samples per second
  fps: float  # mesh frames per second

  @property
  def seconds(self) -> float:
    """Audio duration of one chunk (also the algorithmic latency)."""
    return self.chunk_samples / self.sample_rate


def shortest_chunk_frames(model: SpeechToMesh) -> int:
  """The fewest mesh frames that make a whole number of audio frames (3 at 30 fps, 16 kHz)."""
  model._check_streamable()
  fps, rate, hop = int(model.fps), model.sample_rate, model.encoder.hop
  samples = math.lcm(hop, rate // math.gcd(rate, fps))  # whole frames and whole hops
  return samples * fps // rate


def geometry(model: SpeechToMesh, chunk_frames: int = 0) -> StreamGeometry:
  """The chunk of `chunk_frames` mesh frames (0: the shortest exact one), checked."""
  shortest = shortest_chunk_frames(model)
  if chunk_frames < 0 or chunk_frames % shortest:
    raise ValueError(
      f"stream_chunk_frames={chunk_frames}: must be a multiple of {shortest} (whole audio "
      f"frames of {model.encoder.hop} samples at {model.sample_rate} Hz and {model.fps:g} fps), "
      "or 0 for the shortest"
    )
  frames = chunk_frames or shortest
  samples = frames * model.sample_rate // int(model.fps)
  model.stream_chunk_frames(samples)  # the model's own check of the chunk
  return StreamGeometry(
    chunk_frames=frames,
    chunk_samples=samples,
    audio_frames=samples // model.encoder.hop,
    sample_rate=model.sample_rate,
    fps=model.fps,
  )


def init(
  model: SpeechToMesh,
  params: Any,
  template: Array,
  style: Array | None,
  *,
  emotion: Array | None = None,
  intensity: Array | None = None,
) -> State:
  """The state of new streams: `template [B, V, 3]`, `style [B]` int32 (see the layout above)."""
  return model.apply(
    {"params": params},
    template,
    style,
    emotion=emotion,
    intensity=intensity,
    method="stream_init",
  )


def unrolled(model: SpeechToMesh, params: Any) -> tuple[SpeechToMesh, Any]:
  """The same model with its encoder layers unrolled, and `params` laid out for it.

  A stream step is small (one chunk), so reading the weights dominates it: scanned layers
  slice each layer's weights out of the stacked arrays at every step, a copy that costs about
  half as much again as the step itself on CPU. Unrolled layers read their own arrays in place.
  Call it once, outside `jax.jit`: `model, params = unrolled(model, params)`, then `init` and
  `step` as usual. Inside a jitted function the slices only fold away when the weights are
  constants (an embedded-weights export, which `export_functions` relies on). Outputs equal
  those of the scanned model to float rounding.
  """
  encoder = model.encoder
  if not encoder.scan_layers:
    return model, params
  transformer = dict(params["encoder"]["encoder"])
  stacked = transformer.pop("layers")
  for i in range(encoder.num_hidden_layers):
    transformer[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  params = {**params, "encoder": {**params["encoder"], "encoder": transformer}}
  model = model.clone(encoder=encoder.clone(parent=None, scan_layers=False))
  return model, params


def step(model: SpeechToMesh, params: Any, state: State, audio: Array) -> tuple[State, Array]:
  """`(state, audio [B, S]) -> (state, vertices [B, F, V, 3])`: the next chunk of each stream."""
  return model.apply({"params": params}, state, audio, method="stream_step")


def run(
  step_fn: Callable[[State, Array], tuple[State, Array]],
  state: State,
  audio: np.ndarray,
  chunk_samples: int,
) -> tuple[State, np.ndarray]:
  """Feeds `audio [B, N * S]` chunk by chunk through `step_fn`; returns the final state and the
  frames of all chunks `[B, N * F, V, 3]` (a whole number of chunks is required)."""
  if audio.shape[1] % chunk_samples:
    raise ValueError(
      f"audio of {audio.shape[1]} samples is not a whole number of {chunk_samples}-sample chunks"
    )
  frames = []
  for start in range(0, audio.shape[1], chunk_samples):
    state, vertices = step_fn(state, audio[:, start : start + chunk_samples])
    frames.append(np.asarray(vertices))
  return state, np.concatenate(frames, axis=1)


def _condition_inputs(model: SpeechToMesh) -> dict[str, tuple[str, str]]:
  specs = {}
  for name, count in (
    ("style", model.decoder.num_styles),
    ("emotion", model.decoder.num_emotions),
    ("intensity", model.decoder.num_intensities),
  ):
    if count > 0:
      specs[name] = ("b", "int32")
  return specs


def state_specs(model: SpeechToMesh) -> dict[str, tuple[str, str]]:
  """`{name: (shape string, dtype)}` of the state, batch dim `b` (the export input specs)."""
  batch = 2  # any size: it becomes the symbolic `b`
  num_vertices = model.decoder.num_vertices
  template = jax.ShapeDtypeStruct((batch, num_vertices, 3), jnp.float32)
  conditions = {
    name: jax.ShapeDtypeStruct((batch,), jnp.int32) for name in _condition_inputs(model)
  }
  state, _ = jax.eval_shape(
    lambda t, c: model.init_with_output(jax.random.key(0), t, method="stream_init", **c),
    template,
    {"style": None, **conditions},
  )
  specs = {}
  for name, value in state.items():
    if value.shape[0] != batch:
      raise AssertionError(f"state {name!r} has no leading batch axis: {value.shape}")
    dims = ", ".join(["b", *(str(d) for d in value.shape[1:])])
    specs[name] = (dims, jnp.dtype(value.dtype).name)
  return specs


def export_functions(
  model: SpeechToMesh, chunk_frames: int = 0
) -> dict[str, tuple[Callable[..., Any], dict[str, tuple[str, str]]]]:
  """`stream_init` and `stream_step` in the form of a task's `predict_fn`, for `fdjax.export`.

  - `stream_init(params, template [b, V, 3], style [b] (, emotion, intensity)) -> state`;
  - `stream_step(params, audio [b, S], **state) -> {"state": state, "vertices": [b, F, V, 3]}`,
    the state passed as one input per entry, named as in the layout above.

  Returns `{name: (fn, input_specs)}`.
  """
  chunk = geometry(model, chunk_frames)
  num_vertices = model.decoder.num_vertices
  conditions = _condition_inputs(model)

  def stream_init(params, template, **condition):
    return init(model, params, template, condition.pop("style", None), **condition)

  def stream_step(params, audio, **state):
    state, vertices = step(*unrolled(model, params), state, audio)
    return {"state": state, "vertices": vertices}

  init_specs = {"template": (f"b, {num_vertices}, 3", "float32"), **conditions}
  step_specs = {"audio": (f"b, {chunk.chunk_samples}", "float32"), **state_specs(model)}
  return {"stream_init": (stream_init, init_specs), "stream_step": (stream_step, step_specs)}


def metadata(model: SpeechToMesh, chunk_frames: int = 0) -> dict[str, Any]:
  """What a streaming client needs to know, for signature.json's metadata["streaming"]."""
  chunk = geometry(model, chunk_frames)
  return {
    "chunk_frames": chunk.chunk_frames,
    "chunk_samples": chunk.chunk_samples,
    "audio_frames_per_chunk": chunk.audio_frames,
    "latency_seconds": chunk.seconds,
    "attention_window": model.encoder.attention_window,
    "cache_window": model.decoder.cache_window,
    "state": sorted(state_specs(model)),
    "usage": "state = stream_init(template, style); then per chunk: "
    "out = stream_step(audio=chunk, **state); state = out['state']; out['vertices']",
  }


def state_bytes(state: State) -> int:
  """Total bytes of a state's arrays (the same after every step)."""
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(state)))
