"""Audio-driven talking-head video on HDTF (or its synthetic twin): the two-stage line.

Stages (`stage=`), each a function of this file's `STAGES` with its own arguments (stage 2,
`audio2motion`, is experiments/talking_head/hdtf_audio2motion.py's):
  motion_ae  stage 1, task `face_motion_ae`: a LIA-style appearance / motion autoencoder
             (`fdjax.models.face_motion.FaceMotionAE`, 20-d motion code) trained on random
             (source, driving) frame pairs of a clip; multi-scale L1 + SSIM + a PatchGAN term
             (weight 0.01), Adam (0.5, 0.999), EMA of the parameters. Arguments: `size=64|128`
             (pixels; 128 adds a scale to every network), `dataset=hdtf|voxceleb2`,
             `runlocal=True` (tiny twin, a tiny model, a few steps: tests), `steps=` (override).

On the twin (written and built on first use; `fdjax data synth hdtf --size demo` writes it
ahead):

    fdjax train --config experiments/talking_head/hdtf.py:stage=motion_ae,size=64 \\
        --workdir runs/motion_ae_64

On real HDTF (processed clips `<Source>_<Name>_<NNN>.mp4` in one directory):

    fdjax train --config experiments/talking_head/hdtf.py:stage=motion_ae,size=128 \\
        --config.data.raw_dir=/path/to/hdtf --config.data.data_dir=/path/to/tfds \\
        --config.data.synthetic= --workdir runs/motion_ae_128

Evaluation (at the end and every `eval_every` steps) reports reconstruction PSNR / SSIM on the
held-out identities against repeating the source frame, and cross-identity reenactment judged by
the twin probes (`data.reenactment`; the mouth probe needs clips with ground truth, which real
HDTF lacks). `fdjax.tasks.face_motion_ae.load(workdir)` gives a trained run to stage 2.
"""

from ml_collections import ConfigDict

from experiments.talking_head import hdtf_audio2motion
from fdjax.config import base_config, parse_arg

DATASETS = ("hdtf", "voxceleb2")
# (train split, evaluation split) per dataset: held-out identities.
SPLITS = {"hdtf": ("train", "test"), "voxceleb2": ("train", "validation")}


def data_config(dataset: str, runlocal: bool) -> ConfigDict:
  """The `config.data` keys the talking-head stages share."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r}: expected one of {DATASETS}")
  d = ConfigDict()
  d.num_workers = 0  # Grain worker processes.
  d.shuffle = True  # Shuffle the training clips every epoch.
  d.name = dataset  # TFDS talking-face builder (data_pipelines/builders/<name>.py).
  d.fold = 1  # Unused (no folds); read by the shared split naming.
  d.train_split, d.eval_split = SPLITS[dataset]  # TFDS splits (eval: held-out identities).
  d.builder_config = ""  # TFDS builder config ("": the one built).
  d.synthetic = "tiny" if runlocal else "demo"  # Twin to write when no data is found.
  d.raw_dir = ""  # Raw download (or twin) directory; "" = the twin's cache directory.
  d.data_dir = ""  # Built array_record directory; "" = the twin's cache directory.
  d.skip_invalid = False  # Skip (and count) invalid examples instead of failing the build.
  return d


def motion_ae_config(arg: str | None) -> ConfigDict:
  """Stage 1: task `face_motion_ae` (module docstring)."""
  args = parse_arg(arg, stage="motion_ae", size=64, dataset="hdtf", runlocal=False, steps=0)
  if args.size not in (64, 128):
    raise ValueError(f"size={args.size}: expected 64 or 128")
  c = base_config()
  c.task = "face_motion_ae"
  c.data = data_config(args.dataset, args.runlocal)
  c.data.flip_prob = 0.5  # Probability of mirroring a training pair (both frames alike).
  c.data.eval_frames = 8  # Driving frames per evaluation clip (spread over the clip).
  c.data.eval_batch_size = 32  # Frames per evaluation batch.
  c.data.eval_max_examples = 0 if not args.runlocal else 4  # Evaluation clips (0: all).
  # Cross-identity reenactment judged by fdjax.metrics.talking_face's probes (needs two
  # identities in the evaluation split).
  c.data.reenactment = args.dataset == "hdtf"
  # Training clips (every 2nd frame) fitting the mouth probe.
  c.data.probe_clips = 64 if not args.runlocal else 8

  c.model = ConfigDict()  # fdjax.models.face_motion.FaceMotionAE fields.
  c.model.init_from = ""  # Weights to start from (fdjax/pretrained.py specs); "" = none.
  tiny = args.runlocal
  c.model.image_size = 32 if tiny else args.size  # S: frames are S x S (runlocal: 32).
  # 64 px is sized to train on a CPU in about 15 minutes; 128 px adds a scale and width.
  small = args.size == 64
  c.model.widths = (8, 16) if tiny else ((16, 32, 64) if small else (32, 64, 128, 256))
  c.model.motion_widths = (
    (8, 16) if tiny else ((8, 16, 32, 64) if small else (16, 32, 64, 128, 256))
  )
  c.model.motion_hidden = 32 if tiny else 128  # Motion encoder's MLP width.
  c.model.latent_dim = 32 if tiny else 128  # L: the latent of the motion directions.
  c.model.motion_dim = 20  # D: the motion code stage 2 models.
  # PatchGAN channels.
  c.model.discriminator_widths = (8, 16) if tiny else ((16, 32, 64) if small else (32, 64, 128))
  # Initial logit of the last mask (warped source against generated image): 0 weighs them
  # alike, so the generated image that must paint an opening mouth starts with half the say
  # (the model's default, 2, starts at 0.88 towards the source; docs/design.md section 22).
  c.model.image_mask_bias = 0.0

  c.loss = ConfigDict()
  c.loss.scales = 3  # Image scales of the L1 term (full, 1/2, 1/4).
  c.loss.l1_weight = 1.0  # Multi-scale L1.
  c.loss.ssim_weight = 0.5  # 1 - SSIM.
  c.loss.adversarial_weight = 0.01  # Generator's PatchGAN term (0: no discriminator).

  c.batch_size = 8 if tiny or small else 16
  c.optim.optimizer = "adam"
  c.optim.b1, c.optim.b2 = 0.5, 0.999  # GAN-style Adam (LIA, FOMM).
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20
  c.optim.end_lr_factor = 0.1
  c.ema.decay = 0.99  # Evaluation, export and stage 2 use the EMA.
  c.ema.start_step = 100
  c.total_steps = 1000 if small else 20000
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint.every = 500
  if args.runlocal:
    c.total_steps = 4
    c.optim.warmup_steps = 0
    c.ema.decay, c.ema.start_step = 0.0, 0
    c.log_every = 1
    c.checkpoint.every = 0
  if args.steps:
    c.total_steps = args.steps
  return c


# Stage name -> config function of the full argument string.
STAGES = {"motion_ae": motion_ae_config, "audio2motion": hdtf_audio2motion.get_config}


def get_config(arg=None):
  stage = "motion_ae"
  for item in (arg or "").split(","):
    key, _, value = item.partition("=")
    if key == "stage":
      stage = value
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}: expected one of {sorted(STAGES)}")
  return STAGES[stage](arg)
