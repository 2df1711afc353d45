"""Diffusion for motion: noise schedules, prediction targets, the training objective, DDPM and
DDIM samplers, and classifier-free guidance with several conditions.

Pure functions over arrays; the denoisers in `fdjax/models/` are the `denoise_fn` the samplers
call. Semantics follow diffusers' `DDPMScheduler` / `DDIMScheduler` (tested against them);
design and deviations in docs/design.md section 16.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
GuidanceRule = Literal["sequential", "independent"]

# denoise_fn(x_t [B, ...], t [B] i32) -> the model's prediction [B, ...] of its prediction type.
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=("betas", "alphas_cumprod"), meta_fields=()
)
@dataclasses.dataclass(frozen=True)
class Schedule:
  """The forward process over the training timesteps 0 .. N - 1 (float64 numpy when built here;
  a pytree, so it may also be passed into jitted functions as an argument)."""

  betas: np.ndarray  # [N] noise variance added at each step
  alphas_cumprod: np.ndarray  # [N] alpha-bar: prod over s <= t of (1 - beta_s)

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def alphas(self) -> np.ndarray:
    return 1.0 - self.betas


def beta_schedule(
  kind: BetaSchedule,
  num_train_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  max_beta: float = 0.999,
) -> np.ndarray:
  """Betas [N] (float64) of a named schedule, as diffusers names them.

  linear: DDPM (Ho et al. 2020); scaled_linear: linear in sqrt(beta) (latent diffusion,
  DiffSpeaker); squaredcos_cap_v2: improved DDPM's cosine alpha-bar (Nichol & Dhariwal 2021,
  FaceDiffuser, DiffPoseTalk), each beta capped at `max_beta`; beta_start/end unused.
  """
  n = num_train_timesteps
  if kind == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if kind == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if kind == "squaredcos_cap_v2":

    def alpha_bar(t: float) -> float:
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
      [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
      dtype=np.float64,
    )
  raise ValueError(f"unknown beta schedule {kind!r}: linear, scaled_linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas rescaled so the last timestep's alpha-bar is exactly 0 (Lin et al. 2023, algorithm
  1; diffusers' `rescale_betas_zero_snr`): sqrt(alpha-bar) is shifted to end at 0 and scaled to
  keep its first value. Without it, x_T keeps a little signal (scaled_linear: sqrt(alpha-bar) =
  0.07 at T) that a denoiser learns to read, while sampling starts from pure noise."""
  root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = root[0], root[-1]
  root = (root - last) * first / (first - last)
  alphas_cumprod = root**2
  alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
  return 1.0 - alphas


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, dtype=np.float64)
  return Schedule(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def make_schedule(
  kind: BetaSchedule = "linear",
  num_train_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  *,
  zero_terminal_snr: bool = False,
) -> Schedule:
  """The named schedule; `zero_terminal_snr` rescales it (`rescale_zero_terminal_snr`)."""
  betas = beta_schedule(kind, num_train_timesteps, beta_start, beta_end)
  return schedule_from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)


