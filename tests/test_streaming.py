"""Streaming audio2mesh: a causal model fed chunk by chunk equals the same model run offline.

The model is the causal runlocal config (tiny causal wav2vec2 whose conv features are resampled
to the 30 fps mesh frame rate, FaceFormer VOCASET decoder) with short windows (8 and 4 mesh
frames) so that a 14-chunk stream (42 frames) outlives every window and wraps the decoder's
30-frame phase. Its parameters are perturbed at random:
the untrained decoder's zero-initialised output layer would predict the template everywhere,
which any two functions agree on.
"""

import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import config as config_lib
from fdjax import export, streaming, trainer
from fdjax.models.audio2mesh import SpeechToMesh
from fdjax.models.motion_decoders import FaceFormerDecoder
from fdjax.models.wav2vec2 import (
  Wav2Vec2Encoder,
  causal_frame_indices,
  causal_resample_indices,
  resample_causal,
)
from fdjax.tasks import load_task

SPEC = "experiments/audio2mesh/vocaset.py:encoder=tiny,runlocal=True,causal=True"
WINDOWS = ["--config.model.encoder.attention_window=8", "--config.model.decoder.cache_window=4"]
TOLERANCE = 1e-4
NUM_CHUNKS = 14
BATCH = 2


@pytest.fixture(scope="module")
def setup():
  """The causal model, perturbed parameters, a batch of audio and the offline prediction."""
  config = config_lib.load_config(SPEC, WINDOWS)
  task = load_task(config.task)
  model = task.build_model(config)
  variables = jax.jit(model.init)(jax.random.key(0), task.dummy_batch(config, 1))
  params = jax.tree.map(np.asarray, jax.device_get(variables["params"]))
  params = _perturbed(params, 0)
  rng = np.random.default_rng(0)
  chunk = streaming.geometry(model)
  audio = rng.standard_normal((BATCH, NUM_CHUNKS * chunk.chunk_samples)).astype(np.float32)
  template = rng.standard_normal((BATCH, model.decoder.num_vertices, 3)).astype(np.float32)
  style = np.array([0, 5], np.int32)
  predict, _ = task.predict_fn(config, model)
  offline = np.asarray(jax.jit(predict)(params, audio, template, style))
  assert offline.shape == (BATCH, NUM_CHUNKS * chunk.chunk_frames, model.decoder.num_vertices, 3)
  # The motion is large next to the tolerance, so agreement is not trivial.
  assert np.abs(offline - template[:, None]).max() > 1e3 * TOLERANCE
  return {
    "config": config,
    "model": model,
    "params": params,
    "chunk": chunk,
    "audio": audio,
    "template": template,
    "style": style,
    "offline": offline,
  }


def jitted_stream(model, params):
  init = jax.jit(lambda template, style: streaming.init(model, params, template, style))
  step = jax.jit(lambda state, audio: streaming.step(model, params, state, audio))
  return init, step


def test_chunks_hold_whole_mesh_and_audio_frames(setup):
  model = setup["model"]
  assert streaming.geometry(model) == (3, 1600, 5, 16000, 30.0)
  assert streaming.geometry(model, 6)[:3] == (6, 3200, 10)
  with pytest.raises(ValueError, match="stream_chunk_frames=4: must be a multiple of 3"):
    streaming.geometry(model, 4)
  with pytest.raises(ValueError, match="1000 samples is not a whole number .* multiple of 1600"):
    model.stream_chunk_frames(1000)
  biwi_decoder = FaceFormerDecoder.from_variant("tiny", audio_frames_per_frame=2)
  biwi = SpeechToMesh(model.encoder.clone(fps=0.0), biwi_decoder, fps=25)
  assert streaming.geometry(biwi)[:3] == (1, 640, 2)
  with pytest.raises(ValueError, match="the encoder resamples to fps=30 .* model has fps=25"):
    streaming.geometry(biwi.clone(encoder=model.encoder))
  offline_model = SpeechToMesh(Wav2Vec2Encoder.from_variant("tiny"), model.decoder)
  with pytest.raises(ValueError, match="streaming needs a causal encoder"):
    streaming.geometry(offline_model)
  with pytest.raises(ValueError, match="group norm normalises conv 0 over the whole clip"):
    Wav2Vec2Encoder.from_variant("tiny", causal=True)


