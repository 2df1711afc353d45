"""Self-supervised masked-autoencoder pretraining on face video (task `mae_video`).

Variants (`variant=`), after their papers:
  marlin    face_region masking ("fasking") at 0.9, raw-pixel MSE plus a patch discriminator's
            adversarial term (weight 0.01), AdamW (0.9, 0.95), lr 1.5e-4 x batch / 256, warmup
            then cosine; 224 px, 16 frames, tubelets 2x16x16. Needs `face_parts` in the data.
  mae_dfer  part_window masking at 0.9 (tubes inside local windows), per-patch normalised
            pixels plus frame-difference targets (weight 0.5); 160 px.
  videomae  tube masking at 0.9, per-patch normalised pixels; 224 px.
Sizes (`size=`): S, B, L (encoders of `fdjax.models.video_mae.ENCODER_VARIANTS`, decoders of 4
blocks) and `tiny` (32 px, patches of 8, CPU-sized). `runlocal=True` shrinks data, frames and
steps for tests; `steps=` overrides the step count.

Data: `config.data.name` defaults to `voxceleb2` (examples with `video` and `face_parts`; the
builder data_pipelines/builders/voxceleb2.py). Any video builder works for the variants that
do not read face parts, e.g. the labelled DFEW twin with its labels ignored:

    fdjax train --config experiments/pretrain/voxceleb2.py:variant=videomae,size=tiny \\
        --config.data.name=dfew --config.data.train_split=fold1_train \\
        --config.data.eval_split=fold1_test --workdir runs/mae_tiny

or `dataset=dfew` as an argument, which sets those three keys. On the DFEW twin, whose clips
differ far more in background, skin and light than in expression, add
`--config.model.subtract_mean_frame=True --config.loss.target=mean_subtracted_pixels` (the
encoder sees frames minus the clip's mean frame, and reconstructs them; docs/design.md
section 21), and the same `subtract_mean_frame` in the probe or fine-tuning.

ViT-B MARLIN on real data:

    fdjax train --config experiments/pretrain/voxceleb2.py:variant=marlin,size=B \\
        --config.data.raw_dir=/path/to/voxceleb2 --config.data.data_dir=/path/to/tfds \\
        --workdir runs/marlin_b

The pretrained encoder is the `encoder` subtree of the run's parameters (its EMA when
`config.ema.decay > 0`); it loads into `fdjax.models.video_mae.VideoViTClassifier` for linear
probing or fine-tuning by `--config.model.init_from=<this workdir>` with the `vit_mae_probe` and
`vit_mae_finetune` variants of experiments/dfer/ and experiments/au/.
"""

from ml_collections import ConfigDict

from fdjax.config import base_config, parse_arg
from fdjax.models.video_mae import ENCODER_VARIANTS

VARIANTS = ("marlin", "mae_dfer", "videomae")
SIZES = ("tiny", "S", "B", "L")
# Split names per dataset (`{fold}` filled from data.fold).
SPLITS = {
  "voxceleb2": ("train", "validation"),
  "dfew": ("fold{fold}_train", "fold{fold}_test"),
  "bp4d": ("fold{fold}_train", "fold{fold}_test"),
}


