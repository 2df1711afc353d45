"""fdjax.diffusion against diffusers' PyTorch DDPMScheduler / DDIMScheduler (1e-6).

Schedules are compared as diffusers builds them (float32) with ours (float64). The steps and
loops run both sides in float64 on the same alpha-bar (diffusers' arrays replaced by ours, which
the schedule tests pin), so that they compare the step arithmetic and not float32 rounding of
alpha-bar, whose relative error near t = N - 1 is amplified by 1 / sqrt(alpha-bar).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers.training_utils import compute_snr

from fdjax import diffusion

TOLERANCE = dict(rtol=0, atol=1e-6)
BETAS = {
  "linear": dict(beta_start=1e-4, beta_end=0.02),
  "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
  "squaredcos_cap_v2": {},
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SHAPE = (2, 5, 3)  # [B, T, D]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _schedule(kind, n=1000):
  return diffusion.make_schedule(kind, n, **BETAS[kind])


def _float64(scheduler, schedule, set_alpha_to_one=True):
  """The diffusers scheduler computing in float64 on our alpha-bar."""
  scheduler.betas = torch.from_numpy(schedule.betas)
  scheduler.alphas = torch.from_numpy(schedule.alphas)
  scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  if isinstance(scheduler, DDIMScheduler):
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    scheduler.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
  return scheduler


def _ddpm(kind, n=1000, **config):
  schedule = _schedule(kind, n)
  scheduler = DDPMScheduler(num_train_timesteps=n, beta_schedule=kind, **BETAS[kind], **config)
  return schedule, _float64(scheduler, schedule)


def _ddim(kind, n=1000, **config):
  schedule = _schedule(kind, n)
  scheduler = DDIMScheduler(num_train_timesteps=n, beta_schedule=kind, **BETAS[kind], **config)
  return schedule, _float64(scheduler, schedule, config.get("set_alpha_to_one", True))


def _normal(seed, shape=SHAPE, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def _torch(x):
  return torch.from_numpy(np.array(x, np.float64))


class _PatchedNoise:
  """diffusers' DDPMScheduler draws its variance noise itself: hand it ours instead."""

  def __init__(self, monkeypatch):
    self.noise = None
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: _torch(self.noise))


# ---------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("kind", list(BETAS))
def test_schedule_arrays_match_diffusers(kind):
  schedule = _schedule(kind)
  for scheduler_class in (DDPMScheduler, DDIMScheduler):
    reference = scheduler_class(num_train_timesteps=1000, beta_schedule=kind, **BETAS[kind])
    np.testing.assert_allclose(schedule.betas, reference.betas.double().numpy(), **TOLERANCE)
    np.testing.assert_allclose(schedule.alphas, reference.alphas.double().numpy(), **TOLERANCE)
    np.testing.assert_allclose(
      schedule.alphas_cumprod, reference.alphas_cumprod.double().numpy(), **TOLERANCE
    )