def inference_timesteps(
  num_train_timesteps: int,
  num_steps: int,
  spacing: TimestepSpacing = "leading",
  steps_offset: int = 0,
) -> np.ndarray:
  """The timesteps [S] (descending) a sampler visits, as diffusers' `set_timesteps` spaces them
  (Lin et al. 2023, table 2): leading 0, k, 2k, ... (+ offset); trailing N - 1, N - 1 - k, ...;
  linspace rounds S points evenly over [0, N - 1]."""
  n, s = num_train_timesteps, num_steps
  if not 0 < s <= n:
    raise ValueError(f"num_steps must be in [1, {n}], got {s}")
  if spacing == "linspace":
    timesteps = np.linspace(0, n - 1, s).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    timesteps = (np.arange(s) * (n // s)).round()[::-1].astype(np.int64) + steps_offset
  elif spacing == "trailing":
    timesteps = np.round(np.arange(n, 0, -n / s)).astype(np.int64) - 1
  else:
    raise ValueError(f"unknown timestep spacing {spacing!r}: leading, trailing or linspace")
  if timesteps.max() >= n:
    raise ValueError(f"steps_offset={steps_offset} puts timesteps past {n - 1}")
  return timesteps


def respace(schedule: Schedule, timesteps: Sequence[int] | np.ndarray) -> Schedule:
  """The chain over a subset of the timesteps as a schedule of its own (improved DDPM's
  respacing): step k keeps alpha-bar of the k-th smallest timestep, so its beta is
  1 - alpha-bar[t_k] / alpha-bar[t_{k-1}]. A model trained on `schedule` is called with the
  original timesteps (`np.sort(timesteps)[k]` at step k)."""
  alphas_cumprod = schedule.alphas_cumprod[np.sort(np.asarray(timesteps))]
  previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
  return Schedule(betas=1.0 - alphas_cumprod / previous, alphas_cumprod=alphas_cumprod)


def _broadcast_to(values: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example (or scalar) coefficients [B] broadcast against x [B, ...] in x's dtype."""
  values = values.astype(x.dtype)
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _alpha_bar(schedule: Schedule, t: jax.Array, x: jax.Array) -> jax.Array:
  return _broadcast_to(jnp.asarray(schedule.alphas_cumprod)[t], x)


def signal_to_noise_ratio(schedule: Schedule, t: jax.Array) -> jax.Array:
  """alpha-bar / (1 - alpha-bar) at timesteps t (any shape)."""
  alpha_bar = jnp.asarray(schedule.alphas_cumprod)[t]
  return alpha_bar / (1.0 - alpha_bar)


def add_noise(schedule: Schedule, sample: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha-bar) x_0 + sqrt(1 - alpha-bar) noise; t is [B] or a scalar."""
  alpha_bar = _alpha_bar(schedule, t, sample)
  return jnp.sqrt(alpha_bar) * sample + jnp.sqrt(1.0 - alpha_bar) * noise


def velocity(schedule: Schedule, sample: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(alpha-bar) noise - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022)."""
  alpha_bar = _alpha_bar(schedule, t, sample)
  return jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * sample


def _sample_and_epsilon(
  prediction: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: PredictionType
) -> tuple[jax.Array, jax.Array]:
  """(x_0, noise) implied by a prediction of x_t at noise level alpha_bar."""
  signal, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
  if prediction_type == "epsilon":
    return (x_t - sigma * prediction) / signal, prediction
  if prediction_type == "sample":
    return prediction, (x_t - signal * prediction) / sigma
  if prediction_type == "v_prediction":
    return signal * x_t - sigma * prediction, signal * prediction + sigma * x_t
  raise ValueError(f"unknown prediction type {prediction_type!r}: epsilon, sample or v_prediction")


def convert_prediction(
  schedule: Schedule,
  prediction: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  source: PredictionType,
  target: PredictionType,
) -> jax.Array:
  """A prediction of one type (epsilon, sample = x_0, v) rewritten as another, given x_t, t."""
  alpha_bar = _alpha_bar(schedule, t, x_t)
  sample, noise = _sample_and_epsilon(prediction, x_t, alpha_bar, source)
  if target == "epsilon":
    return noise
  if target == "sample":
    return sample
  if target == "v_prediction":
    return jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * sample
  raise ValueError(f"unknown prediction type {target!r}: epsilon, sample or v_prediction")


def to_sample(schedule, prediction, x_t, t, prediction_type: PredictionType) -> jax.Array:
  """The x_0 a prediction implies."""
  return convert_prediction(schedule, prediction, x_t, t, source=prediction_type, target="sample")


def to_epsilon(schedule, prediction, x_t, t, prediction_type: PredictionType) -> jax.Array:
  """The noise a prediction implies."""
  return convert_prediction(schedule, prediction, x_t, t, source=prediction_type, target="epsilon")


# ---------------------------------------------------------------------------------------------
# Training objective


class NoisyBatch(NamedTuple):
  timesteps: jax.Array  # [B] i32, uniform over the training timesteps
  noise: jax.Array  # [B, T, ...] standard normal
  noisy_sample: jax.Array  # [B, T, ...] x_t, the denoiser's input
  target: jax.Array  # [B, T, ...] what the denoiser regresses to (its prediction type)
  weight: jax.Array  # [B] loss weight per example (min-SNR-gamma, or ones)


def min_snr_weight(
  schedule: Schedule, t: jax.Array, prediction_type: PredictionType, gamma: float
) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023) for a loss on the given prediction type:
  min(SNR, gamma) for x_0, divided by SNR for epsilon and by SNR + 1 for v (as the diffusers
  training scripts weight them)."""
  snr = signal_to_noise_ratio(schedule, t)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (a zero-terminal-SNR schedule's last timestep).
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction_type == "sample":
    return clipped
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  raise ValueError(f"unknown prediction type {prediction_type!r}: epsilon, sample or v_prediction")


def noise_batch(
  key: jax.Array,
  schedule: Schedule,
  sample: jax.Array,
  *,
  prediction_type: PredictionType,
  min_snr_gamma: float | None = None,
) -> NoisyBatch:
  """One draw of the forward process for clean samples x_0 [B, T, ...]: a timestep per example,
  noise, x_t, and the regression target of `prediction_type`."""
  timestep_key, noise_key = jax.random.split(key)
  batch = sample.shape[0]
  t = jax.random.randint(timestep_key, (batch,), 0, schedule.num_train_timesteps, jnp.int32)
  noise = jax.random.normal(noise_key, sample.shape, sample.dtype)
  noisy = add_noise(schedule, sample, noise, t)
  if prediction_type == "epsilon":
    target = noise
  elif prediction_type == "sample":
    target = sample
  elif prediction_type == "v_prediction":
    target = velocity(schedule, sample, noise, t)
  else:
    raise ValueError(f"unknown prediction type {prediction_type!r}")
  if min_snr_gamma is None:
    weight = jnp.ones((batch,), sample.dtype)
  else:
    weight = min_snr_weight(schedule, t, prediction_type, min_snr_gamma).astype(sample.dtype)
  return NoisyBatch(t, noise, noisy, target, weight)


def denoising_loss(
  prediction: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  weight: jax.Array | None = None,
  *,
  distance: Literal["l2", "l1", "huber"] = "l2",
  huber_delta: float = 1.0,
) -> jax.Array:
  """Per-example loss [B]: the distance per element, averaged over each frame's features, then
  over the valid frames of mask [B, T], times weight [B]. Padded frames count for nothing."""
  error = prediction - target
  if distance == "l2":
    elementwise = jnp.square(error)
  elif distance == "l1":
    elementwise = jnp.abs(error)
  elif distance == "huber":
    magnitude = jnp.abs(error)
    quadratic = jnp.minimum(magnitude, huber_delta)
    elementwise = 0.5 * jnp.square(quadratic) + huber_delta * (magnitude - quadratic)
  else:
    raise ValueError(f"unknown distance {distance!r}: l2, l1 or huber")
  mask = mask.astype(elementwise.dtype)
  per_frame = elementwise.reshape(mask.shape + (-1,)).mean(axis=-1)  # [B, T]
  loss = (per_frame * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)  # [B]
  return loss if weight is None else loss * weight


# ---------------------------------------------------------------------------------------------
# Samplers


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to sample: the method, the timesteps it visits, and what it does to each x_0 estimate.
  Names and defaults follow diffusers where they exist, except that clipping is off."""

  method: Literal["ddpm", "ddim"] = "ddim"  # ancestral DDPM or DDIM
  num_steps: int = 50  # denoising steps, a subset of the training timesteps
  timestep_spacing: TimestepSpacing = "leading"  # how the subset is chosen (inference_timesteps)
  steps_offset: int = 0  # added to "leading" timesteps (Stable Diffusion uses 1)
  eta: float = 0.0  # DDIM: 0 deterministic, 1 the DDPM posterior's variance
  variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"  # DDPM: posterior or beta
  clip_sample_range: float | None = None  # clip each x_0 estimate to [-r, r]; None: no clip
  thresholding: bool = False  # Imagen's dynamic thresholding of x_0 (instead of clipping)
  dynamic_thresholding_ratio: float = 0.995  # quantile of |x_0| per example that sets s
  sample_max_value: float = 1.0  # the largest s dynamic thresholding may use
  set_alpha_to_one: bool = True  # DDIM: alpha-bar after the last step is 1 (else alpha-bar[0])
  use_clipped_model_output: bool = False  # DDIM: recompute the noise from the clipped x_0

  def timesteps(self, num_train_timesteps: int) -> np.ndarray:
    return inference_timesteps(
      num_train_timesteps, self.num_steps, self.timestep_spacing, self.steps_offset
    )


def dynamic_threshold(sample: jax.Array, ratio: float = 0.995, max_value: float = 1.0) -> jax.Array:
  """Imagen's dynamic thresholding (Saharia et al. 2022) of x_0 [B, ...]: s = the `ratio`
  quantile of |x_0| over each example, clipped to [1, max_value]; x_0 clipped to [-s, s] / s."""
  dtype = sample.dtype
  flat = sample.reshape(sample.shape[0], -1)
  flat = flat.astype(jnp.promote_types(dtype, jnp.float32))
  s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
  return (jnp.clip(flat, -s, s) / s).reshape(sample.shape).astype(dtype)


def _process_sample(sampler: Sampler, sample: jax.Array) -> jax.Array:
  if sampler.thresholding:
    return dynamic_threshold(sample, sampler.dynamic_thresholding_ratio, sampler.sample_max_value)
  if sampler.clip_sample_range is not None:
    return jnp.clip(sample, -sampler.clip_sample_range, sampler.clip_sample_range)
  return sample


def _previous_alpha_bar(schedule, t_prev, x, final) -> jax.Array:
  """alpha-bar at the previous timestep, `final` where the chain ends (t_prev < 0)."""
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod)
  value = jnp.where(t_prev >= 0, alphas_cumprod[jnp.maximum(t_prev, 0)], final)
  return _broadcast_to(value, x)


def ddpm_step(
  sampler: Sampler,
  schedule: Schedule,
  prediction: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  noise: jax.Array,
  *,
  prediction_type: PredictionType,
) -> tuple[jax.Array, jax.Array]:
  """One ancestral step x_t -> x_{t_prev} (t_prev = -1 after the last); returns (x_prev, x_0).

  The step's beta is 1 - alpha-bar[t] / alpha-bar[t_prev], so skipping timesteps samples the
  respaced chain. `noise` [B, ...] is scaled by the step's standard deviation (none at t = 0).
  """
  alpha_bar = _alpha_bar(schedule, t, x_t)
  alpha_bar_prev = _previous_alpha_bar(schedule, t_prev, x_t, 1.0)
  alpha = alpha_bar / alpha_bar_prev
  beta = 1.0 - alpha
  sample, _ = _sample_and_epsilon(prediction, x_t, alpha_bar, prediction_type)
  sample = _process_sample(sampler, sample)
  # The posterior q(x_prev | x_t, x_0): mean coefficients and (fixed_small) variance.
  sample_coefficient = jnp.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)
  current_coefficient = jnp.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
  mean = sample_coefficient * sample + current_coefficient * x_t
  if sampler.variance_type == "fixed_small":
    variance = jnp.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta, 1e-20)
  elif sampler.variance_type == "fixed_large":
    variance = beta
  else:
    raise ValueError(f"unknown variance type {sampler.variance_type!r}: fixed_small, fixed_large")
  std = jnp.where(t > 0, jnp.sqrt(variance), 0.0).astype(x_t.dtype)
  return mean + std * noise, sample


