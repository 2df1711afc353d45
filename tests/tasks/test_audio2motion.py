"""Task audio2motion (talking-head stage 2) on the tiny VoxCeleb2 twin over a tiny stage-1
(`face_motion_ae`) run trained for one step: training leaves stage 1 bit for bit as loaded and
lowers the denoising loss; evaluation samples each
held-out clip twice (nonzero diversity); `fdjax generate` writes an MP4 with one video and one
audio stream of the audio's duration and refuses bad inputs in one line naming the file; the
exported sampler and stage-1 functions in a jax-only process equal in-process results."""

import os

import av
import jax
import numpy as np
import pytest
import soundfile
from flax.traverse_util import flatten_dict
from PIL import Image
from test_export import JAX_ONLY_EPILOGUE, JAX_ONLY_PROLOGUE, run_jax_only

from fdjax import cli, export, trainer
from fdjax import config as config_lib
from fdjax.tasks import audio2motion, face_motion_ae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(
  ROOT, "experiments/talking_head/hdtf_audio2motion.py:size=tiny,runlocal=True,dataset=voxceleb2"
)
STAGE1 = os.path.join(
  ROOT, "experiments/talking_head/hdtf.py:stage=motion_ae,runlocal=True,dataset=voxceleb2,steps=1"
)
# The stage-1 run's frame size and code width, as its runlocal config sets them.
_STAGE1_MODEL = config_lib.load_config(STAGE1).model
CODE_WIDTH, SIZE = _STAGE1_MODEL.motion_dim, _STAGE1_MODEL.image_size
OVERRIDES = [
  "--config.total_steps=20",
  "--config.optim.lr=3e-3",
  "--config.data.eval_max_examples=1",  # one compile of the sampler
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  stage1 = str(tmp_path_factory.mktemp("stage1"))
  trainer.train_and_evaluate(config_lib.load_config(STAGE1), stage1)
  workdir = str(tmp_path_factory.mktemp("stage2"))
  spec = SPEC + f",motion_ae={stage1}"
  # x_0 at about unit spread: the sample scale from the code deltas of a training batch.
  video = _first_batch(config_lib.load_config(spec, OVERRIDES))["video"]
  model, params, _ = face_motion_ae.load(stage1)
  frames = video.reshape(-1, *video.shape[2:]).astype(np.float32) / 255.0
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_motion"))
  codes = encode(params, frames)
  codes = np.asarray(codes).reshape(*video.shape[:2], -1)
  scale = 1.0 / float((codes - codes[:, :1]).std())
  overrides = [*OVERRIDES, f"--config.model.decoder.sample_scale={scale}"]
  config = config_lib.load_config(spec, overrides)
  result = trainer.train_and_evaluate(config, workdir)
  return {"config": config, "result": result, "workdir": workdir, "stage1": stage1}


def _first_batch(config):
  return next(iter(audio2motion.train_data(config, process_index=0, process_count=1)))


def test_training_keeps_stage1_frozen_and_lowers_the_loss(run):
  config, result = run["config"], run["result"]
  expected = flatten_dict(audio2motion.load_stage1_params(run["stage1"]), sep="/")
  for params in (result.state.params, result.state.ema):
    kept = flatten_dict(jax.device_get(params["motion_ae"]), sep="/")
    # Every stage-1 parameter but its discriminator's (stage-1 training only), as trained.
    assert set(kept) == {k for k in expected if not k.startswith("discriminator/")}
    for path, value in kept.items():
      np.testing.assert_array_equal(value, expected[path], err_msg=path)
  model = audio2motion.build_model(config)
  loss_fn = audio2motion.make_loss_fn(config)
  batch = _first_batch(config)
  # The same draws of timesteps, noise and drops before and after (one compile).
  loss = jax.jit(lambda params, key: loss_fn(model, params, batch, key, True)[0])

  def mean_loss(params):
    return np.mean([float(loss(params, key)) for key in jax.random.split(jax.random.key(7), 8)])

  # One jitted init (eager, every initialiser compiles on its own), and host arrays before and
  # after so that `loss` compiles once (the trained parameters are sharded over 8 devices).
  initial = jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch)
  before = mean_loss(audio2motion.load_pretrained(config, jax.device_get(initial["params"])))
  after = mean_loss(jax.device_get(result.state.params))
  # Over a one-step stage 1 the code deltas hold little to learn: measured 0.90 of before.
  assert after < 0.95 * before, (before, after)


def test_evaluation_samples_every_clip_twice(run):
  metrics = run["result"].eval_metrics
  assert metrics["num_samples"] == 2 and metrics["num_clips"] >= 1
  assert np.isfinite(metrics["code_mse"]) and np.isfinite(metrics["static_reference/code_mse"])
  # Two seeds, two samples: apart by far more than float32 rounding (about 1e-7 here).
  assert metrics["diversity"] > 1e-5, metrics


def test_stage1_must_be_frozen(run):
  config = config_lib.load_config(
    SPEC + f",motion_ae={run['stage1']}", ["--config.optim.freeze=()"]
  )
  with pytest.raises(ValueError, match="does not freeze the stage-1 model"):
    audio2motion.make_loss_fn(config)


def test_a_missing_stage1_run_is_named(tmp_path):
  config = config_lib.load_config(SPEC + f",motion_ae={tmp_path / 'nothing'}")
  with pytest.raises(FileNotFoundError, match="no stage-1 run there"):
    audio2motion.build_model(config)


