"""Speech-driven 3D facial animation: audio in, per-frame mesh vertices out.

The task family of FaceFormer, CodeTalker, SelfTalk, EmoFace, EMOTE and their successors, on
VOCASET- and BIWI-layout data. It follows the task contract of `fdjax/tasks/__init__.py`, with
the data, losses and evaluation of the speech-mesh family (`fdjax/tasks/_speech_mesh.py`);
CodeTalker's stage 1 is its own task, `motion_vq`:

- model: `SpeechToMesh` (wav2vec2/HuBERT encoder + FaceFormer, non-autoregressive, CodeTalker
  or diffusion (DiffSpeaker, DiffPoseTalk, FaceDiffuser) decoder, `config.model.decoder.kind`);
- loss: vertex MSE + velocity MSE (optionally lip-weighted), in millimetres so the numbers are
  readable and the optimizer's epsilon is negligible; plus the latent regression for CodeTalker;
  for the diffusion decoders the same two terms on the x_0 the denoiser implies at a random
  timestep (`fdjax.diffusion.denoising_loss`), plus `loss.target_weight` x the loss on its own
  target (epsilon or v);
- evaluation: whole test sequences generated from audio alone, metrics of docs/design.md section 5
  (LVE squared, LVE mm, FDD, MVE; masks named) for the model and for two baselines computed by
  the same code (static template; training-set mean offset); a diffusion decoder is sampled
  `data.eval_num_samples` times per sequence: one sample's metrics, their mean over the samples,
  and the samples' diversity;
- predict: `(params, audio, template, style) -> vertices` for any audio length;
- emotional speech in FLAME space (the `mead` experiment, docs/design.md section 18): the
  non-autoregressive decoder may predict head-model coefficients or rig controls
  (`model.decoder.output`), the loss may be EMOTE's content/emotion split
  (`loss.emotion_weight > 0`), and with `data.emotions` the evaluation adds LVE per emotion, the
  emotion accuracy of the generated expression and what another emotion changes
  (`fdjax/tasks/_emotion.py`).

Config keys read (beyond the base config and those of `_speech_mesh`): `data.eval_style`,
`model.encoder` (`variant`, `checkpoint`, fields), `model.decoder` (`kind`, `variant`, fields),
`model.prior_workdir` (CodeTalker stage 2), `loss.latent_weight`; diffusion decoders:
`loss.distance`, `loss.target_weight`, `data.eval_num_samples`; where the config has them:
`loss.emotion_weight`, `loss.content_weight`, `data.emotions`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import pipeline, prepare
from fdjax import diffusion, pretrained
from fdjax import optim as optim_lib
from fdjax import step as step_lib
from fdjax.models import losses
from fdjax.models.audio2mesh import SpeechToMesh
from fdjax.models.codetalker import CodePredictor
from fdjax.models.motion_decoders import FaceFormerDecoder, NonAutoregressiveDecoder
from fdjax.models.motion_diffusion import (
  DiffPoseTalkDecoder,
  DiffSpeakerDecoder,
  DiffusionDecoder,
  FaceDiffuserDecoder,
  RecurrentDenoiser,
)
from fdjax.models.wav2vec2 import Wav2Vec2Encoder
from fdjax.tasks import BATCH_DIM, ExportDim, _emotion, _speech_mesh

DECODERS = {
  "faceformer": FaceFormerDecoder,
  "nonautoregressive": NonAutoregressiveDecoder,
  "codetalker": CodePredictor,
  "diffspeaker": DiffSpeakerDecoder,
  "diffposetalk": DiffPoseTalkDecoder,
  "facediffuser": FaceDiffuserDecoder,
}
# Decoder kinds that are denoisers: trained at random noise levels, sampled at prediction.
DIFFUSION_KINDS = ("diffspeaker", "diffposetalk", "facediffuser")
# Decoder config keys that configure the loss (scheduled sampling), not the decoder module.
SAMPLING_KEYS = ("sampling_schedule", "sampling_schedule_kwargs")
# Where CodeTalker stage 2 puts the parameters of a stage-1 (`motion_vq`) run.
STAGE1_PRIOR = "prior=>decoder/prior"

train_data = _speech_mesh.train_data


def build_encoder(config: Any) -> Wav2Vec2Encoder:
  """The audio encoder: a named size, or the architecture of a local HF checkpoint."""
  from fdjax.models import hf_convert

  enc = config.model.encoder
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  fields = _speech_mesh.module_fields(enc, "variant", "checkpoint")
  fields.update(dtype=dtype, attention_impl=config.precision.attention_impl)
  if enc.checkpoint:
    return Wav2Vec2Encoder.from_hf_config(hf_convert.read_hf_config(enc.checkpoint), **fields)
  return Wav2Vec2Encoder.from_variant(enc.variant, **fields)


def build_model(config: Any) -> nn.Module:
  dec = config.model.decoder
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  if dec.kind not in DECODERS:
    raise ValueError(
      f"config.model.decoder.kind={dec.kind!r}: expected one of {sorted(DECODERS)} "
      "(CodeTalker stage 1, codetalker_vq, is the task motion_vq)"
    )
  if dec.get("output", "vertices") != "vertices" and dec.kind != "nonautoregressive":
    raise ValueError(
      f"config.model.decoder.output={dec.output!r} (head-model coefficients or rig controls) "
      f"needs kind='nonautoregressive', got {dec.kind!r}"
    )
  numerics = {"dtype": dtype, "attention_impl": config.precision.attention_impl}
  fields = {
    **_speech_mesh.module_fields(dec, "kind", "variant", "prior", *SAMPLING_KEYS),
    **numerics,
  }
  if dec.kind == "codetalker":
    prior = {**_speech_mesh.module_fields(dec.prior), **numerics}
    decoder = CodePredictor.from_variant(dec.variant, prior=prior, **fields)
  else:
    decoder = DECODERS[dec.kind].from_variant(dec.variant, **fields)
  return SpeechToMesh(
    encoder=build_encoder(config),
    decoder=decoder,
    sample_rate=config.data.sample_rate,
    fps=config.data.fps,
  )


def _num_vertices(config: Any) -> int:
  decoder = build_model(config).decoder
  return decoder.prior.num_vertices if isinstance(decoder, CodePredictor) else decoder.num_vertices


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  return _speech_mesh.dummy_batch(config, batch_size, _num_vertices(config))


def pretrained_specs(config: Any) -> dict[str, pretrained.InitFrom]:
  """What `config.model.encoder.checkpoint` and `config.model.prior_workdir` load, as
  `fdjax.pretrained` specs keyed by their config key: the HF audio encoder, the CodeTalker
  stage-1 prior."""
  specs = {}
  if config.model.encoder.checkpoint:
    specs["config.model.encoder.checkpoint"] = pretrained.InitFrom(
      config.model.encoder.checkpoint, "", "encoder"
    )
  if config.model.decoder.kind == "codetalker":
    if not config.model.prior_workdir:
      raise ValueError(
        "the codetalker variant needs config.model.prior_workdir: the workdir of a finished "
        "motion_vq (CodeTalker stage 1, variant=codetalker_vq) run"
      )
    (specs["config.model.prior_workdir"],) = pretrained.parse_spec(
      f"{config.model.prior_workdir}:{STAGE1_PRIOR}"
    )
  return specs


def load_pretrained(config: Any, params: dict) -> dict:
  """Parameters from local checkpoints: the HF audio encoder, the CodeTalker stage-1 prior."""
  for key, spec in pretrained_specs(config).items():
    params = pretrained.merge_specs(params, [spec], where=key)
  return params


def make_loss_fn(config: Any):
  """The loss for `config`: see the module docstring."""
  if config.loss.get("emotion_weight", 0.0) > 0:
    return functools.partial(
      _content_emotion_loss,
      velocity_weight=config.loss.velocity_weight,
      content_weight=config.loss.content_weight,
      emotion_weight=config.loss.emotion_weight,
      lips=_speech_mesh.region_weights(config, "lip_mask", _num_vertices(config), 1.0, 0.0),
    )
  if config.model.decoder.kind in DIFFUSION_KINDS:
    return functools.partial(
      _diffusion_loss,
      velocity_weight=config.loss.velocity_weight,
      target_weight=config.loss.target_weight,
      distance=config.loss.distance,
      lip_weights=_speech_mesh.lip_weights(config, _num_vertices(config)),
    )
  return functools.partial(
    _loss,
    latent=config.model.decoder.kind == "codetalker",
    velocity_weight=config.loss.velocity_weight,
    latent_weight=config.loss.latent_weight,
    lip_weights=_speech_mesh.lip_weights(config, _num_vertices(config)),
    truth_probability=sampling_schedule(config),
  )


def sampling_schedule(config: Any) -> Callable[[Any], Any] | None:
  """Scheduled sampling's probability of feeding the truth, as a function of the training step
  (`model.decoder.sampling_schedule`: an optax schedule name, called with
  `sampling_schedule_kwargs`; `transition_steps=0` there means `total_steps`); None unless the
  decoder trains with `training="scheduled_sampling"`."""
  dec = config.model.decoder
  if dec.get("training") != "scheduled_sampling":
    return None
  name = dec.get("sampling_schedule", "linear_schedule")
  kwargs = dict(dec.get("sampling_schedule_kwargs", {}))
  if kwargs.get("transition_steps", None) == 0:
    kwargs["transition_steps"] = config.total_steps
  if name not in optim_lib.optax_schedule_names():
    raise ValueError(
      f"config.model.decoder.sampling_schedule={name!r} is not an optax schedule; known: "
      f"{optim_lib.optax_schedule_names()}"
    )
  try:
    schedule = getattr(optax, name)(**kwargs)
  except TypeError as e:
    raise TypeError(
      f"config.model.decoder.sampling_schedule_kwargs for optax.{name}: {e}"
    ) from None
  return schedule


def _loss(
  model,
  params,
  batch,
  rng,
  train,
  *,
  latent,
  velocity_weight,
  latent_weight,
  lip_weights,
  truth_probability=None,
  step=None,
):
  extra = {}
  if truth_probability is not None and train and step is not None:
    extra["truth_probability"] = truth_probability(step)
  predicted, aux = model.apply(
    {"params": params}, batch, train=train, rngs={"dropout": rng}, **extra
  )
  loss, metrics = _speech_mesh.vertex_losses(
    predicted, batch, velocity_weight=velocity_weight, lip_weights=lip_weights
  )
  if latent:
    latent_mse = losses.latent_mse(aux["latents"], aux["target_latents"], batch["frame_mask"])
    loss = loss + latent_weight * latent_mse
    metrics["latent_mse"] = latent_mse
  return loss, metrics


def _content_emotion_loss(
  model, params, batch, rng, train, *, velocity_weight, content_weight, emotion_weight, lips
):
  """EMOTE's split of the loss: `content_weight` x (lip-region vertex + `velocity_weight` x lip
  velocity MSE, per frame) + `emotion_weight` x the whole face's per-sequence error
  (`losses.sequence_mean_mse` of the time-averaged meshes), all in mm^2."""
  predicted, _ = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  content, metrics = _speech_mesh.vertex_losses(
    predicted, batch, velocity_weight=velocity_weight, lip_weights=lips
  )
  emotion = losses.sequence_mean_mse(
    predicted * _speech_mesh.MM_PER_METRE,
    batch["vertices"] * _speech_mesh.MM_PER_METRE,
    batch["frame_mask"],
  )
  metrics = {
    "lip_vertex_mse_mm2": metrics["vertex_mse_mm2"],
    "lip_velocity_mse_mm2": metrics["velocity_mse_mm2"],
    "sequence_mean_mse_mm2": emotion,
    "weight": metrics["weight"],
  }
  return content_weight * content + emotion_weight * emotion, metrics


def _diffusion_loss(
  model, params, batch, rng, train, *, velocity_weight, target_weight, distance, lip_weights
):
  """A diffusion decoder's loss: vertex + `velocity_weight` x velocity distance (mm) of the x_0
  implied at one random timestep per example, each `diffusion.denoising_loss` over the frames
  the decoder scores (`aux["loss_mask"]`: the valid frames, less any previous-window frames it
  was given; velocities over `aux["velocity_mask"]`), plus `target_weight` x the loss on the
  denoiser's own target; the noise and condition drops are drawn from `rng`, as dropout is."""
  predicted, aux = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  frame_mask = aux["loss_mask"]
  weight = aux["loss_weight"]
  scale = 1.0
  if lip_weights is not None:
    if distance != "l2":
      raise ValueError(f"loss.lip_weight needs loss.distance='l2', got {distance!r}")
    # Squared errors scaled by w_v / mean(w): the frame mean is sum_v w_v e_v / sum_v w_v.
    scale = jnp.sqrt(lip_weights / lip_weights.mean())[:, None]  # [V, 1]
  predicted_mm = predicted * _speech_mesh.MM_PER_METRE * scale  # [B, T, V, 3]
  truth_mm = batch["vertices"] * _speech_mesh.MM_PER_METRE * scale
  vertex = diffusion.denoising_loss(predicted_mm, truth_mm, frame_mask, weight, distance=distance)
  velocity = diffusion.denoising_loss(
    jnp.diff(predicted_mm, axis=1),
    jnp.diff(truth_mm, axis=1),
    aux["velocity_mask"],
    weight,
    distance=distance,
  )
  loss = vertex + velocity_weight * velocity  # [B]
  metrics = {"vertex_mse_mm2": vertex.mean(), "velocity_mse_mm2": velocity.mean()}
  if target_weight:
    target = diffusion.denoising_loss(
      aux["prediction"], aux["target"], frame_mask, weight, distance=distance
    )
    loss = loss + target_weight * target
    metrics["target_loss"] = target.mean()
  metrics["weight"] = jnp.asarray(frame_mask.shape[0], jnp.float32)
  return loss.mean(), metrics


