"""The face_motion_ae task (stage 1 of the talking-head line): the model's API and its pieces
(warping against scipy, orthonormal motion directions, relative codes), the loss's terms and
the adversarial parts' gradients, training pairs, the 64 / 128 px configs, and a short run on
the HDTF tiny twin that lowers the loss, evaluates and loads back through `load(workdir)`."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from fdjax import config as config_lib
from fdjax.models import face_motion
from fdjax.models.face_motion import FaceMotionAE
from fdjax.tasks import face_motion_ae, load_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENT = os.path.join(ROOT, "experiments", "talking_head", "hdtf.py")


def _config(arg: str = "runlocal=True", *overrides):
  return config_lib.load_config(
    f"{EXPERIMENT}:stage=motion_ae,{arg}", [("compilation_cache_dir", ""), *overrides]
  )


def _init(config, seed=0):
  model = face_motion_ae.build_model(config)
  batch = face_motion_ae.dummy_batch(config, 2)
  variables = jax.jit(lambda r: face_motion_ae.init_fn(model, {"params": r}, batch))(
    jax.random.key(seed)
  )
  return model, nn.meta.unbox(variables)["params"]


def _frames(batch=2, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def test_the_task_fits_the_contract():
  task = load_task("face_motion_ae")
  for hook in ("evaluate", "flops_per_example", "init_fn"):
    assert task.has(hook)


def test_warp_samples_bilinearly_like_scipy_and_a_zero_flow_keeps_the_pixels():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  zero = jnp.zeros((2, 9, 11, 2))
  np.testing.assert_array_equal(face_motion.warp(jnp.asarray(features), zero), features)
  flow = rng.uniform(-0.3, 0.3, size=(2, 9, 11, 2)).astype(np.float32)
  out = np.asarray(face_motion.warp(jnp.asarray(features), jnp.asarray(flow)))
  # Pixel coordinates of the sampling points, clamped to the image as `warp` does.
  x = np.clip(np.arange(11)[None, None] + flow[..., 0] * 11 / 2, 0, 10)
  y = np.clip(np.arange(9)[None, :, None] + flow[..., 1] * 9 / 2, 0, 8)
  for b in range(2):
    for c in range(3):
      expected = scipy.ndimage.map_coordinates(features[b, ..., c], [y[b], x[b]], order=1)
      np.testing.assert_allclose(out[b, ..., c], expected, atol=1e-5)


def test_motion_directions_are_orthonormal_so_a_code_keeps_its_length():
  module = face_motion.MotionDirections(latent_dim=16, motion_dim=5)
  params = module.init(jax.random.key(0), jnp.zeros((1, 5)))
  code = jax.random.normal(jax.random.key(1), (4, 5))
  displacement = module.apply(params, code)
  assert displacement.shape == (4, 16)
  np.testing.assert_allclose(
    np.linalg.norm(displacement, axis=-1), np.linalg.norm(code, axis=-1), rtol=1e-5
  )
  basis = module.apply(params, jnp.eye(5))  # [D, L]: the directions
  np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-5)


def test_relative_codes_add_the_drivers_motion_to_the_portraits_code():
  portrait = jnp.asarray([[1.0, 2.0]])
  driving = jnp.asarray([[[5.0, 5.0], [6.0, 4.0], [5.5, 7.0]]])
  out = face_motion.relative_codes(portrait, driving)
  np.testing.assert_allclose(out, [[[1.0, 2.0], [2.0, 1.0], [1.5, 4.0]]])


def test_the_model_api_encodes_and_decodes_and_starts_near_the_source():
  config = _config("runlocal=True", ("model.image_mask_bias", 2.0))  # the model's default
  model, params = _init(config)
  source = jnp.asarray(_frames(size=32), jnp.float32) / 255.0
  variables = {"params": params}

  @jax.jit
  def roundtrip(variables, source):
    appearance = model.apply(variables, source, method=FaceMotionAE.encode_appearance)
    code = model.apply(variables, source, method=FaceMotionAE.encode_motion)
    return code, model.apply(variables, appearance, code, method=FaceMotionAE.decode)

  code, image = roundtrip(variables, source)
  assert code.shape == (2, 20)
  assert image.shape == source.shape
  # The flows start at zero and the last mask at sigmoid(2): mostly the unwarped source.
  share = float(jax.nn.sigmoid(2.0))
  assert float(jnp.max(jnp.abs(image - source))) <= 1 - share + 1e-5
  with pytest.raises(ValueError, match=r"image must be \[B, 32, 32, 3\]"):
    model.apply(variables, source[:, :16], method=FaceMotionAE.encode_appearance)


@pytest.mark.parametrize("bias", [2.0, 0.0, -1.0])
def test_the_last_mask_starts_at_the_configured_bias(bias):
  # model.image_mask_bias: the initial logit of the blend of warped source and generated image.
  config = _config("runlocal=True", ("model.image_mask_bias", bias))
  model, params = _init(config)
  source = jnp.asarray(_frames(size=32), jnp.float32) / 255.0
  _, aux = model.apply({"params": params}, source, source)
  np.testing.assert_allclose(np.asarray(aux["mask"]), float(jax.nn.sigmoid(bias)), rtol=1e-6)


def test_the_loss_is_multiscale_l1_plus_ssim_and_the_adversarial_parts_stop_gradients():
  config = _config()
  model, params = _init(config)
  batch = {"source": _frames(seed=1), "driving": _frames(seed=2)}
  loss_fn = face_motion_ae.make_loss_fn(config)
  loss, aux = jax.jit(lambda p, b: loss_fn(model, p, b, jax.random.key(0), True))(params, batch)
  apply = jax.jit(lambda p, s, d: model.apply({"params": p}, s, d)[0])
  prediction = apply(
    params,
    jnp.asarray(batch["source"], jnp.float32) / 255,
    jnp.asarray(batch["driving"], jnp.float32) / 255,
  )
  p, t = np.asarray(prediction), batch["driving"].astype(np.float32) / 255
  pool = lambda x, f: x.reshape(2, 32 // f, f, 32 // f, f, 3).mean(axis=(2, 4))
  l1 = np.mean([np.mean(np.abs(pool(p, f) - pool(t, f))) for f in (1, 2, 4)])
  np.testing.assert_allclose(aux["l1_loss"], l1, rtol=1e-5)
  expected = l1 + 0.5 * (1 - aux["ssim"]) + 0.01 * aux["generator_loss"]
  np.testing.assert_allclose(loss, expected + aux["discriminator_loss"], rtol=1e-5)

  fake, real = prediction, jnp.asarray(t)

  def part(params, which):
    generator, discriminator = face_motion_ae.adversarial_losses(model, params, fake, real)
    return generator if which == "generator" else discriminator

  grads = jax.jit(jax.grad(part), static_argnums=1)(params, "generator")
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["discriminator"]))
  grads = jax.jit(
    jax.grad(
      lambda p: face_motion_ae.adversarial_losses(
        model, p, model.apply({"params": p}, real, real)[0], real
      )[1]
    )
  )(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["generator"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["discriminator"]))


def test_within_clip_correlations_ignore_each_clips_offset():
  rng = np.random.default_rng(0)
  truth = rng.standard_normal(12)
  # Segments of 5, 4 and 3 frames: the estimate follows each, shifted by its own large offset,
  # so the pooled correlation is low and the within-segment one is the mean of numpy's.
  offsets = np.repeat([10.0, -10.0, 3.0], [5, 4, 3])
  estimate = truth + 0.5 * rng.standard_normal(12) + offsets
  bounds = [(0, 5), (5, 9), (9, 12)]
  expected = np.mean([np.corrcoef(estimate[a:b], truth[a:b])[0, 1] for a, b in bounds])
  within = face_motion_ae._mean_within(estimate, truth, [5, 4, 3])
  assert within == pytest.approx(expected, abs=1e-12)
  assert abs(np.corrcoef(estimate, truth)[0, 1]) < 0.5 < within
  # A constant segment has no correlation and is left out.
  flat = np.concatenate([estimate[:9], np.ones(3)])
  assert face_motion_ae._mean_within(flat, truth, [5, 4, 3]) == pytest.approx(
    np.mean([np.corrcoef(estimate[a:b], truth[a:b])[0, 1] for a, b in bounds[:2]]), abs=1e-12
  )


def test_a_training_pair_is_two_distinct_frames_of_one_clip_flipped_together():
  video = np.stack([np.full((16, 16, 3), 10 * i, np.uint8) for i in range(6)])
  video[:, :, :8] += 1  # left half brighter, to see the flip
  seen = set()
  for seed in range(20):
    pair = face_motion_ae.pair_transform(
      {"video": video}, np.random.default_rng(seed), image_size=8, flip_prob=0.5
    )
    s, d = int(pair["source"][0, 4, 0]) // 10, int(pair["driving"][0, 4, 0]) // 10
    assert s != d
    flipped = pair["source"][0, 0, 0] < pair["source"][0, -1, 0]
    assert flipped == (pair["driving"][0, 0, 0] < pair["driving"][0, -1, 0])
    seen.add(flipped)
  assert seen == {True, False}


@pytest.mark.parametrize("size, scales", [(64, 3), (128, 4)])
def test_the_64_and_128_px_configs_build_and_count_their_flops(size, scales):
  config = _config(f"size={size},runlocal=False")
  model = face_motion_ae.build_model(config)
  assert model.image_size == size and len(model.widths) == scales
  assert face_motion_ae.flops_per_example(config) > 0


def test_flops_grow_with_the_discriminator():
  with_gan = face_motion_ae.flops_per_example(_config())
  without = face_motion_ae.flops_per_example(
    _config("runlocal=True", ("loss.adversarial_weight", 0.0))
  )
  assert with_gan > without > 0


def test_a_short_run_on_the_tiny_twin_lowers_the_loss_evaluates_and_loads(tmp_path):
  """HDTF tiny twin -> pairs -> tiny model -> L1 + SSIM + PatchGAN -> evaluation (reconstruction
  against repeating the source, reenactment probes) -> `load` gives the trained parameters."""
  from fdjax import trainer

  config = _config(
    "runlocal=True,steps=24",
    ("optim.lr", 3e-3),
    ("ema.decay", 0.9),
    ("workdir", str(tmp_path)),
  )
  result = trainer.train_and_evaluate(config, str(tmp_path))
  import json

  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  l1 = [r["l1_loss"] for r in rows if r["split"] == "train"]
  assert np.mean(l1[-4:]) < np.mean(l1[:4]), l1
  metrics = result.eval_metrics
  for key in ("psnr", "ssim", "repeat_source_psnr", "repeat_source_ssim", "psnr_gain"):
    assert np.isfinite(metrics[key]), key
  assert metrics["psnr_gain"] == pytest.approx(metrics["psnr"] - metrics["repeat_source_psnr"])
  assert metrics["num_clips"] == 2  # the tiny twin's test split: 2 identities, a clip each
  reenactment = ("identity_portrait_accuracy", "identity_driver_share", "mouth_correlation")
  for key in (
    *reenactment,
    "mouth_pair_correlation",
    "mouth_probe_real_pair_correlation",
    "reconstruction_mouth_correlation",
    "reconstruction_mouth_clip_correlation",
    "mouth_probe_real_correlation",
  ):
    assert key in metrics, key
  model, params, saved = face_motion_ae.load(str(tmp_path))
  assert saved.task == "face_motion_ae" and model.image_size == 32
  code = model.apply(
    {"params": params}, jnp.zeros((1, 32, 32, 3)), method=FaceMotionAE.encode_motion
  )
  assert code.shape == (1, 20)