def _inputs(tmp_path, seconds=1.3, rate=22050):
  portrait = tmp_path / "portrait.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (150, 120, 3), np.uint8)).save(portrait)
  speech = tmp_path / "speech.wav"
  t = np.arange(int(seconds * rate)) / rate
  soundfile.write(speech, 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)), rate)
  return str(portrait), str(speech)


def test_generate_writes_an_mp4_with_the_audio_muxed_in(run, tmp_path, capsys):
  portrait, speech = _inputs(tmp_path)
  out = tmp_path / "clip.mp4"
  argv = ["--portrait", portrait, "--audio", speech, "--workdir", run["workdir"]]
  assert cli.main(["generate", *argv, "--out", str(out)]) == 0
  captured = capsys.readouterr()
  assert "32/32 frames" in captured.err  # the progress line: 1.3 s at 25 fps
  seconds = 1.3
  with av.open(str(out)) as container:
    assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
    video = container.streams.video[0]
    assert (video.codec_context.width, video.codec_context.height) == (SIZE, SIZE)
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  with av.open(str(out)) as container:
    audio = sum(f.samples for f in container.decode(audio=0))
    rate = container.streams.audio[0].codec_context.sample_rate
  assert rate == 16000
  # Whole video frames of the audio, and the audio itself, both of the audio's duration (the
  # AAC encoder pads its last frame of 1024 samples).
  assert len(frames) == 32 and abs(len(frames) / 25 - seconds) < 1 / 25
  assert abs(audio / rate - seconds) < 1 / 25 + 1024 / rate


def test_generate_refuses_bad_inputs_naming_the_file(run, tmp_path, capsys):
  portrait, speech = _inputs(tmp_path)
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not an image")
  noise = tmp_path / "noise.wav"
  noise.write_bytes(b"RIFF not audio")
  cases = [
    (str(tmp_path / "missing.png"), speech, "portrait not found"),
    (str(garbage), speech, "cannot read the portrait"),
    (portrait, str(tmp_path / "missing.wav"), "audio not found"),
    (portrait, str(noise), "cannot read the audio"),
  ]
  for image, audio, message in cases:
    argv = ["generate", "--portrait", image, "--audio", audio, "--workdir", run["workdir"]]
    assert cli.main([*argv, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert (image if "portrait" in message else audio) in err
  assert not (tmp_path / "x.mp4").exists()


LOADER_JAX_ONLY = (
  JAX_ONLY_PROLOGUE
  + """
import artifact_loader

directory, case = sys.argv[1], sys.argv[2]
inputs = dict(np.load(f"{case}_in.npz"))
code = artifact_loader.load(directory, "portrait_code")(portrait=inputs["portrait"])
codes = artifact_loader.load(directory)(
  audio=inputs["audio"], reference=np.asarray(code), seed=inputs["seed"],
  guidance_scale=inputs["guidance_scale"],
)
render = artifact_loader.load(directory, "render")
frames = render(portrait=inputs["portrait"], codes=np.asarray(codes))
outputs = {"code": code, "codes": codes, "frames": frames}
np.savez(f"{case}_loader.npz", **{k: np.asarray(v) for k, v in outputs.items()})
"""
  + JAX_ONLY_EPILOGUE
)


def test_exported_chain_in_a_jax_only_process_equals_in_process(run, tmp_path):
  out = str(tmp_path / "artifact")
  frames = 12  # windows of 8 after 2: two windows, the second padded
  assert export.main(["--workdir", run["workdir"], "--out", out, "--time", str(frames)]) == 0
  signature = export.read_signature(out)
  assert set(signature["functions"]) == {"predict", "portrait_code", "render"}
  config = run["config"]
  _, model, params, _ = trainer.restore_params(config, run["workdir"])
  params = jax.device_get(params)
  rng = np.random.default_rng(3)
  inputs = {
    "portrait": rng.uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32),
    "audio": rng.standard_normal((2, frames * 640)).astype(np.float32),
    "seed": np.asarray([4, 5], np.int32),
    "guidance_scale": np.asarray([1.0, 2.0], np.float32),
  }
  case = str(tmp_path / "case")
  np.savez(f"{case}_in.npz", **inputs)
  proc = run_jax_only(tmp_path, LOADER_JAX_ONLY, [out, case])
  assert proc.returncode == 0, proc.stderr
  loaded = np.load(f"{case}_loader.npz")
  code = np.asarray(audio2motion.portrait_code(model, params, inputs["portrait"]))
  codes = np.asarray(
    audio2motion.sample_codes(
      model, params, inputs["audio"], code, inputs["seed"], inputs["guidance_scale"], frames
    )
  )
  rendered = np.asarray(audio2motion.render_codes(model, params, inputs["portrait"], codes))
  assert codes.shape == (2, frames, CODE_WIDTH) and rendered.shape == (2, frames, SIZE, SIZE, 3)
  np.testing.assert_allclose(loaded["code"], code, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loaded["codes"], codes, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loaded["frames"], rendered, atol=1e-5, rtol=0)
  # The samples move away from the reference by more than the tolerance (measured 3.8e-4).
  assert np.abs(codes - code[:, None]).max() > 1e-4