@functools.partial(jax.jit, static_argnames=("model",))
def _generate(
  model, params, audio, audio_mask, frame_mask, template, style, emotion, intensity, key=None
):
  """`(vertices [B, T, V, 3], aux)`: the decoder's prediction and its named outputs; `key` is
  the `sample` rng of a sampled (diffusion) decoder (None: its `sample_seed`)."""
  return model.apply(
    {"params": params},
    audio,
    template,
    style,
    audio_mask=audio_mask,
    frame_mask=frame_mask,
    emotion=emotion,
    intensity=intensity,
    method="generate",
    rngs=None if key is None else {"sample": key},
  )


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict[str, float]:
  """Metrics over whole sequences of `config.data.eval_split` generated from their audio, with
  both baselines (see `_speech_mesh.evaluate_sequences`). A diffusion decoder is sampled
  `config.data.eval_num_samples` times per sequence, sample n from the key
  `model.decoder.sample_seed + n` (sample 0 is what `predict` gives): the table then has one
  sample's metrics, their mean over the samples, and the samples' diversity."""
  num_samples = 0
  if config.model.decoder.kind in DIFFUSION_KINDS:
    num_samples = config.data.eval_num_samples
    if num_samples < 1:
      raise ValueError(f"config.data.eval_num_samples must be >= 1, got {num_samples}")
  seed = config.model.decoder.get("sample_seed", 0)

  def generate(batch, put, key=None):
    style = np.where(batch["subject"] >= 0, batch["subject"], config.data.eval_style)
    return _generate(
      model,
      params,
      put(batch["audio"]),
      put(batch["audio_mask"]),
      put(batch["frame_mask"]),
      put(batch["template"]),
      put(style.astype(np.int32)),
      put(batch.get("emotion")),
      put(batch.get("intensity")),
      key,
    )

  num_vertices = _num_vertices(config)
  generated = []  # with emotions: each batch and what was generated for it, kept on the host

  def predict(batch, put):
    if num_samples:  # [N, B, T, V, 3]
      keys = [jax.random.key(seed + n) for n in range(num_samples)]
      return jnp.stack([generate(batch, put, key)[0] for key in keys])
    vertices, aux = generate(batch, put)
    if config.data.get("emotions"):
      # The same audio with another emotion, to see what the emotion input changes.
      swapped = {**batch, "emotion": _emotion.swapped_emotions(batch["emotion"], config)}
      outputs = (vertices, _emotion.trajectories(aux), generate(swapped, put)[0])
      generated.append((batch, *jax.device_get(outputs)))
    return vertices

  metrics = _speech_mesh.evaluate_sequences(
    config,
    predict,
    num_vertices,
    mesh=mesh,
    workdir=workdir,
    step=step,
    num_samples=num_samples,
  )
  if config.data.get("emotions"):  # per-emotion LVE and emotion accuracy (MEAD)
    metrics.update(_emotion.evaluate_emotions(config, generated, num_vertices, step=step))
  return metrics