def get_config(arg=None):
  args = parse_arg(arg, variant="videomae", size="B", dataset="voxceleb2", runlocal=False, steps=0)
  if args.variant not in VARIANTS:
    raise ValueError(f"variant={args.variant!r}: expected one of {VARIANTS}")
  if args.size not in SIZES:
    raise ValueError(f"size={args.size!r}: expected one of {SIZES}")
  if args.dataset not in SPLITS:
    raise ValueError(f"dataset={args.dataset!r}: expected one of {sorted(SPLITS)}")
  tiny = args.size == "tiny"
  c = base_config()
  c.task = "mae_video"

  c.data.name = args.dataset  # TFDS video builder (data_pipelines/builders/<name>.py).
  c.data.fold = 1  # Fold of datasets with folds (dfew), for the split names.
  c.data.train_split, c.data.eval_split = SPLITS[args.dataset]  # TFDS splits.
  c.data.num_frames = 4 if args.runlocal else 16  # T: frames per clip.
  c.data.frame_stride = 2  # Frames between sampled frames (VideoMAE's sampling rate).
  c.data.augment = ConfigDict()  # Training crops: one random resized crop per clip.
  c.data.augment.scale = (0.6, 1.0)  # Area share range of the crop.
  c.data.augment.ratio = (3 / 4, 4 / 3)  # Aspect range of the crop.
  c.data.augment.flip_prob = 0.5  # Probability of mirroring a clip.
  c.data.crop_fraction = 1.0  # Evaluation: side of the centred crop, share of the frame.
  c.data.eval_batch_size = 8 if tiny else 16  # Clips per evaluation batch.
  c.data.eval_max_examples = 64 if tiny else 512  # Evaluation clips (0: the whole split).
  c.data.builder_config = ""  # TFDS builder config ("": the one built).
  c.data.synthetic = "tiny" if args.runlocal else "demo"  # Twin to write when no data is found.
  c.data.raw_dir = ""  # Raw download (or twin) directory; "" = the twin's cache directory.
  c.data.data_dir = ""  # Built array_record directory; "" = the twin's cache directory.
  c.data.skip_invalid = False  # Skip (and count) invalid examples instead of failing the build.

  c.model = ConfigDict()  # fdjax.models.video_mae.video_mae_model(variant, **rest).
  c.model.variant = args.size  # Named encoder and decoder size.
  c.model.init_from = ""  # Weights to start from (fdjax/pretrained.py specs); "" = none.
  c.model.image_size = 32 if tiny else (160 if args.variant == "mae_dfer" else 224)  # Pixels.
  c.model.patch_size = ENCODER_VARIANTS[args.size]["patch_size"]  # Patch side in pixels.
  c.model.remat = args.size in ("B", "L")  # Recompute block activations in the backward pass.
  c.model.discriminator_width = 0  # Patch discriminator's hidden width (0: none).
  # Encoder input minus the clip's mean frame (pair with loss.target=mean_subtracted_pixels).
  c.model.subtract_mean_frame = False
  # Convolutional stem stages on every frame before the tubelets, masked as ConvMAE's (e.g.
  # (32, 64): tokens of patch / 4 feature-map cells); fdjax.models.video_mae.VideoViTEncoder.
  c.model.stem_widths = ()

  c.mask = ConfigDict()
  c.mask.kind = {"marlin": "face_region", "mae_dfer": "part_window", "videomae": "tube"}[
    args.variant
  ]  # fdjax.masking kind.
  c.mask.ratio = 0.9  # Share of tokens masked.
  # part_window's (rows, columns) of tokens per window: 5x5 of MAE-DFER's 10x10 grid at 160 px;
  # 2x2 on tiny's 4x4 grid, where 0.75 masks 3 of every 4.
  c.mask.window = (2, 2) if tiny else (5, 5)
  if tiny and args.variant == "mae_dfer":
    c.mask.ratio = 0.75

  c.loss = ConfigDict()
  # MSE target: pixels, normalized_pixels or mean_subtracted_pixels (fdjax.tasks.mae_video).
  c.loss.target = "pixels" if args.variant == "marlin" else "normalized_pixels"
  c.loss.frame_difference_weight = 0.5 if args.variant == "mae_dfer" else 0.0  # Motion share.
  c.loss.adversarial_weight = 0.01 if args.variant == "marlin" else 0.0  # Generator term.
  if args.variant == "marlin":
    c.model.discriminator_width = 64 if tiny else 256

  c.batch_size = 8 if args.runlocal else (32 if tiny else 256)
  c.optim.optimizer = "adamw"
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.lr = 1.5e-4 * c.batch_size / 256  # MARLIN's / VideoMAE's linear scaling rule.
  c.optim.weight_decay = 0.05
  c.optim.schedule = "cosine"
  c.total_steps = 100_000 if not tiny else 2000
  c.optim.warmup_steps = c.total_steps // 20
  c.optim.end_lr_factor = 0.01
  c.optim.clip_norm = 0.0
  c.log_every = 50
  c.eval_every = 5000 if not tiny else 500
  c.checkpoint.every = 5000 if not tiny else 0
  if tiny:
    c.optim.lr = 1e-3  # The tiny model on a small twin learns faster than the scaling rule.
  if args.runlocal:
    c.total_steps = args.steps or 40
    c.optim.warmup_steps = 5
    c.log_every = 5
    c.eval_every = 0
    c.data.eval_batch_size = 8
    c.data.eval_max_examples = 8
  elif args.steps:
    c.total_steps = args.steps
  return c