def test_causal_alignment_reads_the_audio_frames_that_end_last():
  indices = np.asarray(causal_frame_indices(9, 16000, 30, 320))[:, 0]
  np.testing.assert_array_equal(indices, [0, 2, 4, 5, 7, 9, 10, 12, 14])
  frames = np.arange(9)
  frame_end = (frames + 1) * 16000 / 30
  assert np.all((indices + 1) * 320 <= frame_end)  # finished by the end of the mesh frame
  assert np.all((indices + 2) * 320 > frame_end)  # and the next one is not
  pairs = np.asarray(causal_frame_indices(4, 16000, 25, 320, frames_per_frame=2))
  np.testing.assert_array_equal(pairs, [[0, 1], [2, 3], [4, 5], [6, 7]])


@pytest.mark.parametrize("fps", [30, 48, 25])
def test_causal_resampling_reads_no_audio_frame_ending_after_the_mesh_frame(fps):
  num_frames, sample_rate, hop = 240, 16000, 320
  lower, upper, weight = map(np.asarray, causal_resample_indices(num_frames, sample_rate, fps, hop))
  frames = np.arange(num_frames)
  position = frames * (sample_rate / hop) / fps  # FaceFormer's uniform rate mapping
  frame_end = (frames + 1) * sample_rate / fps
  assert np.all((upper + 1) * hop <= frame_end) and np.all((lower + 1) * hop <= frame_end)
  np.testing.assert_array_equal(lower, np.floor(position))
  np.testing.assert_allclose(weight, position - np.floor(position), atol=1e-6)
  clipped = upper < np.ceil(position)
  if fps == 48:  # mesh frames barely shorter than audio frames: the clip keeps it causal
    assert clipped.sum() > num_frames // 2
    np.testing.assert_array_equal(upper[clipped], lower[clipped])
  else:  # 30 fps (5 audio frames per 3 mesh frames) and 25 fps: never needed
    assert not clipped.any()
    np.testing.assert_array_equal(upper, np.ceil(position))
  if fps == 30:
    np.testing.assert_array_equal(lower[:6], [0, 1, 3, 5, 6, 8])
    np.testing.assert_array_equal(upper[:6], [0, 2, 4, 5, 7, 9])
  # A stream chunk (F mesh frames = A audio frames) reads the same frames shifted by A, with
  # the same weights: what makes the streamed frames equal the offline ones.
  chunk_frames = {30: 3, 48: 24, 25: 1}[fps]
  chunk_audio_frames = chunk_frames * sample_rate // (fps * hop)
  for start in range(0, num_frames, chunk_frames):
    chunk = slice(start, start + chunk_frames)
    shift = start // chunk_frames * chunk_audio_frames
    np.testing.assert_array_equal(lower[chunk] - shift, lower[:chunk_frames])
    np.testing.assert_array_equal(upper[chunk] - shift, upper[:chunk_frames])
    np.testing.assert_array_equal(weight[chunk], weight[:chunk_frames])
  features = np.random.default_rng(6).standard_normal((2, 200, 3)).astype(np.float32)
  resampled = np.asarray(resample_causal(features, 100, sample_rate=16000, fps=fps, hop=320))
  lower, upper, weight = lower[:100], upper[:100], weight[:100, None]
  expected = (1 - weight) * features[:, lower] + weight * features[:, upper]
  np.testing.assert_allclose(resampled, expected, atol=1e-6)


def test_offline_causal_model_resamples_to_the_mesh_frame_rate(setup):
  model, params, audio = setup["model"], setup["params"], setup["audio"][:, :9600]
  assert model.encoder.fps == model.fps == 30 and model.encoder.attention_window == 8
  features = model.apply(
    {"params": params}, audio, None, False, 18, None, method=lambda m, *a: m._encode(*a)
  )
  assert features.shape == (BATCH, 18, model.encoder.hidden_size)  # 30 audio frames -> 18


