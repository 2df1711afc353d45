"""The motion diffusion decoders through the audio2mesh task on the tiny VOCASET twin: the
diffspeaker variant learns and its evaluation samples every sequence twice (a nonzero
diversity); its exported sampler (per-example seeds and guidance scales as inputs, the sampling
steps fixed at export by a config flag) equals in-process sampling in a jax-only process and is
served by `fdjax serve`; the facediffuser and diffposetalk experiments build their models,
losses and samplers (diffposetalk's over windows)."""

import http.client
import io
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export import JAX_ONLY_EPILOGUE, JAX_ONLY_PROLOGUE, run_jax_only

from fdjax import config as config_lib
from fdjax import diffusion, export, serve, trainer
from fdjax.models.motion_diffusion import (
  DiffPoseTalkDecoder,
  FaceDiffuserDecoder,
  RecurrentDenoiser,
  TransformerDenoiser,
)
from fdjax.state import strip_boxes
from fdjax.tasks import _speech_mesh, audio2mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "experiments/audio2mesh/vocaset.py:encoder=tiny,runlocal=True")


def _first_batch(config):
  return next(iter(audio2mesh.train_data(config, process_index=0, process_count=1)))


def _template_loss(config, batch):
  """The loss of an untrained decoder: its zero-initialised output predicts x_0 = 0 at every
  noise level, so its vertices are the template's (uniform weights: min-SNR off)."""
  mm = 1000.0
  truth = batch["vertices"] * mm
  template = np.broadcast_to(batch["template"][:, None] * mm, truth.shape)
  mask = batch["frame_mask"]
  vertex = diffusion.denoising_loss(template, truth, mask)
  velocity = diffusion.denoising_loss(
    np.diff(template, axis=1), np.diff(truth, axis=1), mask[:, 1:] & mask[:, :-1]
  )
  return float(jnp.mean(vertex + config.loss.velocity_weight * velocity))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("diffspeaker"))