def _conditions(config: Any) -> dict[str, tuple[str, str]]:
  """The conditioning inputs the decoder takes besides style: `emotion [b]` and `intensity [b]`
  int32 where it embeds them (EMOTE / EmoFace style, `decoder.num_emotions`/`num_intensities`)."""
  dec = config.model.decoder
  return {
    key: ("b", "int32")
    for key, count in (("emotion", "num_emotions"), ("intensity", "num_intensities"))
    if dec.get(count, 0)
  }


def predict_fn(config: Any, model: nn.Module):
  """`predict(params, audio [b, s], template [b, V, 3], style [b]) -> vertices [b, t, V, 3]`,
  plus `emotion [b]` and `intensity [b]` (int32) for a decoder conditioned on them.

  A diffusion decoder's predict is its whole sampler (the audio encoded once, then the
  `model.decoder.sampling_steps` steps of `sampling_method` in one scan, fixed at export) and
  also takes, per example, the noise `seed [b]` int32 (example i's sample is a function of
  `seed[i]` alone, so one batch may hold independent requests) and the guidance scales
  `audio_guidance_scale`, `style_guidance_scale` `[b]` float32 (all 1: the unguided loop);
  left out, they are `export_defaults`' (the config's `sample_seed` and scales)."""
  num_vertices = _num_vertices(config)
  specs = {
    "audio": ("b, s", "float32"),
    "template": (f"b, {num_vertices}, 3", "float32"),
    "style": ("b", "int32"),
    **_conditions(config),
  }
  if config.model.decoder.kind in DIFFUSION_KINDS:
    dec = config.model.decoder

    def sample(
      params,
      audio,
      template,
      style,
      emotion=None,
      intensity=None,
      seed=None,
      audio_guidance_scale=None,
      style_guidance_scale=None,
    ):
      batch = audio.shape[0]
      if seed is None:
        seed = jnp.full((batch,), dec.sample_seed, jnp.int32)
      if audio_guidance_scale is None:
        audio_guidance_scale = jnp.full((batch,), dec.audio_guidance_scale, jnp.float32)
      if style_guidance_scale is None:
        style_guidance_scale = jnp.full((batch,), dec.style_guidance_scale, jnp.float32)
      scales = jnp.stack([audio_guidance_scale, style_guidance_scale], axis=-1)  # [b, 2]
      return model.apply(
        {"params": params},
        audio,
        template,
        style,
        method="generate",
        emotion=emotion,
        intensity=intensity,
        seed=seed,
        guidance_scales=scales,
      )[0]

    specs.update(
      seed=("b", "int32"),
      audio_guidance_scale=("b", "float32"),
      style_guidance_scale=("b", "float32"),
    )
    return sample, specs

  def predict(params, audio, template, style, emotion=None, intensity=None):
    return model.apply(
      {"params": params},
      audio,
      template,
      style,
      method="generate",
      emotion=emotion,
      intensity=intensity,
    )[0]

  return predict, specs