@pytest.mark.parametrize("last_frame", [6, 7, 8])
def test_offline_causal_model_ignores_later_audio(setup, last_frame):
  model, params = setup["model"], setup["params"]
  audio, template, style = setup["audio"][:, :9600], setup["template"], setup["style"]

  @jax.jit
  def generate(audio):
    return model.apply({"params": params}, audio, template, style, method="generate")[0]

  # Mesh frame t ends at sample (t + 1) * 16000 / 30; change everything from the next sample on.
  end = -(-(last_frame + 1) * 16000 // 30)
  changed = audio.copy()
  changed[:, end:] = 0.0
  before, after = np.asarray(generate(audio)), np.asarray(generate(changed))
  np.testing.assert_array_equal(before[:, : last_frame + 1], after[:, : last_frame + 1])
  assert np.abs(before[:, last_frame + 1] - after[:, last_frame + 1]).max() > 1e-3


def _perturbed(params, seed, scale=0.3):
  leaves, treedef = jax.tree.flatten(jax.device_get(params))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef, [(x + scale * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves]
  )


@pytest.mark.parametrize(
  "fields",
  [
    dict(scan_layers=False),
    dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True),
    dict(conv_pos_batch_norm=True, num_conv_pos_embeddings=7),
  ],
  ids=["unrolled", "prenorm_layer_norms", "hubert_batch_norm_odd_taps"],
)
def test_causal_encoder_streams_its_offline_frames(fields):
  fields = {"feat_extract_norm": "frame", **fields}
  encoder = Wav2Vec2Encoder.from_variant("tiny", causal=True, attention_window=6, **fields)
  audio = np.random.default_rng(2).standard_normal((2, 8 * 640)).astype(np.float32)
  params = _perturbed(jax.jit(encoder.init)(jax.random.key(0), audio[:, :640])["params"], 3)
  offline, _ = jax.jit(encoder.apply)({"params": params}, audio)  # [B, 16, D]
  assert offline.shape[1] == audio.shape[1] // encoder.hop

  @jax.jit
  def step(state, chunk):
    hidden, aux = encoder.apply({"params": params}, chunk, stream_state=state)
    return aux["stream_state"], hidden

  _, streamed = streaming.run(step, encoder.initial_stream_state(2), audio, 640)
  np.testing.assert_allclose(streamed, offline, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
  ("fps", "encoder_fps", "ratio", "chunks"),
  [(25, 0.0, 2, 8), (30, 0.0, 1, 6), (48, 48.0, 1, 2)],
  ids=["biwi_pairs_at_the_audio_frame_rate", "hop_rate_at_30fps", "resampled_to_48fps_clipped"],
)
def test_causal_models_stream_their_offline_frames(fps, encoder_fps, ratio, chunks):
  encoder = Wav2Vec2Encoder.from_variant(
    "tiny", causal=True, feat_extract_norm="frame", attention_window=5, fps=encoder_fps
  )
  decoder = FaceFormerDecoder.from_variant("tiny", cache_window=4, audio_frames_per_frame=ratio)
  model = SpeechToMesh(encoder, decoder, fps=fps)
  chunk = streaming.geometry(model)
  rng = np.random.default_rng(7)
  audio = rng.standard_normal((2, chunks * chunk.chunk_samples)).astype(np.float32)
  template = rng.standard_normal((2, decoder.num_vertices, 3)).astype(np.float32)
  style = np.array([0, 2], np.int32)
  frames = chunks * chunk.chunk_frames
  batch = {
    "audio": audio,
    "vertices": np.zeros((2, frames, decoder.num_vertices, 3), np.float32),
    "template": template,
    "subject": style,
  }
  params = _perturbed(jax.jit(model.init)(jax.random.key(0), batch)["params"], 8)
  offline, _ = jax.jit(
    lambda audio: model.apply({"params": params}, audio, template, style, method="generate")
  )(audio)
  assert offline.shape[1] == frames
  assert np.abs(offline - template[:, None]).max() > 1e3 * TOLERANCE
  init, step = jitted_stream(model, params)
  _, streamed = streaming.run(step, init(template, style), audio, chunk.chunk_samples)
  np.testing.assert_allclose(streamed, offline, atol=TOLERANCE, rtol=0)


