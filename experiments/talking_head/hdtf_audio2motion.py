"""Talking-head stage 2 on HDTF (task `audio2motion`): speech to the motion codes of a trained
stage-1 (`face_motion_ae`) run, by a transformer denoiser over windows of codes after the
previous window's last frames (JoyVASA / DiffPoseTalk style), with classifier-free guidance on
the audio.

Arguments: `motion_ae=` the stage-1 workdir (required; also `--config.model.motion_ae`),
`size=` the denoiser (`small`: CPU-sized; `base`: JoyVASA's 6 layers at 512; `tiny`: tests),
`encoder=` the speech encoder (`tiny` from scratch, `base` wav2vec2-base shapes: load weights
with `--config.model.encoder.checkpoint=DIR`, a local HF wav2vec2/HuBERT directory),
`dataset=` (hdtf; voxceleb2 works too, without the twin's ground-truth measures), `runlocal=True`
(the tiny twin, a few steps), `steps=`.

    fdjax train --workdir runs/stage2 \\
        --config experiments/talking_head/hdtf.py:stage=audio2motion,motion_ae=runs/stage1
    fdjax generate --portrait face.png --audio speech.wav --workdir runs/stage2 --out clip.mp4

The data (HDTF's layout, or its synthetic twin when none is given) must be built at the
stage-1 run's frame size.
"""

from ml_collections import ConfigDict

from fdjax.config import base_config, parse_arg

SIZES = ("tiny", "small", "base")


def get_config(arg=None):
  args = parse_arg(
    arg,
    stage="audio2motion",  # As experiments/talking_head/hdtf.py:stage=audio2motion names it.
    motion_ae="",
    size="small",
    encoder="tiny",
    dataset="hdtf",
    runlocal=False,
    steps=0,
  )
  if args.stage != "audio2motion":
    raise ValueError(f"stage={args.stage!r}: this file is stage audio2motion")
  if args.size not in SIZES:
    raise ValueError(f"size={args.size!r}: expected one of {SIZES}")
  if args.encoder not in ("tiny", "base"):
    raise ValueError(f"encoder={args.encoder!r}: expected tiny or base")
  c = base_config()
  c.task = "audio2motion"

  c.data.name = args.dataset  # TFDS builder: talking-face video with its speech.
  c.data.builder_config = ""  # TFDS builder config ("": the one built).
  c.data.train_split = "train"
  c.data.eval_split = "test"  # Held-out identities.
  c.data.sample_rate = 16000  # Audio samples per second.
  c.data.fps = 25.0  # Video frames per second.
  c.data.synthetic = "tiny" if args.runlocal else "demo"  # Twin to write when no data is found.
  c.data.raw_dir = ""  # Raw files (or twin); "" = the twin's cache directory.
  c.data.data_dir = ""  # Built array_record files; "" = the twin's cache directory.
  c.data.skip_invalid = False  # Skip (and count) invalid clips instead of failing the build.
  c.data.eval_max_examples = 4 if args.runlocal else 16  # Held-out clips evaluated (0: all).
  c.data.eval_num_samples = 2 if args.runlocal else 3  # Samples per clip (diversity).
  c.data.probe_frames = 256 if args.runlocal else 3000  # Training frames the mouth probe fits.
  c.data.av_max_lag = 5  # Frames each way the audio-visual offset is searched.

  c.model = ConfigDict()
  c.model.motion_ae = args.motion_ae  # Stage-1 (face_motion_ae) workdir; frozen under motion_ae/.
  # Codes relative to the first frame's (a portrait's when generating), as LIA drives a source.
  c.model.relative_motion = True
  c.model.encoder = ConfigDict()
  c.model.encoder.variant = args.encoder  # wav2vec2 size: base or tiny.
  c.model.encoder.checkpoint = ""  # Local HF wav2vec2/HuBERT directory whose weights to load.
  c.model.encoder.frame_alignment = "interpolate"  # 50 Hz features to one per video frame.
  d = c.model.decoder = ConfigDict()
  d.variant = args.size  # Named denoiser size (fdjax.models.audio2motion).
  d.num_train_timesteps = 500  # Forward process steps (DiffPoseTalk's).
  d.beta_schedule = "squaredcos_cap_v2"  # Cosine schedule.
  d.prediction_type = "sample"  # x_0 target, as JoyVASA and DiffPoseTalk.
  d.sample_scale = 1.0  # Codes times this are diffused (about unit spread of code deltas).
  d.audio_drop_probability = 0.1  # Training: chance an example's audio is the null (CFG).
  # Sampling: the audio's classifier-free guidance scale. On the demo twin (800 steps over a
  # 4000-step stage 1) the rendered mouth follows the truth at -0.21 / 0.32 / 0.42 / 0.43 for
  # 1.5 / 3 / 5 / 8 (docs/design.md section 23); past 5 the codes' error grows.
  d.audio_guidance_scale = 5.0
  d.sampling_method = "ddim"
  d.sampling_steps = 5 if args.runlocal else 20  # DAWN samples 20 steps.
  d.eta = 0.0  # DDIM: deterministic given the initial noise.
  d.sample_seed = 0  # The noise key of evaluation and of predict without seeds.
  d.window_frames = 8 if args.runlocal else 50  # Frames sampled per window.
  d.previous_frames = 2 if args.runlocal else 10  # Last frames of the window before (JoyVASA: 25).
  d.previous_drop_probability = 0.5  # Training: chance a window starts from the learned start.
  c.data.window_frames = d.window_frames + d.previous_frames  # Frames of a training example.

  c.loss = ConfigDict()
  c.loss.velocity_weight = 1.0  # Weight of the code velocity term.
  c.loss.distance = "l2"  # l2, l1 or huber (diffusion.denoising_loss).

  c.optim.freeze = ("^motion_ae/",)  # Stage 1 stays as trained.
  c.optim.lr = 1e-3 if args.size != "base" else 1e-4
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0
  c.ema.decay = 0.999
  c.batch_size = 16
  c.total_steps = args.steps or (4000 if args.size == "small" else 100_000)
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint.every = 1000
  if args.runlocal:
    c.batch_size = 8
    c.total_steps = args.steps or 10
    c.optim.warmup_steps = 2
    c.ema.decay = 0.9
    c.log_every = 5
  return c