def export_dims(config: Any) -> list[ExportDim]:
  """`b` by `--batch`, `t` (mesh frames) by `--time`, and `s` (audio samples) from `t` as
  `round(t * sample_rate / fps)`."""

  def samples(sizes: dict[str, int]) -> int:
    sample_rate, fps = config.data.get("sample_rate"), config.data.get("fps")
    if not (sample_rate and fps):
      raise ValueError("the config gives no sample_rate and fps to convert frames to samples")
    return round(sizes["t"] * sample_rate / fps)

  return [
    BATCH_DIM,
    ExportDim("t", "--time", "mesh frames, or a dim name (default: symbolic)"),
    ExportDim("s", help="audio samples", derive=samples, needs=("t",)),
  ]


def export_metadata(config: Any) -> dict:
  metadata = _speech_mesh.export_metadata(config, _num_vertices(config))
  metadata["audio_input"] = "audio"
  metadata["audio"] = "mono waveform at sample_rate, zero mean and unit variance over the clip"
  dec = config.model.decoder
  if dec.kind in DIFFUSION_KINDS:
    # What the exported sampler does (fixed at export; `--config.model.decoder.sampling_steps`
    # and `sampling_method` change it).
    metadata["sampler"] = {
      "method": dec.sampling_method,
      "steps": dec.sampling_steps,
      "eta": dec.eta,
      "timestep_spacing": dec.timestep_spacing,
      "num_train_timesteps": dec.num_train_timesteps,
      "beta_schedule": dec.beta_schedule,
      "prediction_type": dec.prediction_type,
      "seed": "per example: the sample of example i is a function of seed[i]",
    }
  return metadata