def test_decoder_window_is_the_same_in_training_and_generation():
  decoder = FaceFormerDecoder.from_variant("tiny", cache_window=3, period=4)
  rng = np.random.default_rng(4)
  audio = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.float32)
  template = jnp.asarray(rng.standard_normal((2, 8, 3)), jnp.float32)
  style, vertices = jnp.array([0, 2]), jnp.zeros((2, 10, 8, 3))
  # Jitted: eagerly, every operation of every method compiles on its own.
  params = _perturbed(jax.jit(decoder.init)(jax.random.key(0), audio, template, style, vertices), 5)
  apply = jax.jit(decoder.apply, static_argnames="method")
  generated, _ = apply(params, audio, template, style, method="generate")
  uncached, _ = apply(params, audio, template, style, method="generate_without_cache")
  teacher_forced, _ = apply(params, audio, template, style, generated)
  np.testing.assert_allclose(uncached, generated, atol=1e-5, rtol=0)
  np.testing.assert_allclose(teacher_forced, generated, atol=1e-5, rtol=0)
  unbounded, _ = jax.jit(decoder.clone(cache_window=0).apply, static_argnames="method")(
    params, audio, template, style, method="generate"
  )
  assert np.abs(unbounded[:, 3:] - generated[:, 3:]).max() > 1e-3  # the window matters


def test_jitted_stream_equals_offline(setup):
  init, step = jitted_stream(setup["model"], setup["params"])
  state = init(setup["template"], setup["style"])
  _, streamed = streaming.run(step, state, setup["audio"], setup["chunk"].chunk_samples)
  # Equal from the first frame on: the stream's zero context is the offline zero padding.
  np.testing.assert_allclose(streamed, setup["offline"], atol=TOLERANCE, rtol=0)


def test_unrolled_layers_stream_the_same_frames(setup):
  model, params = streaming.unrolled(setup["model"], setup["params"])
  assert not model.encoder.scan_layers and setup["model"].encoder.scan_layers
  layers = params["encoder"]["encoder"]
  assert "layers" not in layers
  assert (
    sorted(layers).count("layers_0") == 1
    and f"layers_{model.encoder.num_hidden_layers - 1}" in layers
  )
  init, step = jitted_stream(model, params)
  state = init(setup["template"], setup["style"])
  _, streamed = streaming.run(step, state, setup["audio"], setup["chunk"].chunk_samples)
  np.testing.assert_allclose(streamed, setup["offline"], atol=TOLERANCE, rtol=0)
  assert streaming.unrolled(model, params) == (model, params)  # already unrolled: unchanged


def test_exported_stream_step_equals_offline(setup, tmp_path):
  model, params = setup["model"], setup["params"]
  functions = {}
  for name, (fn, specs) in streaming.export_functions(model).items():
    functions[name], weights = export.export_function(fn, specs, params)
  task = load_task("audio2mesh")
  predict, predict_specs = task.predict_fn(setup["config"], model)
  constraints = task.symbolic_constraints(setup["config"])
  functions["predict"], _ = export.export_function(
    predict, predict_specs, params, constraints=constraints
  )
  export.write_artifact(
    str(tmp_path),
    functions,
    weights,
    metadata={"streaming": streaming.metadata(model)},
    constraints=constraints,
  )
  signature = export.read_signature(str(tmp_path))
  assert signature["metadata"]["streaming"]["chunk_samples"] == 1600
  step = export.load(str(tmp_path), "stream_step")
  inputs = {spec["name"]: spec["shape"] for spec in step.inputs}
  assert inputs["audio"] == ["b", 1600] and inputs["encoder_keys"] == ["b", 2, 7, 4, 16]
  state_names = set(inputs) - {"audio"}
  assert {o["name"] for o in step.outputs} == {"vertices", *(f"state/{k}" for k in state_names)}

  def exported_step(state, audio):
    out = step(audio=audio, **state)
    return out["state"], out["vertices"]

  state = export.load(str(tmp_path), "stream_init")(
    template=setup["template"], style=setup["style"]
  )
  _, streamed = streaming.run(exported_step, state, setup["audio"], 1600)
  np.testing.assert_allclose(streamed, setup["offline"], atol=TOLERANCE, rtol=0)
  offline = export.load(str(tmp_path))(
    audio=setup["audio"], template=setup["template"], style=setup["style"]
  )
  np.testing.assert_allclose(streamed, np.asarray(offline), atol=TOLERANCE, rtol=0)
  with pytest.raises(export.SignatureError, match="input 'audio': dim 1 is 1599, expected 1600"):
    step(audio=setup["audio"][:, :1599], **state)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_device_bytes() -> tuple[int, int]:
  gc.collect()
  arrays = jax.live_arrays()
  return len(arrays), sum(a.nbytes for a in arrays)