def ddim_step(
  sampler: Sampler,
  schedule: Schedule,
  prediction: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  noise: jax.Array | None,
  *,
  prediction_type: PredictionType,
) -> tuple[jax.Array, jax.Array]:
  """One DDIM step (Song et al. 2021, eq. 12) x_t -> x_{t_prev}; returns (x_prev, x_0).

  sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)); `noise` [B, ...] is needed
  only when eta > 0.
  """
  final = 1.0 if sampler.set_alpha_to_one else jnp.asarray(schedule.alphas_cumprod)[0]
  alpha_bar = _alpha_bar(schedule, t, x_t)
  alpha_bar_prev = _previous_alpha_bar(schedule, t_prev, x_t, final)
  sample, epsilon = _sample_and_epsilon(prediction, x_t, alpha_bar, prediction_type)
  sample = _process_sample(sampler, sample)
  if sampler.use_clipped_model_output:
    epsilon = (x_t - jnp.sqrt(alpha_bar) * sample) / jnp.sqrt(1.0 - alpha_bar)
  variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
  std = sampler.eta * jnp.sqrt(variance)
  # Never negative in exact arithmetic (std**2 <= 1 - a_prev); the floor guards rounding.
  direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - std**2, 0.0))
  x_prev = jnp.sqrt(alpha_bar_prev) * sample + direction * epsilon
  if sampler.eta > 0:
    x_prev = x_prev + std * noise
  return x_prev, sample