@pytest.mark.parametrize("kind", ["scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_rescaling_matches_diffusers(kind):
  schedule = diffusion.make_schedule(kind, 1000, **BETAS[kind], zero_terminal_snr=True)
  # diffusers' own function, in float64 on the same betas.
  betas = diffusion.beta_schedule(kind, 1000, **BETAS[kind])
  expected = scheduling_ddpm.rescale_zero_terminal_snr(_torch(betas)).numpy()
  np.testing.assert_allclose(schedule.betas, expected, rtol=0, atol=1e-12)
  # And the scheduler's float32 alpha-bar (its betas round to float32 before the cumprod).
  reference = DDPMScheduler(
    num_train_timesteps=1000, beta_schedule=kind, rescale_betas_zero_snr=True, **BETAS[kind]
  )
  np.testing.assert_allclose(
    schedule.alphas_cumprod, reference.alphas_cumprod.double().numpy(), **TOLERANCE
  )
  assert schedule.alphas_cumprod[-1] == 0.0  # x_T is pure noise
  # Min-SNR weights stay finite at SNR 0.
  weights = diffusion.min_snr_weight(schedule, jnp.asarray([0, 999]), "epsilon", 5.0)
  assert bool(jnp.all(jnp.isfinite(weights))) and float(weights[1]) == 1.0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n,steps", [(1000, 10), (1000, 50), (1000, 30), (500, 20), (500, 500)])
def test_inference_timesteps_match_diffusers_set_timesteps(spacing, n, steps):
  for offset in (0, 1) if spacing == "leading" else (0,):
    for scheduler_class in (DDPMScheduler, DDIMScheduler):
      reference = scheduler_class(
        num_train_timesteps=n, timestep_spacing=spacing, steps_offset=offset
      )
      reference.set_timesteps(steps)
      if reference.timesteps.max() >= n:  # diffusers would index past the schedule
        with pytest.raises(ValueError, match="past"):
          diffusion.inference_timesteps(n, steps, spacing, offset)
        continue
      ours = diffusion.inference_timesteps(n, steps, spacing, offset)
      np.testing.assert_array_equal(ours, reference.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_respaced_betas_are_the_betas_of_diffusers_respaced_ddpm_steps(spacing):
  schedule, reference = _ddpm("squaredcos_cap_v2", timestep_spacing=spacing)
  reference.set_timesteps(25)
  timesteps = reference.timesteps.numpy()
  respaced = diffusion.respace(schedule, timesteps)
  expected = [
    1
    - float(reference.alphas_cumprod[t])
    / (float(reference.alphas_cumprod[p]) if (p := reference.previous_timestep(t)) >= 0 else 1.0)
    for t in timesteps
  ]
  np.testing.assert_allclose(respaced.betas, np.array(expected[::-1]), **TOLERANCE)
  np.testing.assert_allclose(respaced.alphas_cumprod, np.cumprod(1 - respaced.betas), **TOLERANCE)


def test_ddpm_on_the_respaced_chain_equals_ddpm_over_the_timestep_subset(x64):
  schedule = _schedule("linear")
  timesteps = diffusion.inference_timesteps(1000, 8, "trailing")
  respaced = diffusion.respace(schedule, timesteps)
  sampler = diffusion.Sampler(method="ddpm", variance_type="fixed_small")
  x_full = x_respaced = jnp.asarray(_normal(0))
  for k, (t, t_prev) in enumerate(zip(timesteps, np.append(timesteps[1:], -1))):
    prediction, noise = jnp.asarray(_normal(10 + k)), jnp.asarray(_normal(20 + k))
    x_full, _ = diffusion.ddpm_step(
      sampler, schedule, prediction, x_full, t, t_prev, noise, prediction_type="epsilon"
    )
    index = len(timesteps) - 1 - k  # the respaced chain's own timestep
    # The respaced chain's last step (index 0) adds no noise, as DDPM's t = 0 step does not.
    if index == 0:
      noise = jnp.zeros_like(noise)
    x_respaced, _ = diffusion.ddpm_step(
      sampler, respaced, prediction, x_respaced, index, index - 1, noise, prediction_type="epsilon"
    )
  np.testing.assert_allclose(x_respaced, x_full, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Prediction targets and the training objective


@pytest.mark.parametrize("source", PREDICTION_TYPES)
@pytest.mark.parametrize("target", PREDICTION_TYPES)
def test_prediction_conversions_are_consistent(x64, source, target):
  schedule = _schedule("scaled_linear")
  sample, noise = jnp.asarray(_normal(0)), jnp.asarray(_normal(1))
  t = jnp.array([3, 777])
  exact = {
    "epsilon": noise,
    "sample": sample,
    "v_prediction": diffusion.velocity(schedule, sample, noise, t),
  }
  x_t = diffusion.add_noise(schedule, sample, noise, t)
  converted = diffusion.convert_prediction(
    schedule, exact[source], x_t, t, source=source, target=target
  )
  np.testing.assert_allclose(converted, exact[target], rtol=0, atol=1e-9)
  np.testing.assert_allclose(
    diffusion.to_sample(schedule, exact[source], x_t, t, source), sample, rtol=0, atol=1e-9
  )
  np.testing.assert_allclose(
    diffusion.to_epsilon(schedule, exact[source], x_t, t, source), noise, rtol=0, atol=1e-9
  )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_targets_match_diffusers_add_noise_and_get_velocity(x64, prediction_type):
  schedule, reference = _ddpm("squaredcos_cap_v2")
  sample = jnp.asarray(_normal(0, (4, 6, 3)))
  batch = diffusion.noise_batch(
    jax.random.key(0), schedule, sample, prediction_type=prediction_type, min_snr_gamma=5.0
  )
  assert batch.timesteps.shape == (4,) and batch.noise.shape == sample.shape
  t = torch.from_numpy(np.asarray(batch.timesteps, np.int64))
  x0, noise = _torch(sample), _torch(batch.noise)
  np.testing.assert_allclose(batch.noisy_sample, reference.add_noise(x0, noise, t), **TOLERANCE)
  expected = {"epsilon": noise, "sample": x0, "v_prediction": reference.get_velocity(x0, noise, t)}
  np.testing.assert_allclose(batch.target, expected[prediction_type], **TOLERANCE)
  # Min-SNR-gamma as diffusers' training scripts weight the loss of each prediction type.
  snr = compute_snr(reference, t).double()
  weight = torch.minimum(snr, torch.full_like(snr, 5.0))
  weight = {"epsilon": weight / snr, "sample": weight, "v_prediction": weight / (snr + 1)}
  np.testing.assert_allclose(batch.weight, weight[prediction_type], **TOLERANCE)


def test_noise_batch_samples_every_timestep_uniformly():
  schedule = _schedule("linear", n=10)
  batch = diffusion.noise_batch(
    jax.random.key(1), schedule, jnp.zeros((4000, 1, 1)), prediction_type="epsilon"
  )
  counts = np.bincount(np.asarray(batch.timesteps), minlength=10)
  assert counts.shape == (10,) and counts.min() > 300 and counts.max() < 500
  np.testing.assert_array_equal(batch.weight, 1.0)


@pytest.mark.parametrize("distance", ["l2", "l1", "huber"])
def test_denoising_loss_is_per_example_over_valid_frames_only(distance):
  prediction = jnp.asarray(_normal(0, (3, 6, 4, 2)), jnp.float32)
  target = jnp.asarray(_normal(1, (3, 6, 4, 2)), jnp.float32)
  lengths = np.array([6, 2, 4])
  mask = jnp.arange(6)[None] < lengths[:, None]  # [B, T]
  weight = jnp.array([1.0, 2.0, 0.5])
  loss = diffusion.denoising_loss(prediction, target, mask, weight, distance=distance)
  garbage = jnp.where(mask[..., None, None], prediction, 1e3)
  padded = diffusion.denoising_loss(garbage, target, mask, weight, distance=distance)
  np.testing.assert_allclose(padded, loss, rtol=1e-6)
  error = np.abs(np.asarray(prediction - target, np.float64))
  elementwise = {
    "l2": error**2,
    "l1": error,
    "huber": np.where(error < 1, 0.5 * error**2, error - 0.5),
  }[distance]
  expected = [elementwise[b, : lengths[b]].mean() * weight[b] for b in range(3)]
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# One step


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])  # the last step at t = 0 / t > 0
def test_ddpm_step_matches_diffusers(x64, monkeypatch, prediction_type, variance_type, spacing):
  schedule, reference = _ddpm(
    "linear", prediction_type=prediction_type, variance_type=variance_type, clip_sample=True,
    timestep_spacing=spacing,
  )  # fmt: skip
  reference.set_timesteps(20)
  patched = _PatchedNoise(monkeypatch)
  sampler = diffusion.Sampler(method="ddpm", variance_type=variance_type, clip_sample_range=1.0)
  x_t, prediction = _normal(0), _normal(1)
  timesteps = reference.timesteps.numpy()
  for i in (0, 7, len(timesteps) - 1):  # the first, a middle and the last (t = 0) step
    patched.noise = _normal(2 + i)
    t, t_prev = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    expected = reference.step(_torch(prediction), int(t), _torch(x_t))
    x_prev, x_0 = diffusion.ddpm_step(
      sampler, schedule, jnp.asarray(prediction), jnp.asarray(x_t), t, t_prev,
      jnp.asarray(patched.noise), prediction_type=prediction_type,
    )  # fmt: skip
    np.testing.assert_allclose(x_prev, expected.prev_sample, **TOLERANCE)
    np.testing.assert_allclose(x_0, expected.pred_original_sample, **TOLERANCE)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_step_matches_diffusers(x64, prediction_type, eta):
  schedule, reference = _ddim("scaled_linear", prediction_type=prediction_type, clip_sample=False)
  reference.set_timesteps(10)
  sampler = diffusion.Sampler(method="ddim", eta=eta)
  x_t, prediction = _normal(0), _normal(1)
  timesteps = reference.timesteps.numpy()
  for i in (0, 4, len(timesteps) - 1):
    noise = _normal(2 + i)
    t, t_prev = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    expected = reference.step(
      _torch(prediction), int(t), _torch(x_t), eta=eta, variance_noise=_torch(noise)
    )
    x_prev, x_0 = diffusion.ddim_step(
      sampler, schedule, jnp.asarray(prediction), jnp.asarray(x_t), t, t_prev,
      jnp.asarray(noise), prediction_type=prediction_type,
    )  # fmt: skip
    np.testing.assert_allclose(x_prev, expected.prev_sample, **TOLERANCE)
    np.testing.assert_allclose(x_0, expected.pred_original_sample, **TOLERANCE)


@pytest.mark.parametrize(
  "config",
  [
    dict(clip_sample=True, clip_sample_range=0.8, use_clipped_model_output=True),
    dict(clip_sample=True, clip_sample_range=0.8, set_alpha_to_one=False),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
  ],
)
def test_ddim_clipping_thresholding_and_final_alpha_match_diffusers(x64, config):
  scheduler_config = {k: v for k, v in config.items() if k != "use_clipped_model_output"}
  schedule, reference = _ddim("squaredcos_cap_v2", prediction_type="sample", **scheduler_config)
  reference.set_timesteps(10)
  sampler = diffusion.Sampler(
    method="ddim",
    eta=0.5,
    clip_sample_range=config.get("clip_sample_range") if config.get("clip_sample") else None,
    **{k: v for k, v in config.items() if k not in ("clip_sample", "clip_sample_range")},
  )
  x_t, prediction = _normal(0), _normal(1, scale=2.0)  # |x_0| > 1: clipping is active
  timesteps = reference.timesteps.numpy()
  for i in (3, len(timesteps) - 1):
    noise = _normal(2 + i)
    t, t_prev = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    expected = reference.step(
      _torch(prediction), int(t), _torch(x_t), eta=0.5, variance_noise=_torch(noise),
      use_clipped_model_output=config.get("use_clipped_model_output", False),
    )  # fmt: skip
    x_prev, x_0 = diffusion.ddim_step(
      sampler, schedule, jnp.asarray(prediction), jnp.asarray(x_t), t, t_prev,
      jnp.asarray(noise), prediction_type="sample",
    )  # fmt: skip
    np.testing.assert_allclose(x_prev, expected.prev_sample, **TOLERANCE)
    np.testing.assert_allclose(x_0, expected.pred_original_sample, **TOLERANCE)


def test_dynamic_thresholding_matches_diffusers_in_a_ddpm_step(x64, monkeypatch):
  config = dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.7)
  schedule, reference = _ddpm("linear", prediction_type="sample", **config)
  reference.set_timesteps(20)
  patched = _PatchedNoise(monkeypatch)
  patched.noise = _normal(2)
  x_t, prediction = _normal(0), _normal(1, scale=[[[0.5]], [[3.0]]])  # s = 1 and s > 1
  t, t_prev = reference.timesteps.numpy()[5:7]
  expected = reference.step(_torch(prediction), int(t), _torch(x_t))
  sampler = diffusion.Sampler(method="ddpm", **config)
  x_prev, x_0 = diffusion.ddpm_step(
    sampler, schedule, jnp.asarray(prediction), jnp.asarray(x_t), t, t_prev,
    jnp.asarray(patched.noise), prediction_type="sample",
  )  # fmt: skip
  np.testing.assert_allclose(x_0, expected.pred_original_sample, **TOLERANCE)
  np.testing.assert_allclose(x_prev, expected.prev_sample, **TOLERANCE)
  assert np.abs(np.asarray(x_0[1])).max() == pytest.approx(1.0)  # thresholded, then divided


# ---------------------------------------------------------------------------------------------
# Full sampling loops


def _toy_denoiser_jax(x, t):
  """A smooth deterministic stand-in for a trained model ([B, T, D], [B] -> [B, T, D])."""
  phase = (t.astype(x.dtype) / 1000.0)[:, None, None]
  return 0.9 * jnp.tanh(0.7 * x + phase) + 0.05 * x[..., ::-1] - 0.2 * phase


def _toy_denoiser_torch(x, t):
  phase = (t.double() / 1000.0)[:, None, None]
  return 0.9 * torch.tanh(0.7 * x + phase) + 0.05 * torch.flip(x, [-1]) - 0.2 * phase


LOOPS = [
  # (scheduler class, beta schedule, prediction type, steps, scheduler config, sampler config)
  (DDIMScheduler, "scaled_linear", "sample", 10, {}, dict(eta=0.0)),
  (DDIMScheduler, "linear", "epsilon", 10, dict(timestep_spacing="trailing"), dict(eta=1.0)),
  (DDIMScheduler, "squaredcos_cap_v2", "v_prediction", 10, dict(steps_offset=1), dict(eta=0.3)),
  (DDPMScheduler, "squaredcos_cap_v2", "sample", 20, {}, dict(variance_type="fixed_small")),
  (DDPMScheduler, "linear", "v_prediction", 20, dict(timestep_spacing="trailing"), dict(
    variance_type="fixed_large")),
]  # fmt: skip


@pytest.mark.parametrize("scheduler_class,kind,prediction_type,steps,config,sampler_config", LOOPS)
def test_sampling_loop_matches_diffusers(
  x64, monkeypatch, scheduler_class, kind, prediction_type, steps, config, sampler_config
):
  method = "ddim" if scheduler_class is DDIMScheduler else "ddpm"
  schedule = _schedule(kind)
  reference = _float64(
    scheduler_class(
      num_train_timesteps=1000, beta_schedule=kind, **BETAS[kind], clip_sample=True,
      prediction_type=prediction_type, **config, **({} if method == "ddim" else sampler_config),
    ),
    schedule,
  )  # fmt: skip
  reference.set_timesteps(steps)
  sampler = diffusion.Sampler(
    method=method, num_steps=steps, clip_sample_range=1.0, **config, **sampler_config
  )
  key, initial_noise = jax.random.key(3), _normal(0, (2, 7, 3))
  run = jax.jit(
    lambda schedule, x: diffusion.sample(
      sampler, schedule, _toy_denoiser_jax, x, key, prediction_type=prediction_type
    )
  )
  ours = run(schedule, jnp.asarray(initial_noise))

  patched = _PatchedNoise(monkeypatch)
  x = _torch(initial_noise)
  for i, t in enumerate(reference.timesteps):
    noise = np.asarray(diffusion.step_noise(key, i, x.shape, jnp.float64))
    patched.noise = noise
    prediction = _toy_denoiser_torch(x, t.expand(x.shape[0]))
    if method == "ddim":
      x = reference.step(
        prediction, t, x, eta=sampler.eta, variance_noise=_torch(noise)
      ).prev_sample
    else:
      x = reference.step(prediction, t, x).prev_sample
  np.testing.assert_allclose(ours, x, **TOLERANCE)
  assert np.abs(np.asarray(ours) - initial_noise).max() > 0.1  # the loop did something


def test_sampler_is_one_scan_over_the_steps():
  schedule = _schedule("linear")
  for sampler in (
    diffusion.Sampler(method="ddim", num_steps=7),
    diffusion.Sampler(method="ddpm", num_steps=9),
  ):
    jaxpr = jax.make_jaxpr(
      lambda x, key, sampler=sampler: diffusion.sample(
        sampler, schedule, _toy_denoiser_jax, x, key, prediction_type="epsilon"
      )
    )(jnp.zeros(SHAPE), jax.random.key(0))
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == sampler.num_steps
    assert all(eqn.primitive.name != "while" for eqn in jaxpr.eqns)


@pytest.mark.parametrize("method,steps", [("ddpm", 1000), ("ddim", 50)])
def test_float32_sampling_stays_close_to_float64(method, steps):
  schedule = _schedule("squaredcos_cap_v2")
  sampler = diffusion.Sampler(method=method, num_steps=steps, eta=0.5, clip_sample_range=1.0)
  initial_noise = _normal(0, (2, 7, 3))

  def run(x):
    return jax.jit(
      lambda x: diffusion.sample(
        sampler, schedule, _toy_denoiser_jax, x, jax.random.key(0), prediction_type="sample"
      )
    )(x)

  single = run(jnp.asarray(initial_noise, jnp.float32))
  with jax.enable_x64(True):
    double = run(jnp.asarray(initial_noise))
  assert single.dtype == jnp.float32 and double.dtype == jnp.float64
  np.testing.assert_allclose(single, double, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


NULLS = {"audio": jnp.array([0.3, -0.2]), "style": jnp.array([0.0, 1.0, 0.5])}


def _conditions():
  return {
    "audio": jnp.asarray(_normal(5, (2, 5, 2)), jnp.float32),  # [B, T, D_audio]
    "style": jnp.asarray(_normal(6, (2, 3)), jnp.float32),  # [B, D_style]
    "template": jnp.asarray(_normal(7, (2, 3)), jnp.float32),  # never dropped
  }


def _conditional_model(x, t, conditions):
  """Nonlinear in every condition, so that no composition rule is exact by accident."""
  audio = jnp.tanh(conditions["audio"].sum(-1, keepdims=True) + x)  # [B, T, D]
  style = jnp.sin(conditions["style"] + conditions["template"])[:, None, :]  # [B, 1, D]
  return audio * style + 0.01 * t[:, None, None] + x * jnp.cos(conditions["audio"][..., :1])


def _model_given(kept, x, t):
  conditions = dict(_conditions())
  for name in ("audio", "style"):
    if name not in kept:
      conditions[name] = jnp.broadcast_to(NULLS[name], conditions[name].shape)
  return _conditional_model(x, t, conditions)


@pytest.mark.parametrize("rule", ["sequential", "independent"])
@pytest.mark.parametrize("batch_subsets", [True, False])
def test_guidance_scale_zero_is_unconditional_and_one_is_conditional_per_condition(
  rule, batch_subsets
):
  guidance = diffusion.Guidance(
    conditions=("audio", "style"), scales=(1.15, 3.0), rule=rule, batch_subsets=batch_subsets
  )
  x, t = jnp.asarray(_normal(8), jnp.float32), jnp.array([10, 500])

  def guided(scales):
    fn = diffusion.guided_denoise_fn(guidance, _conditional_model, _conditions(), NULLS, scales)
    return fn(x, t)

  unconditional = _model_given((), x, t)
  np.testing.assert_allclose(guided([0.0, 0.0]), unconditional, rtol=0, atol=1e-6)
  for k, name in enumerate(guidance.conditions):
    if rule == "sequential":  # condition k given the ones before it: scales 1 up to k
      scales, kept = [1.0 if j <= k else 0.0 for j in range(2)], guidance.conditions[: k + 1]
    else:  # condition k alone
      scales, kept = [1.0 if j == k else 0.0 for j in range(2)], (name,)
    np.testing.assert_allclose(guided(scales), _model_given(kept, x, t), rtol=0, atol=1e-6)
    # Its scale 0 removes its term: the prediction without it (other scales as above).
    without = [s if j != k else 0.0 for j, s in enumerate(scales)]
    reference = (_model_given(guidance.conditions[:k], x, t) if rule == "sequential"
                 else unconditional)  # fmt: skip
    np.testing.assert_allclose(guided(without), reference, rtol=0, atol=1e-6)
  # Default scales extrapolate: p_0 + 1.15 (p_audio - p_0) + 3 (p_full - p_audio) (sequential).
  p_audio = _model_given(("audio",), x, t)
  p_second = _model_given(("audio", "style") if rule == "sequential" else ("style",), x, t)
  second_reference = p_audio if rule == "sequential" else unconditional
  expected = unconditional + 1.15 * (p_audio - unconditional) + 3.0 * (p_second - second_reference)
  np.testing.assert_allclose(guided(None), expected, rtol=1e-5, atol=1e-5)


def test_guided_sampling_runs_inside_the_scan_with_scales_as_inputs():
  guidance = diffusion.Guidance(conditions=("audio", "style"), scales=(1.0, 1.0))
  schedule = _schedule("squaredcos_cap_v2", 100)
  sampler = diffusion.Sampler(method="ddim", num_steps=5)
  key, initial_noise = jax.random.key(0), jnp.asarray(_normal(9), jnp.float32)

  @jax.jit
  def guided_sample(scales):
    fn = diffusion.guided_denoise_fn(guidance, _conditional_model, _conditions(), NULLS, scales)
    return diffusion.sample(sampler, schedule, fn, initial_noise, key, prediction_type="sample")

  conditional = diffusion.sample(
    sampler, schedule, lambda x, t: _conditional_model(x, t, _conditions()), initial_noise, key,
    prediction_type="sample",
  )  # fmt: skip
  np.testing.assert_allclose(guided_sample(jnp.array([1.0, 1.0])), conditional, atol=1e-5)
  stronger = guided_sample(jnp.array([1.0, 3.0]))
  assert np.abs(np.asarray(stronger - conditional)).max() > 1e-3


def test_drop_conditions_replaces_each_condition_independently_with_its_own_rate():
  batch = 4000
  conditions = {
    "audio": jnp.ones((batch, 3, 2)),
    "style": jnp.ones((batch, 3)),
    "template": jnp.ones((batch, 3)),
  }
  guidance = diffusion.Guidance(conditions=("audio", "style"), drop_probabilities=(0.1, 0.45))
  dropped = diffusion.drop_conditions(guidance, jax.random.key(0), conditions, NULLS)
  audio_dropped = np.all(np.asarray(dropped["audio"]) == np.asarray(NULLS["audio"]), axis=(1, 2))
  style_dropped = np.all(np.asarray(dropped["style"]) == np.asarray(NULLS["style"]), axis=1)
  assert np.all(audio_dropped | np.all(np.asarray(dropped["audio"]) == 1.0, axis=(1, 2)))
  assert abs(audio_dropped.mean() - 0.1) < 0.02 and abs(style_dropped.mean() - 0.45) < 0.03
  assert abs((audio_dropped & style_dropped).mean() - 0.1 * 0.45) < 0.015  # independent
  np.testing.assert_array_equal(dropped["template"], conditions["template"])
  never = diffusion.Guidance(conditions=("audio", "style"), drop_probabilities=(0.0, 1.0))
  dropped = diffusion.drop_conditions(never, jax.random.key(1), conditions, NULLS)
  np.testing.assert_array_equal(dropped["audio"], conditions["audio"])
  np.testing.assert_array_equal(dropped["style"], jnp.broadcast_to(NULLS["style"], (batch, 3)))


@pytest.mark.parametrize(
  "method,eta,prediction_type,per_example_keys",
  [
    ("ddim", 0.0, "sample", False),
    ("ddim", 0.7, "epsilon", True),  # noise in the chain (as DDPM's), one key per example
  ],
)
def test_sampling_in_the_projection_equals_sampling_x_t(
  x64, method, eta, prediction_type, per_example_keys
):
  """A denoiser that reads x_t [.., F] through a linear map to D and predicts through another
  from H: the chain on the projection gives the same x_0 as the chain on x_t (float64)."""
  rng = np.random.default_rng(0)
  features, width, hidden = 12, 3, 4
  project_in = jnp.asarray(rng.normal(size=(features, width)) / 3)
  project_out = jnp.asarray(rng.normal(size=(hidden, features)) / 2)
  out_bias = jnp.asarray(rng.normal(size=(features,)))
  mixing = jnp.asarray(rng.normal(size=(width, hidden)))

  def hidden_fn(z, t):
    return jnp.tanh(z @ mixing + t[:, None, None] / 1000.0)

  def denoise_fn(x_t, t):
    return hidden_fn(x_t @ project_in, t) @ project_out + out_bias

  sampler = diffusion.Sampler(method=method, num_steps=20, eta=eta)
  schedule = _schedule("squaredcos_cap_v2")
  initial = jnp.asarray(rng.normal(size=(2, 5, features)))
  key = jax.random.key(3)
  if per_example_keys:
    key = jax.vmap(jax.random.key)(jnp.asarray([3, 4]))
  direct = diffusion.sample(
    sampler, schedule, denoise_fn, initial, key, prediction_type=prediction_type
  )
  projected = diffusion.sample_projected(
    sampler,
    schedule,
    hidden_fn,
    initial,
    key,
    prediction_type=prediction_type,
    project_in=project_in,
    project_out=project_out,
    out_bias=out_bias,
  )
  assert float(jnp.abs(direct - initial).max()) > 0.1  # the chain moved
  np.testing.assert_allclose(projected, direct, rtol=0, atol=1e-9)
  if per_example_keys:  # example 1 alone, with its own key, is example 1 of the batch
    alone = diffusion.sample(
      sampler, schedule, denoise_fn, initial[1:], key[1:], prediction_type=prediction_type
    )
    np.testing.assert_allclose(alone[0], direct[1], rtol=0, atol=1e-12)