def test_state_and_memory_stay_flat_over_a_ten_times_longer_stream(setup):
  model, params = setup["model"], setup["params"]
  init, step = jitted_stream(model, params)
  chunk_samples = setup["chunk"].chunk_samples
  rng = np.random.default_rng(1)
  chunks = jnp.asarray(rng.standard_normal((8, BATCH, chunk_samples)), jnp.float32)
  state = init(setup["template"], setup["style"])
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  state_bytes = streaming.state_bytes(state)
  short, long = 100, 1000
  measured = {}
  for index in range(long):
    state, vertices = step(state, chunks[index % len(chunks)])
    if index + 1 in (short, long):
      jax.block_until_ready(vertices)
      del vertices
      measured[index + 1] = (_live_device_bytes(), _rss_bytes())
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
  assert streaming.state_bytes(state) == state_bytes
  assert step._cache_size() == 1  # one executable for the whole stream
  (live_short, rss_short), (live_long, rss_long) = measured.values()
  assert live_long == live_short  # device arrays: the same count and bytes
  # Host memory: keeping anything of the size of the state per chunk would add 900x 147 kB =
  # 130 MB; allocator and thread-arena noise in a shared test process is a few MB.
  growth = rss_long - rss_short
  assert growth < 0.25 * (long - short) * state_bytes, (rss_short, rss_long)


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
  """A causal run trained for two steps with a large learning rate (visible motion)."""
  workdir = str(tmp_path_factory.mktemp("causal_run"))
  overrides = [
    *WINDOWS,
    "--config.total_steps=2",
    "--config.optim.warmup_steps=0",
    "--config.optim.lr=0.01",
  ]
  config = config_lib.load_config(SPEC, overrides)
  trainer.train_and_evaluate(config, workdir)
  return config, workdir


def test_fdjax_export_of_a_causal_run_writes_stream_functions(causal_run, setup, tmp_path):
  config, workdir = causal_run
  out = str(tmp_path / "artifact")
  assert export.main(["--workdir", workdir, "--out", out, "--batch", "2"]) == 0
  with open(os.path.join(out, "signature.json")) as f:
    signature = json.load(f)
  assert set(signature["functions"]) == {"predict", "stream_init", "stream_step"}
  assert {"stream_step.jaxexport", "stream_init.mlir"} <= set(os.listdir(out))
  assert signature["metadata"]["streaming"]["chunk_frames"] == 3
  step = export.load(out, "stream_step")
  assert step.inputs[0] == {"name": "audio", "shape": [2, 1600], "dtype": "float32"}

  task, model, params, _ = trainer.restore_params(config, workdir)
  template, style, audio = setup["template"], setup["style"], setup["audio"][:, : 6 * 1600]
  predict, _ = task.predict_fn(config, model)
  offline = np.asarray(jax.jit(predict)(jax.device_get(params), audio, template, style))
  assert np.abs(offline - template[:, None]).max() > 1e2 * TOLERANCE

  def exported_step(state, chunk):
    out = step(audio=chunk, **state)
    return out["state"], out["vertices"]

  state = export.load(out, "stream_init")(template=template, style=style)
  _, streamed = streaming.run(exported_step, state, audio, 1600)
  np.testing.assert_allclose(streamed, offline, atol=TOLERANCE, rtol=0)