def export_defaults(config: Any) -> dict[str, np.ndarray]:
  """What the server fills in when a request sends audio only: style 0 and its template,
  emotion and intensity 0 where the decoder takes them; for a diffusion decoder also the
  config's `sample_seed` and guidance scales."""
  _, data_dir = prepare.ensure_dataset(config.data)
  source = pipeline.tfds_source(config.data.name, data_dir, "train")
  first = next(e for e in source if int(e["subject"]) == 0)
  defaults = {"template": np.asarray(first["template"], np.float32), "style": np.int32(0)}
  # Emotion 0 at level 0: neutral in MEAD's order (docs/design.md section 18).
  defaults.update({key: np.int32(0) for key in _conditions(config)})
  dec = config.model.decoder
  if dec.kind in DIFFUSION_KINDS:
    defaults.update(
      seed=np.int32(dec.sample_seed),
      audio_guidance_scale=np.float32(dec.audio_guidance_scale),
      style_guidance_scale=np.float32(dec.style_guidance_scale),
    )
  return defaults


def symbolic_constraints(config: Any) -> list[str]:
  """Symbolic audio must cover at least one encoder frame (and one mesh frame)."""
  minimum = max(build_encoder(config).receptive_field, _speech_mesh.window_samples(config, 1))
  return [f"s >= {minimum}"]


