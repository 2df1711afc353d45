"""The config shared by the audio2mesh experiments (VOCASET and BIWI layouts).

Variants (decoder families): `faceformer` (autoregressive, FaceFormer), `nonautoregressive`,
`codetalker_vq` (CodeTalker stage 1, motion VQ-VAE: the task `motion_vq`), `codetalker`
(stage 2; needs `--config.model.prior_workdir=<stage-1 workdir>`), and the motion diffusion
models `diffspeaker` (transformer denoiser over the whole sequence, DDIM-50), `diffposetalk`
(transformer denoiser over windows of 100 frames after the 10 previous ones, 500 cosine steps,
audio and style guidance) and `facediffuser` (GRU denoiser, cosine schedule, ancestral DDPM),
with an EMA of the parameters for evaluation, which reports one sample's metrics, their mean
over `data.eval_num_samples` samples and the samples' diversity. Encoder sizes: `base`
(wav2vec2-base shapes; load weights with `--config.model.encoder.checkpoint=DIR`, a local
Hugging Face directory) and `tiny` (trains from scratch on a CPU). `runlocal=True` shrinks
data and steps for tests.

`causal=True` (faceformer only) builds the streaming variant: a causal encoder attending to the
last second of frames (at the mesh frame rate on VOCASET, whose causal conv features are
resampled to it; at the audio frame rate on BIWI), a decoder attending to the last training
window of frames, and
`fdjax export` then also writes `stream_init` / `stream_step` (see fdjax/streaming.py).
"""

from ml_collections import ConfigDict

from fdjax.config import base_config

VARIANTS = (
  "faceformer",
  "nonautoregressive",
  "codetalker_vq",
  "codetalker",
  "diffspeaker",
  "diffposetalk",
  "facediffuser",
)
DIFFUSION_VARIANTS = ("diffspeaker", "diffposetalk", "facediffuser")
# wav2vec2's 20 ms hop at 16 kHz.
_AUDIO_FRAMES_PER_SECOND = 50


def _diffusion_config(c: ConfigDict, dataset: ConfigDict, args: ConfigDict) -> None:
  """The diffusion decoders' fields (fdjax/models/motion_diffusion.py `DiffusionDecoder`): the
  forward process, the prediction target, guidance, windows and the sampler, as the references
  set them."""
  d = c.model.decoder
  facediffuser = args.variant == "facediffuser"
  diffposetalk = args.variant == "diffposetalk"
  # Forward-process steps: FaceDiffuser 1000 (500 on BIWI), DiffPoseTalk 500, DiffSpeaker 1000.
  d.num_train_timesteps = 500 if diffposetalk or (facediffuser and dataset.name == "biwi") else 1000
  # Betas: DiffSpeaker scaled_linear 0.00085 -> 0.012; FaceDiffuser and DiffPoseTalk cosine
  # (squaredcos_cap_v2).
  d.beta_schedule = "scaled_linear" if args.variant == "diffspeaker" else "squaredcos_cap_v2"
  d.beta_start = 0.00085  # First beta of the linear schedules.
  d.beta_end = 0.012  # Last beta of the linear schedules.
  # Rescale the betas to zero terminal SNR (Lin et al. 2023), not in DiffSpeaker: its
  # scaled_linear x_T keeps 7% of the signal, which over 15069 offsets a denoiser reads (its
  # x_0 from x_T was 0.2 mm^2 off on the twin), while sampling from pure noise gave a worse
  # LVE than the mean motion. The cosine schedules end near zero already.
  d.zero_terminal_snr = args.variant == "diffspeaker"
  d.prediction_type = "sample"  # The denoiser predicts x_0 (all three references), or epsilon, v.
  d.min_snr_gamma = 0.0  # Min-SNR-gamma loss weights (0: uniform over timesteps).
  d.sample_scale = 1000.0  # x_0 = offsets in mm (metre vertices): a spread near the unit noise's.
  # Classifier-free guidance: per condition, the training chance of its learned null embedding,
  # and the sampling scale (1: off). DiffPoseTalk drops audio 10% and style 45% and samples at
  # 1.15 and 3 (sequential rule: audio, then style); DiffSpeaker codes guidance but samples
  # unguided; FaceDiffuser has none.
  d.audio_drop_probability = 0.0 if facediffuser else 0.1
  d.style_drop_probability = 0.45 if diffposetalk else 0.0 if facediffuser else 0.1
  d.audio_guidance_scale = 1.15 if diffposetalk else 1.0
  d.style_guidance_scale = 3.0 if diffposetalk else 1.0
  # Windows (DiffPoseTalk): frames sampled per window at prediction, each window conditioned on
  # the last `previous_frames` sampled before it (a learned start for the first); training
  # examples are the previous frames then a window (data.window_frames = their sum), the
  # previous ones replaced by the start with `previous_drop_probability`. 0 / 0: the whole
  # sequence at once (window_frames > 0 alone: independent windows).
  d.window_frames = 100 if diffposetalk else 0
  d.previous_frames = 10 if diffposetalk else 0
  d.previous_drop_probability = 0.5  # DiffPoseTalk: one clip in two starts from the start.
  if diffposetalk:
    c.data.window_frames = d.window_frames + d.previous_frames
    d.audio_conditioning = "aligned"  # DiffPoseTalk: each frame reads its own audio feature.
  # Sampling at evaluation and prediction: DiffSpeaker DDIM over 50 of the training steps;
  # FaceDiffuser and DiffPoseTalk the full ancestral chain (ddpm over all the steps, slow on a
  # CPU; fewer steps respace it).
  d.sampling_method = "ddim" if args.variant == "diffspeaker" else "ddpm"
  # Denoising steps at prediction (a subset of the training steps).
  d.sampling_steps = 50 if args.variant == "diffspeaker" else d.num_train_timesteps
  if args.runlocal:
    d.sampling_steps = 5
  d.eta = 0.0  # DDIM's noise (0: deterministic given the initial noise).
  # How the sampling steps are picked from the training steps: trailing starts at the last
  # timestep, where x_T is pure noise (Lin et al. 2023; leading starts at 980 of 1000).
  d.timestep_spacing = "trailing"
  d.sample_seed = 0  # Noise key of evaluation and `predict` (no `sample` rng given).
  # Sample on the denoiser's projected input (the same samples up to float rounding, without
  # the V*3-wide projections in the loop); False: on x_t itself.
  d.projected_sampling = True
  # Samples per test sequence at evaluation (seeds sample_seed + n): the table reports the first
  # sample's metrics, their mean over the samples, and the samples' diversity (2 or more).
  c.data.eval_num_samples = 2 if args.runlocal else 3