DIFFSPEAKER = SPEC + ",variant=diffspeaker,steps=30"
DIFFSPEAKER_OVERRIDES = ["--config.optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def trained(workdir):
  config = config_lib.load_config(DIFFSPEAKER, DIFFSPEAKER_OVERRIDES)
  result = trainer.train_and_evaluate(config, workdir)
  return config, result


def test_diffspeaker_experiment_keeps_an_ema_and_samples_by_ddim(trained):
  config, result = trained
  assert config.model.decoder.kind == "diffspeaker" and config.ema.decay > 0
  assert config.model.decoder.sampling_method == "ddim"
  assert result.state.ema is not None
  assert result.step == 30 and np.isfinite(result.train_metrics["loss"])
  metrics = result.eval_metrics
  # Sampled (DDIM, seeded) from audio alone, the lips already move better than a static face.
  assert metrics["lve_squared"] < metrics["static_template/lve_squared"], metrics
  # Two samples per sequence (seeds 0 and 1): one sample's row, their mean, their diversity.
  assert config.data.eval_num_samples == 2 and metrics["num_samples"] == 2
  assert metrics["mean_of_samples/lve_squared"] < metrics["static_template/lve_squared"]
  assert metrics["mean_of_samples/num_frames"] == metrics["num_frames"]
  # In mm: the samples from two seeds differ (float32 noise would be ~1e-7 mm).
  assert metrics["diversity_mm"] > 5e-4, metrics  # measured: 1.7e-3


def test_diffspeaker_training_lowers_the_denoising_loss(trained):
  config, result = trained
  assert config.model.decoder.min_snr_gamma == 0 and config.loss.target_weight == 0
  model = audio2mesh.build_model(config)
  batch = _first_batch(config)
  loss_fn = audio2mesh.make_loss_fn(config)
  # The trained loss at a fixed draw of noise, against an untrained decoder's at any draw.
  loss, _ = jax.jit(lambda p: loss_fn(model, p, batch, jax.random.key(100), True))(
    result.state.params
  )
  before = _template_loss(config, batch)
  assert float(loss) < 0.75 * before, (before, float(loss))  # measured: about 0.5


@pytest.mark.parametrize(
  "dataset, variant",
  [("vocaset", "facediffuser"), ("vocaset", "diffposetalk"), ("biwi", "diffposetalk")],
)
def test_experiment_builds_its_denoiser_loss_and_sampler(dataset, variant):
  overrides = []
  if variant == "diffposetalk":
    # Windows of 8 frames after 2 previous ones: training examples of 10 frames.
    overrides = [
      "--config.model.decoder.window_frames=8",
      "--config.model.decoder.previous_frames=2",
      "--config.data.window_frames=10",
    ]
  spec = SPEC.replace("vocaset.py", f"{dataset}.py")
  config = config_lib.load_config(spec + f",variant={variant}", overrides)
  model = audio2mesh.build_model(config)
  decoder = model.decoder
  assert decoder.sampling_method == "ddpm" and decoder.beta_schedule == "squaredcos_cap_v2"
  if variant == "facediffuser":
    assert isinstance(decoder, FaceDiffuserDecoder)
    assert isinstance(decoder.denoiser, RecurrentDenoiser)
    assert config.loss.distance == "huber" and decoder.num_train_timesteps == 1000
  else:
    assert isinstance(decoder, DiffPoseTalkDecoder)
    assert isinstance(decoder.denoiser, TransformerDenoiser)
    assert decoder.num_train_timesteps == 500 and decoder.prediction_type == "sample"
    assert (decoder.audio_drop_probability, decoder.style_drop_probability) == (0.1, 0.45)
    assert (decoder.audio_guidance_scale, decoder.style_guidance_scale) == (1.15, 3.0)
    assert (decoder.window_frames, decoder.previous_frames) == (8, 2)
  batch = audio2mesh.dummy_batch(config, 2)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  # Shapes only (eval_shape): the numerics of the denoisers are tests/models' business.
  params = jax.eval_shape(lambda: strip_boxes(model.init(rngs, batch)["params"]))
  loss, metrics = jax.eval_shape(
    lambda p: audio2mesh.make_loss_fn(config)(model, p, batch, jax.random.key(2), True), params
  )
  assert loss.shape == () and {"vertex_mse_mm2", "velocity_mse_mm2", "weight"} <= set(metrics)
  predict, _ = audio2mesh.predict_fn(config, model)
  frames = 20  # diffposetalk: 2.5 windows (on BIWI of 2 audio features per frame)
  assert decoder.audio_frames_per_frame == (2 if dataset == "biwi" else 1)
  audio = np.zeros((2, _speech_mesh.window_samples(config, frames)), np.float32)
  vertices = jax.eval_shape(predict, params, audio, batch["template"], batch["subject"])
  assert vertices.shape == (2, frames) + batch["vertices"].shape[2:]


def test_facediffuser_on_biwi_diffuses_over_500_steps():
  spec = SPEC.replace("vocaset.py", "biwi.py") + ",variant=facediffuser"
  decoder = config_lib.load_config(spec.replace(",runlocal=True", "")).model.decoder
  assert decoder.num_train_timesteps == decoder.sampling_steps == 500
  assert decoder.sampling_method == "ddpm"


# Calls the artifact with jax alone (fdjax and flax blocked) through the copied loader, once per
# saved input set `<case>_in.npz`, writing `<case>_loader.npz` (test_export.py's CASES_JAX_ONLY
# without the second, equivalent `exported.call`: each call of a sampler is a compile).
LOADER_JAX_ONLY = (
  JAX_ONLY_PROLOGUE
  + """
import artifact_loader

directory, cases = sys.argv[1], sys.argv[2:]
model = artifact_loader.load(directory)
for case in cases:
  outputs = model(**dict(np.load(f"{case}_in.npz")))
  np.savez(f"{case}_loader.npz", output=np.asarray(outputs))
"""
  + JAX_ONLY_EPILOGUE
)
STEPS = 3  # sampling steps fixed at export (the runlocal config samples 5)
STEPS_FLAG = f"--config.model.decoder.sampling_steps={STEPS}"
VERTICES = 5023


@pytest.fixture(scope="module")
def sampler(trained, workdir, tmp_path_factory):
  """The trained run exported by `fdjax export` with its EMA (symbolic b and s, external
  weights) and STEPS sampling steps, and the in-process predict of the same parameters and
  steps."""
  out = str(tmp_path_factory.mktemp("artifact"))
  # External weights: a sampler with its weights as arguments compiles much faster than one
  # with them as embedded constants.
  assert export.main(["--workdir", workdir, "--out", out, "--external-weights", STEPS_FLAG]) == 0
  config = config_lib.load_config(DIFFSPEAKER, [*DIFFSPEAKER_OVERRIDES, STEPS_FLAG])
  task, model, params, _ = trainer.restore_params(config, workdir)
  predict, _ = task.predict_fn(config, model)
  params = jax.device_get(params)
  jitted = jax.jit(predict)
  return {
    "out": out,
    "model": model,
    "params": params,
    "predict": lambda **inputs: np.asarray(jitted(params, **inputs)),
    # The task's predict with only (audio, template, style): the defaults for the rest.
    "model_predict": lambda *inputs: np.asarray(jax.jit(predict)(params, *inputs)),
  }


def _inputs(batch, samples, seed, scales=(1.0, 1.0), rng_seed=0):
  rng = np.random.default_rng(rng_seed)
  audio, style = np.broadcast_to(np.asarray(scales, np.float32), (batch, 2)).T
  return {
    "audio": rng.standard_normal((batch, samples)).astype(np.float32),
    "template": rng.normal(0, 0.1, (batch, VERTICES, 3)).astype(np.float32),
    "style": np.arange(batch, dtype=np.int32) % 3,
    "seed": np.asarray(seed, np.int32).reshape(batch),
    "audio_guidance_scale": audio.copy(),
    "style_guidance_scale": style.copy(),
  }


def test_sampler_signature_metadata_and_defaults(sampler):
  signature = export.read_signature(sampler["out"])
  inputs = signature["functions"]["predict"]["inputs"]
  shapes = {s["name"]: (s["shape"], s["dtype"]) for s in inputs}
  assert shapes == {
    "audio": (["b", "s"], "float32"),
    "template": (["b", VERTICES, 3], "float32"),
    "style": (["b"], "int32"),
    "seed": (["b"], "int32"),
    "audio_guidance_scale": (["b"], "float32"),
    "style_guidance_scale": (["b"], "float32"),
  }
  metadata = signature["metadata"]["sampler"]
  assert (metadata["method"], metadata["steps"], metadata["eta"]) == ("ddim", STEPS, 0.0)
  defaults = serve.load_defaults(sampler["out"], signature)
  assert defaults["seed"] == 0 and defaults["style"] == 0
  assert defaults["audio_guidance_scale"] == 1.0 and defaults["style_guidance_scale"] == 1.0
  # The steps are fixed at export: the sampler's scan runs STEPS times.
  assert f"stablehlo.constant dense<{STEPS}>" in open(f"{sampler['out']}/model.mlir").read()


def test_sampler_in_a_jax_only_process_equals_in_process_sampling(sampler, tmp_path):
  cases = {}
  # Two batch sizes and two lengths (1.0 s = 30 frames, 0.7 s = 21 frames) from one artifact;
  # the second batch guides two of its three examples, each with its own scales.
  for batch, samples, seed, scales in (
    (1, 16000, [7], (1.0, 1.0)),
    (3, 11200, [1, 2, 3], [(1.0, 1.0), (2.0, 1.0), (1.5, 3.0)]),
  ):
    case = str(tmp_path / f"case{batch}")
    cases[case] = _inputs(batch, samples, seed, scales, rng_seed=batch)
    np.savez(f"{case}_in.npz", **cases[case])
  proc = run_jax_only(tmp_path, LOADER_JAX_ONLY, [sampler["out"], *cases])
  assert proc.returncode == 0, proc.stderr
  for case, inputs in cases.items():
    expected = sampler["predict"](**inputs)
    batch, samples = inputs["audio"].shape
    assert expected.shape == (batch, samples * 30 // 16000, VERTICES, 3)
    # The motion is large next to the tolerance, so the comparison is not vacuous.
    assert np.abs(expected - inputs["template"][:, None]).max() > 1e-3
    outputs = np.load(f"{case}_loader.npz")
    np.testing.assert_allclose(outputs["output"], expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def served(sampler):
  """`fdjax serve`'s server over the artifact; its `model` is the artifact (`export.load`)."""
  server = serve.make_server(sampler["out"], port=0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()
  thread.join(timeout=10)


def test_seeds_and_guidance_scales_are_inputs(sampler, served):
  model, params, artifact = sampler["model"], sampler["params"], served.model
  inputs = _inputs(3, 11200, [1, 2, 3])
  base = np.asarray(artifact(**inputs))

  # Each example's seed gives its own noise: same inputs, other seeds, other samples. (This
  # briefly trained x_0 model barely reads x_t: seeds move its samples by a few 1e-6 m, far
  # above float32 rounding, about 3e-8 m here.)
  same = {k: np.repeat(v[:1], 3, axis=0) for k, v in inputs.items() if k != "seed"}
  samples = np.asarray(artifact(**same, seed=inputs["seed"]))
  assert np.abs(samples[0] - samples[1]).max() > 1e-6 < np.abs(samples[1] - samples[2]).max()
  # An example's sample depends on its own seed only, not on the rest of its batch.
  alone = np.asarray(artifact(**{k: v[1:2] for k, v in inputs.items()}))
  np.testing.assert_allclose(alone[0], base[1], atol=2e-7, rtol=0)

  def in_process(scales):
    return np.asarray(
      jax.jit(
        lambda p: model.apply(
          {"params": p},
          inputs["audio"],
          inputs["template"],
          inputs["style"],
          method="generate",
          seed=inputs["seed"],
          guidance_scales=scales,
        )[0]
      )(params)
    )

  # Scales (1, 1) as inputs are the unguided loop (a tuple (1, 1) in-process).
  np.testing.assert_allclose(base, in_process((1.0, 1.0)), atol=1e-5, rtol=0)
  # Other scales change the sample, and equal the in-process guided loop of the same scales
  # within a tolerance ten times below that change. (This briefly trained model reads its
  # conditions weakly: scales (30, 10) move the sample by a few 1e-5 m, the artifact and the
  # in-process loop differ by about 3e-8 m.)
  scales = {"audio_guidance_scale": 30.0, "style_guidance_scale": 10.0}
  guided_inputs = {**inputs, **{k: np.full(3, v, np.float32) for k, v in scales.items()}}
  guided = np.asarray(artifact(**guided_inputs))
  assert np.abs(guided - base).max() > 1e-5
  np.testing.assert_allclose(guided, in_process(tuple(scales.values())), atol=1e-6, rtol=0)


def test_fdjax_serve_answers_a_request_on_the_sampler(sampler, served):
  audio = np.random.default_rng(4).standard_normal((1, 11200)).astype(np.float32)

  def post(inputs):
    body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}})
    connection = http.client.HTTPConnection(*served.server_address[:2], timeout=120)
    headers = {"Content-Type": "application/json", "Accept": "application/x-npz"}
    connection.request("POST", "/predict", body, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    assert response.status == 200, data
    return np.load(io.BytesIO(data))["output"]

  # Audio alone: template, style, seed and guidance scales come from the defaults, as they do
  # in the task's predict called without them.
  answered = post({"audio": audio})
  defaults = serve.load_defaults(sampler["out"], export.read_signature(sampler["out"]))
  template = np.asarray(defaults["template"])[None]
  assert answered.shape == (1, 21, VERTICES, 3)
  expected = sampler["model_predict"](audio, template, np.zeros(1, np.int32))
  np.testing.assert_allclose(answered, expected, atol=1e-5, rtol=0)
  reseeded = post({"audio": audio, "seed": np.asarray([5], np.int32)})
  assert np.abs(reseeded - answered).max() > 1e-6  # see the seeds test