def flops_per_example(config: Any) -> float:
  """Training FLOPs of one window, counted analytically (for MFU).

  Counts the matmuls and convolutions, 2 FLOPs per multiply-add: the wav2vec2 encoder (conv
  stack over the window's samples; feature projection, positional conv and transformer over
  the frames they run at: the mesh frames for "interpolate" and for a causal encoder that
  resamples to them (`fps` set), r per mesh frame for "pairs", the audio frames for a causal
  encoder with fps=0) and the FaceFormer or non-autoregressive decoder (audio
  projection of r features per frame, style/emotion embeddings, motion embedding of the T - 1
  previous frames (FaceFormer), per layer the attention projections, the dense [T, T] scores
  and weighted sums, FaceFormer's aligned cross-attention over r keys per frame, the MLP, and
  the offset projection to V * 3). A diffusion decoder's step is one denoiser call per example
  (`_denoiser_flops`): the audio projection, style embedding and timestep MLP, the projection of
  the noisy offsets x_t (data) from V * 3, the transformer layers (aligned audio, or a dense
  [T, T] cross-attention to it) or the GRU layers (input and hidden gates per frame), and the
  prediction projection to V * 3. Norms, activations, softmax, the noising and the loss are left
  out, as is usual for MFU.

  Training cost follows what the step computes: each matmul costs its forward once, plus once
  more for the gradient of its weights when they are trainable, plus once more for the
  gradient of each input that depends on a trainable parameter. So a frozen module whose
  inputs are data (wav2vec2's conv stack with `optim.freeze`, as FaceFormer trains it) costs
  its forward only, the first trainable layer after it and the motion embedding of the data
  twice their forward, and everything downstream three times. CodeTalker's stage 2 is not
  counted (0: no MFU is logged).
  """
  from fdjax import optim as optim_lib
  from fdjax.state import strip_boxes

  model = build_model(config)
  if not isinstance(model, SpeechToMesh) or not isinstance(
    model.decoder, FaceFormerDecoder | NonAutoregressiveDecoder | DiffusionDecoder
  ):
    return 0.0
  shapes = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, dummy_batch(config, 1)
    )
  )
  mask = optim_lib.trainable_mask(strip_boxes(shapes["params"]), config.optim.freeze)
  trainable_paths = [
    optim_lib.param_path(path)
    for path, keep in jax.tree_util.tree_flatten_with_path(mask)[0]
    if keep
  ]

  def trainable(prefix: str) -> bool:
    return any(path.startswith(prefix) for path in trainable_paths)

  total = 0.0

  def add(flops: float, *gradients: bool) -> None:
    # The forward, plus one more of the same for each gradient the backward pass computes.
    nonlocal total
    total += flops * (1 + sum(bool(g) for g in gradients))

  enc, dec = model.encoder, model.decoder
  frames = _speech_mesh.training_frames(config)
  ratio = dec.audio_frames_per_frame
  length = _speech_mesh.window_samples(config, frames) + getattr(enc, "causal_padding", 0)
  channels, needs = 1, False  # needs: the activations depend on a trainable parameter
  for i, (dim, kernel, stride) in enumerate(zip(enc.conv_dim, enc.conv_kernel, enc.conv_stride)):
    length = (length - kernel) // stride + 1
    weights = trainable(f"encoder/feature_extractor/conv_layers_{i}/")
    add(2 * length * channels * dim * kernel, weights, needs)
    channels, needs = dim, needs or weights
  if enc.causal and enc.fps:
    steps = frames  # the conv features are resampled to the mesh frame rate first
  elif enc.causal:
    steps = length  # the transformer runs at the audio frame rate, aligned afterwards
  else:
    steps = frames * ratio if enc.frame_alignment == "pairs" else frames
  d, groups = enc.hidden_size, enc.num_conv_pos_embedding_groups
  weights = trainable("encoder/feature_projection/")
  add(2 * steps * channels * d, weights, needs)
  needs = needs or weights or trainable("encoder/masked_spec_embed")
  weights = trainable("encoder/encoder/pos_conv_embed/")
  add(2 * steps * d * (d // groups) * enc.num_conv_pos_embeddings, weights, needs)
  needs = needs or weights or trainable("encoder/encoder/layer_norm/")

  def transformer_layer(prefix: str, steps: int, width: int, mlp: int, needs: bool) -> bool:
    """A self-attention + MLP layer over `steps` positions; returns its output's `needs`."""
    weights = trainable(prefix)
    inner = needs or weights
    add(2 * steps * 3 * width * width, weights, needs)  # query, key, value
    add(4 * steps * steps * width, inner, inner)  # scores and weighted sum, both operands
    add(2 * steps * width * width, weights, inner)  # output projection
    add(4 * steps * width * mlp, weights, inner)  # MLP in and out
    return inner

  for i in range(enc.num_hidden_layers):
    prefix = "encoder/encoder/layers/" if enc.scan_layers else f"encoder/encoder/layers_{i}/"
    needs = transformer_layer(prefix, steps, d, enc.intermediate_size, needs)

  if isinstance(dec, DiffusionDecoder):
    return total + _denoiser_flops(dec.denoiser, frames, ratio * d, needs, trainable)

  dm, v3 = dec.d_model, 3 * dec.num_vertices
  weights = trainable("decoder/audio_projection/")
  add(2 * frames * ratio * d * dm, weights, needs)
  audio_needs = needs or weights
  condition = False
  for field, count in (
    ("style", dec.num_styles),
    ("emotion", dec.num_emotions),
    ("intensity", dec.num_intensities),
  ):
    if count > 0:
      weights = trainable(f"decoder/condition_embedding/{field}_embedding/")
      add(2 * count * dm, weights)  # one-hot input: data
      condition = condition or weights

  if isinstance(dec, NonAutoregressiveDecoder):
    needs = audio_needs or condition
    for i in range(dec.num_layers):
      needs = transformer_layer(f"decoder/encoder/layer_{i}/", frames, dm, dec.mlp_dim, needs)
  else:
    weights = trainable("decoder/vertex_embedding/")
    add(2 * (frames - 1) * v3 * dm, weights)  # offsets of the true previous frames: data
    needs = weights or condition
    for i in range(dec.num_layers):
      prefix = f"decoder/layers_{i}/"
      weights = trainable(prefix)
      inner = needs or weights
      add(2 * frames * 3 * dm * dm, weights, needs)  # self-attention query, key, value
      add(4 * frames * frames * dm, inner, inner)  # causal scores and weighted sum (dense)
      add(2 * frames * dm * dm, weights, inner)  # self-attention output
      memory = audio_needs or weights
      add(2 * frames * dm * dm, weights, inner)  # cross-attention query
      add(2 * 2 * frames * ratio * dm * dm, weights, audio_needs)  # keys and values of memory
      add(2 * frames * ratio * dm, inner, memory)  # aligned scores: r keys per frame
      add(2 * frames * ratio * dm, inner or memory, memory)  # weighted sum
      needs = inner or memory
      add(2 * frames * dm * dm, weights, needs)  # cross-attention output
      add(4 * frames * dm * dec.mlp_dim, weights, needs)  # MLP in and out
  if isinstance(dec, NonAutoregressiveDecoder) and dec.output != "vertices":
    # Coefficients or controls (the head model's or rig's decoding is not counted).
    add(2 * frames * dm * dec.output_head().size, trainable("decoder/output_projection/"), needs)
  else:
    add(2 * frames * dm * v3, trainable("decoder/offset_projection/"), needs)
  return total


def _denoiser_flops(
  denoiser: nn.Module, frames: int, audio_width: int, needs: bool, trainable: Callable
) -> float:
  """Training FLOPs of one call of a diffusion denoiser over `frames` frames (any previous
  frames included) whose audio features are `audio_width` wide per frame, by
  `flops_per_example`'s rules (`needs`: the audio features depend on a trainable parameter;
  `trainable(prefix)`: whether weights under the prefix train)."""
  total = 0.0

  def add(flops: float, *gradients: bool) -> None:
    nonlocal total
    total += flops * (1 + sum(bool(g) for g in gradients))

  prefix = "decoder/denoiser/"
  dm, v3, t = denoiser.d_model, 3 * denoiser.num_vertices, frames
  weights = trainable(f"{prefix}conditions/audio_projection/")
  add(2 * t * audio_width * dm, weights, needs)
  audio_needs = needs or weights
  condition = False
  if denoiser.num_styles > 0:
    condition = trainable(f"{prefix}conditions/style/")
    add(2 * denoiser.num_styles * dm, condition)  # one-hot input: data
  hidden = trainable(f"{prefix}conditions/timestep_hidden/")
  add(2 * dm * dm, hidden)  # the sinusoidal timestep encoding: data
  weights = trainable(f"{prefix}conditions/timestep_out/")
  add(2 * dm * dm, weights, hidden)
  condition = condition or hidden or weights
  weights = trainable(f"{prefix}motion_projection/")
  add(2 * t * v3 * dm, weights)  # the noisy offsets x_t: data
  needs = weights or condition
  width = dm
  if isinstance(denoiser, RecurrentDenoiser):
    needs = needs or audio_needs  # motion, audio and condition concatenated: 3 * d_model wide
    directions = 2 if denoiser.bidirectional else 1
    weights = trainable(f"{prefix}GRUCell_")
    width = 3 * dm
    for _ in range(denoiser.num_layers):
      add(directions * 2 * t * width * 3 * dm, weights, needs)  # input gates r, z, n
      needs = needs or weights
      add(directions * 2 * t * dm * 3 * dm, weights, needs)  # hidden gates: the state trains
      width = directions * dm
  elif denoiser.audio_conditioning == "aligned":
    needs = needs or audio_needs  # the audio added frame by frame
    for i in range(denoiser.num_layers):
      layer = f"{prefix}encoder/layer_{i}/"
      weights = trainable(layer)
      inner = needs or weights
      add(2 * t * 3 * dm * dm, weights, needs)  # query, key, value
      add(4 * t * t * dm, inner, inner)  # scores and weighted sum, both operands
      add(2 * t * dm * dm, weights, inner)  # output projection
      add(4 * t * dm * denoiser.mlp_dim, weights, inner)  # MLP in and out
      needs = inner
  else:  # cross-attention to the audio in every layer
    for i in range(denoiser.num_layers):
      weights = trainable(f"{prefix}layer_{i}/")
      inner = needs or weights
      add(2 * t * 3 * dm * dm, weights, needs)  # self-attention query, key, value
      add(4 * t * t * dm, inner, inner)  # scores and weighted sum
      add(2 * t * dm * dm, weights, inner)  # self-attention output
      add(2 * t * dm * dm, weights, inner)  # cross-attention query
      add(2 * 2 * t * dm * dm, weights, audio_needs)  # keys and values of the audio
      memory = audio_needs or weights
      add(2 * t * t * dm, inner, memory)  # cross scores over all frames
      add(2 * t * t * dm, inner or memory, memory)  # weighted sum
      needs = inner or memory
      add(2 * t * dm * dm, weights, needs)  # cross-attention output
      add(4 * t * dm * denoiser.mlp_dim, weights, needs)  # MLP in and out
  # Only the frames after the previous window's (DiffPoseTalk: `previous_frames`) are predicted.
  predicted = t - denoiser.previous_frames
  add(2 * predicted * width * v3, trainable(f"{prefix}prediction_projection/"), needs)
  return total


def stream_fn(config: Any, model: nn.Module):
  """For a causal model, the streaming functions `fdjax export` writes beside `predict`.

  Returns `({"stream_init": (fn, input_specs), "stream_step": (fn, input_specs)}, metadata)`
  (see `fdjax.streaming.export_functions`) with the chunk of `config.model.stream_chunk_frames`,
  or None when the model does not stream (not causal, or not frame by frame).
  """
  from fdjax import streaming

  if not (isinstance(model, SpeechToMesh) and model.encoder.causal):
    return None
  chunk_frames = config.model.stream_chunk_frames
  return (
    streaming.export_functions(model, chunk_frames),
    streaming.metadata(model, chunk_frames),
  )