def step_noise(key: jax.Array, step: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
  """The noise `sample` draws at step index `step` (0 = the first, noisiest step); drawn in
  float32 whatever the dtype, so that one key gives the same run at every precision."""
  return jax.random.normal(jax.random.fold_in(key, step), shape, jnp.float32).astype(dtype)


def batch_noise(key: jax.Array, step: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
  """`step_noise` for a batch [B, ...]: from one key, or from one key per example (a key array
  [B]: example b's noise is `step_noise(key[b], step, shape[1:])`, whatever else is in the
  batch, so a batch may hold independent requests)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:
    return jax.vmap(lambda k: step_noise(k, step, shape[1:], dtype))(key)
  return step_noise(key, step, shape, dtype)


def sample(
  sampler: Sampler,
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  initial_noise: jax.Array,
  key: jax.Array,
  *,
  prediction_type: PredictionType,
) -> jax.Array:
  """Denoise x_T = initial_noise [B, ...] to x_0 over `sampler.timesteps(...)` in one `lax.scan`.

  denoise_fn(x_t, t) gets t as [B] i32 (the training timestep, the same for every example);
  step i draws its noise with `batch_noise(key, i, ...)` (`key` one key, or a key array [B] of
  one key per example), so a run is a function of the key(s).
  """
  timesteps = sampler.timesteps(schedule.num_train_timesteps)  # [S]
  previous = np.append(timesteps[1:], -1)  # [S]
  step_fn = {"ddpm": ddpm_step, "ddim": ddim_step}[sampler.method]
  needs_noise = sampler.method == "ddpm" or sampler.eta > 0
  batch = initial_noise.shape[0]

  def body(x_t, inputs):
    index, t, t_prev = inputs
    prediction = denoise_fn(x_t, jnp.full((batch,), t, jnp.int32))
    noise = batch_noise(key, index, x_t.shape, x_t.dtype) if needs_noise else None
    x_prev, _ = step_fn(
      sampler, schedule, prediction, x_t, t, t_prev, noise, prediction_type=prediction_type
    )
    return x_prev, None

  inputs = (
    jnp.arange(len(timesteps), dtype=jnp.int32),
    jnp.asarray(timesteps, jnp.int32),
    jnp.asarray(previous, jnp.int32),
  )
  x_0, _ = jax.lax.scan(body, initial_noise, inputs)
  return x_0


def step_coefficients(
  sampler: Sampler,
  schedule: Schedule,
  t: jax.Array,
  t_prev: jax.Array,
  *,
  prediction_type: PredictionType,
  dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(a, c, s): one step is x_prev = a x_t + c prediction + s noise, when it processes no x_0
  estimate (no clipping, no thresholding): the step function evaluated on unit inputs."""
  if sampler.thresholding or sampler.clip_sample_range is not None:
    raise ValueError("a step that clips or thresholds its x_0 estimate is not linear")
  step_fn = {"ddpm": ddpm_step, "ddim": ddim_step}[sampler.method]
  one, zero = jnp.ones((1,), dtype), jnp.zeros((1,), dtype)

  def x_prev(prediction, x_t, noise):
    out, _ = step_fn(
      sampler, schedule, prediction, x_t, t, t_prev, noise, prediction_type=prediction_type
    )
    return out[0]

  needs_noise = sampler.method == "ddpm" or sampler.eta > 0
  return (
    x_prev(zero, one, zero),
    x_prev(one, zero, zero),
    x_prev(zero, zero, one) if needs_noise else jnp.zeros((), dtype),
  )


def sample_projected(
  sampler: Sampler,
  schedule: Schedule,
  hidden_fn: Callable[[jax.Array, jax.Array], jax.Array],
  initial_noise: jax.Array,
  key: jax.Array,
  *,
  prediction_type: PredictionType,
  project_in: jax.Array,
  project_out: jax.Array,
  out_bias: jax.Array,
) -> jax.Array:
  """`sample` for a denoiser that reads x_t only through a linear map and writes its prediction
  through another: prediction = hidden_fn(x_t @ project_in, t) @ project_out + out_bias, with
  x_t [B, ..., F], project_in [F, D], hidden [B, ..., H], project_out [H, F], out_bias [F].

  Every step without x_0 processing is linear (`step_coefficients`), so the chain runs on
  z = x_t @ project_in: z_prev = a z + c (h @ (project_out @ project_in) + out_bias @ project_in)
  + s noise @ project_in, and x_0 is assembled once at the end from the initial noise, the
  running sum of the hidden states and the noise (when the sampler draws any). Equal to
  `sample(...)` of the same model up to float rounding; for F much wider than D and H (vertex
  offsets) it skips the two F-wide projections of every step. Noise is drawn as `sample` draws
  it (`batch_noise`, one key or one per example).
  """
  timesteps = sampler.timesteps(schedule.num_train_timesteps)  # [S]
  previous = np.append(timesteps[1:], -1)  # [S]
  needs_noise = sampler.method == "ddpm" or sampler.eta > 0
  batch = initial_noise.shape[0]
  dtype = initial_noise.dtype
  chain = (project_out @ project_in).astype(dtype)  # [H, D]
  bias_in = (out_bias @ project_in).astype(dtype)  # [D]

  def body(state, inputs):
    z, hidden_sum, noise_sum, coefficient, bias_sum = state
    index, t, t_prev = inputs
    a, c, s = step_coefficients(
      sampler, schedule, t, t_prev, prediction_type=prediction_type, dtype=dtype
    )
    hidden = hidden_fn(z, jnp.full((batch,), t, jnp.int32)).astype(dtype)
    z = a * z + c * (hidden @ chain + bias_in)
    hidden_sum = a * hidden_sum + c * hidden
    if needs_noise:
      noise = batch_noise(key, index, initial_noise.shape, dtype)
      z = z + s * (noise @ project_in.astype(dtype))
      noise_sum = a * noise_sum + s * noise
    return (z, hidden_sum, noise_sum, a * coefficient, a * bias_sum + c), None

  z = initial_noise @ project_in.astype(dtype)
  hidden_shape = z.shape[:-1] + (project_out.shape[0],)
  state = (
    z,
    jnp.zeros(hidden_shape, dtype),
    jnp.zeros_like(initial_noise) if needs_noise else jnp.zeros((), dtype),
    jnp.ones((), dtype),
    jnp.zeros((), dtype),
  )
  inputs = (
    jnp.arange(len(timesteps), dtype=jnp.int32),
    jnp.asarray(timesteps, jnp.int32),
    jnp.asarray(previous, jnp.int32),
  )
  (_, hidden_sum, noise_sum, coefficient, bias_sum), _ = jax.lax.scan(body, state, inputs)
  x_0 = coefficient * initial_noise + hidden_sum @ project_out.astype(dtype)
  return x_0 + bias_sum * out_bias.astype(dtype) + noise_sum


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance (Ho & Salimans 2022) over one or more conditions, each replaced
  by its own learned null embedding with its own probability in training and given its own
  scale at sampling. The rule that composes them (docs/design.md section 16):

  sequential (DiffPoseTalk, InstructPix2Pix): with the conditions c_1 .. c_K in order and
    p_k the prediction given c_1 .. c_k (p_0 unconditional),
    guided = p_0 + sum_k s_k (p_k - p_{k-1});
  independent (compositional, Liu et al. 2022): with p_k the prediction given c_k alone,
    guided = p_0 + sum_k s_k (p_k - p_0).
  One condition: both are p_0 + s (p_1 - p_0). Scale 0 drops a condition's term, scale 1 with
  every earlier scale 1 (sequential) gives the conditional prediction; scales above 1 extrapolate.
  """

  conditions: tuple[str, ...] = ()  # guided conditions, in the order `sequential` nests them
  drop_probabilities: tuple[float, ...] = ()  # per condition: training drop rate (to null)
  scales: tuple[float, ...] = ()  # per condition: default guidance scale at sampling
  rule: GuidanceRule = "sequential"
  batch_subsets: bool = True  # one model call over all 1 + K subsets (else one call per subset)

  def __post_init__(self):
    k = len(self.conditions)
    if len(self.drop_probabilities) not in (0, k) or len(self.scales) not in (0, k):
      raise ValueError(
        f"Guidance: drop_probabilities and scales need one entry per condition ({k})"
      )
    if self.rule not in ("sequential", "independent"):
      raise ValueError(f"unknown guidance rule {self.rule!r}: sequential or independent")


def guidance_subsets(guidance: Guidance) -> np.ndarray:
  """[1 + K, K] bool: which conditions each model call keeps (row 0 keeps none)."""
  k = len(guidance.conditions)
  if guidance.rule == "sequential":
    return np.tril(np.ones((k + 1, k), bool), -1)
  return np.concatenate([np.zeros((1, k), bool), np.eye(k, dtype=bool)])


def combine_guided_predictions(
  guidance: Guidance, predictions: jax.Array, scales: jax.Array | Sequence[float] | None = None
) -> jax.Array:
  """The guided prediction [B, ...] from predictions [1 + K, B, ...] over `guidance_subsets`;
  scales [K], or [K, B] per example (arrays allowed, e.g. inputs of an exported sampler),
  default to guidance.scales."""
  k = len(guidance.conditions)
  scales = guidance.scales if scales is None else scales
  if len(scales) != k:
    raise ValueError(f"guidance needs {k} scales (one per condition), got {len(scales)}")
  scales = jnp.asarray(scales, predictions.dtype)
  if scales.ndim == 2:  # [K, B] -> [K, B, 1, ...] against each prediction [B, ...]
    scales = scales.reshape(scales.shape + (1,) * (predictions.ndim - 2))
  guided = predictions[0]
  for i in range(1, k + 1):
    reference = predictions[i - 1] if guidance.rule == "sequential" else predictions[0]
    guided = guided + scales[i - 1] * (predictions[i] - reference)
  return guided


def _with_nulls(
  conditions: Mapping[str, jax.Array],
  null_embeddings: Mapping[str, jax.Array],
  keep: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
  """Conditions with each example's dropped ones (keep [B] False) replaced by the null."""
  out = dict(conditions)
  for name, kept in keep.items():
    value = conditions[name]
    null = jnp.broadcast_to(jnp.asarray(null_embeddings[name], value.dtype), value.shape)
    kept = kept.reshape(kept.shape + (1,) * (value.ndim - kept.ndim))
    out[name] = jnp.where(kept, value, null)
  return out


def drop_conditions(
  guidance: Guidance,
  key: jax.Array,
  conditions: Mapping[str, jax.Array],
  null_embeddings: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
  """Training: replace each guided condition [B, ...] by its null embedding (broadcast to the
  condition's per-example shape) for a random subset of examples, each condition independently
  with its own probability. Other entries of `conditions` pass through."""
  keep = {}
  for i, (name, p) in enumerate(zip(guidance.conditions, guidance.drop_probabilities)):
    batch = conditions[name].shape[0]
    keep[name] = jax.random.uniform(jax.random.fold_in(key, i), (batch,)) >= p
  return _with_nulls(conditions, null_embeddings, keep)


def guided_denoise_fn(
  guidance: Guidance,
  model_fn: Callable[[jax.Array, jax.Array, dict[str, jax.Array]], jax.Array],
  conditions: Mapping[str, jax.Array],
  null_embeddings: Mapping[str, jax.Array],
  scales: jax.Array | Sequence[float] | None = None,
) -> DenoiseFn:
  """A `denoise_fn(x_t, t)` for `sample` that calls model_fn(x_t, t, conditions) on every
  condition subset (batched along the examples into one call unless batch_subsets=False) and
  combines the predictions by the guidance rule."""
  subsets = guidance_subsets(guidance)  # [1 + K, K]
  names = guidance.conditions

  def subset_conditions(row: np.ndarray, batch: int) -> dict[str, jax.Array]:
    keep = {name: jnp.full((batch,), bool(row[i])) for i, name in enumerate(names)}
    return _with_nulls(conditions, null_embeddings, keep)

  def denoise_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
    batch, n = x_t.shape[0], subsets.shape[0]
    if guidance.batch_subsets:
      per_subset = [subset_conditions(row, batch) for row in subsets]
      stacked = jax.tree.map(lambda *c: jnp.concatenate(c), *per_subset)
      prediction = model_fn(jnp.tile(x_t, (n,) + (1,) * (x_t.ndim - 1)), jnp.tile(t, n), stacked)
      predictions = prediction.reshape((n, batch) + prediction.shape[1:])
    else:
      predictions = jnp.stack([model_fn(x_t, t, subset_conditions(row, batch)) for row in subsets])
    return combine_guided_predictions(guidance, predictions, scales)

  return denoise_fn