def audio2mesh_config(dataset: ConfigDict, args: ConfigDict) -> ConfigDict:
  """The base config specialised to speech-driven animation on `dataset`."""
  if args.variant not in VARIANTS:
    raise ValueError(f"variant={args.variant!r}: expected one of {VARIANTS}")
  if args.encoder not in ("base", "tiny"):
    raise ValueError(f"encoder={args.encoder!r}: expected base or tiny")
  if args.causal and args.variant != "faceformer":
    raise ValueError(
      f"causal=True with variant={args.variant!r}: only the faceformer decoder predicts frame "
      "by frame, which streaming needs"
    )
  c = base_config()
  # CodeTalker's stage 1 reconstructs motion without audio: a task of its own.
  c.task = "motion_vq" if args.variant == "codetalker_vq" else "audio2mesh"
  c.data.update(dataset)
  c.data.synthetic = "tiny" if args.runlocal else "demo"  # Twin to write when no data is found.
  c.data.raw_dir = ""  # Raw download (or twin) directory; "" = the twin's cache directory.
  c.data.data_dir = ""  # Built array_record directory; "" = the twin's cache directory.
  c.data.skip_invalid = False  # Skip (and count) invalid examples instead of failing the build.
  # Longest training sentence when data.window_frames=0 (whole sentences, as FaceFormer trains:
  # each batch padded to its longest); longer ones give a random window of this many frames.
  c.data.max_frames = 600
  c.data.eval_split = "test"  # Split evaluated with whole sequences.
  c.data.eval_batch_size = 4  # Whole sequences per evaluation batch (padded to the longest).
  c.data.eval_style = 0  # Speaking style used for speakers unseen in training.
  c.data.lip_mask = "regions/lips.txt"  # Lip vertex indices (relative paths: in raw_dir).
  c.data.upper_face_mask = "regions/upper_face.txt"  # Upper-face vertex indices, likewise.

  c.model.encoder = ConfigDict()
  c.model.encoder.variant = args.encoder  # wav2vec2 size: base or tiny.
  c.model.encoder.checkpoint = ""  # Local HF wav2vec2/HuBERT directory whose weights to load.
  # One scanned transformer layer over stacked weights (compiles in a fraction of the time) or
  # the layers unrolled (steps about 7-11% faster on a CPU, docs/benchmarks.md).
  c.model.encoder.scan_layers = True
  c.model.decoder = ConfigDict()
  c.model.decoder.kind = args.variant  # Decoder family (see the module docstring).
  c.model.decoder.variant = dataset.decoder_variant  # Named size of the decoder.
  c.model.decoder.num_styles = len(dataset.train_subjects)  # One style per training speaker.
  c.model.prior_workdir = ""  # CodeTalker stage 2: workdir of the finished stage-1 run.
  # Weights to start from, `SOURCE[:SUBTREE]` specs (fdjax/pretrained.py), e.g.
  # `runs/other:encoder`; "" = none beyond encoder.checkpoint and prior_workdir.
  c.model.init_from = ""
  if args.variant == "codetalker":
    c.model.decoder.prior = ConfigDict()  # Overrides of the stage-1 VQ-VAE's fields.
    c.optim.freeze = ("^decoder/prior/",)
  if args.variant not in ("faceformer", "facediffuser"):
    c.model.decoder.period = dataset.decoder_period  # Period of positional encoding/bias.
  if args.variant in DIFFUSION_VARIANTS:
    _diffusion_config(c, dataset, args)
  if args.encoder == "base":
    # Pretrained encoders keep their conv feature extractor frozen, as FaceFormer does; the
    # causal variant's per-frame conv-0 norm replaces the pretrained group norm, so it trains.
    if args.causal:
      c.optim.freeze = (*c.optim.freeze, r"^encoder/feature_extractor/conv_layers_\d+/conv/")
    else:
      c.optim.freeze = (*c.optim.freeze, "^encoder/feature_extractor/")
  c.model.encoder.frame_alignment = dataset.frame_alignment  # Features to mesh frames.
  c.model.encoder.audio_frames_per_frame = dataset.audio_frames_per_frame  # For "pairs".
  c.model.encoder.causal = args.causal  # No frame depends on later audio (streaming).
  # One audio feature per mesh frame (VOCASET): a causal encoder resamples its conv features to
  # the mesh frame rate before the transformer, as FaceFormer interpolates them offline, so the
  # transformer runs at the mesh frame rate; 0 = at the audio frame rate (BIWI's pairs).
  resample = args.causal and dataset.frame_alignment == "interpolate"
  c.model.encoder.fps = dataset.fps if resample else 0.0
  c.model.encoder.sample_rate = dataset.sample_rate  # Where mesh frames fall, with fps.
  # Transformer frames (1 s: mesh frames when resampled, else 50 audio frames) each frame
  # attends to when causal; 0 = whole clip.
  window = round(dataset.fps) if resample else _AUDIO_FRAMES_PER_SECOND
  c.model.encoder.attention_window = window if args.causal else 0
  if args.causal:
    # wav2vec2-base's conv-0 group norm spans the whole clip; a per-frame norm replaces it.
    c.model.encoder.feat_extract_norm = "frame"
  if args.variant == "faceformer":
    # Frames each frame attends to (bounded key/value cache) when causal: one training window.
    c.model.decoder.cache_window = dataset.window_frames if args.causal else 0
    # What frame t is fed in training: FaceFormer's published setting, "autoregressive" (its
    # own predictions, back-propagated through the rollout); or "teacher_forcing" (the truth,
    # one parallel pass) or "scheduled_sampling" (the truth with the probability below).
    c.model.decoder.training = "autoregressive"
    # Scheduled sampling's probability of feeding the truth at each training step: an optax
    # schedule and its arguments (transition_steps=0: total_steps), 1 -> 0 linearly by default.
    c.model.decoder.sampling_schedule = "linear_schedule"
    c.model.decoder.sampling_schedule_kwargs = ConfigDict(
      {"init_value": 1.0, "end_value": 0.0, "transition_steps": 0}
    )
  # Mesh frames per chunk of `fdjax export`'s stream_step; 0 = the shortest exact chunk (3
  # frames = 1600 samples at 30 fps, 1 frame = 640 samples at 25 fps).
  c.model.stream_chunk_frames = 0

  c.loss = ConfigDict()
  c.loss.velocity_weight = 1.0  # Weight of the velocity (frame difference) MSE.
  c.loss.lip_weight = 1.0  # Weight of lip vertices in both MSEs (1: unweighted).
  c.loss.latent_weight = 1.0  # CodeTalker stage 2: weight of the latent regression.
  if args.variant in DIFFUSION_VARIANTS:
    # Distance of the vertex and velocity terms on the implied x_0: l2, l1 or huber
    # (FaceDiffuser's, on vertex offsets in mm here).
    c.loss.distance = "huber" if args.variant == "facediffuser" else "l2"
    # Weight of the loss on the denoiser's own target besides the x_0 terms (0: none; the x_0
    # models' target is x_0 itself).
    c.loss.target_weight = 0.0

  c.optim.optimizer = "adam"
  c.optim.lr = 1e-4 if args.encoder == "base" else 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.end_lr_factor = 0.05
  c.optim.clip_norm = 1.0
  c.batch_size = 8
  c.total_steps = 20000 if args.encoder == "base" else 1000
  c.log_every = 50
  c.eval_every = 0 if args.encoder == "tiny" else 5000
  c.checkpoint.every = 1000
  c.sweep_metric = "lve_squared"
  c.sweep_mode = "min"
  if args.runlocal:
    c.total_steps = args.steps or 40
    c.batch_size = 8
    c.log_every = 10
    c.checkpoint.every = 0
    c.data.eval_batch_size = 2
  elif args.steps:
    c.total_steps = args.steps
  if args.variant in DIFFUSION_VARIANTS:
    # Exponential moving average of the parameters, evaluated and exported (as the diffusion
    # papers sample from), over the last tenth of the run: 0.999 from 10000 steps on, 0.99 at
    # 1000 (0.999 there would keep 37% of the initial weights); 0.9 for runlocal's few steps.
    c.ema.decay = 0.9 if args.runlocal else min(0.999, 1.0 - 10.0 / c.total_steps)
  return c
