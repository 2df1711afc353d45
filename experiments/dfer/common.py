"""The config shared by the video expression (dfer) experiments: DFEW, MAFW and FERV39k layouts.

Variants (`variant=`):
  clip_linear    frozen CLIP image encoder, temporal transformer head, linear classifier
  clip_text      frozen CLIP image and text encoders; the head's clip embedding is compared with
                 text embeddings of class descriptions (`config.model.prompts`), as DFER-CLIP
  clip_adapter   clip_linear plus bottleneck adapters in every image-encoder block (trained)
  clip_lora      clip_linear plus LoRA on the image encoder's query and value projections
  vivit_scratch  a ViViT factorised space-time transformer trained from scratch
                 (`--config.model.subtract_mean_frame=True` feeds it every frame minus the
                 clip's mean frame: on the DFEW twin the tiny one learns the emotions only so,
                 held-out UAR 0.995 against 0.15 on raw frames; docs/design.md section 21)
  vit_mae_probe     linear probe of a `mae_video` pretraining run's encoder: the encoder frozen
                    (no backward pass into it), mean-pooled tokens, fc_norm and a linear head
  vit_mae_finetune  the same encoder fine-tuned whole, with layer-wise lr decay 0.75
                    (`config.optim.layer_decay`, MAE / VideoMAE fine-tuning)
                    (`--config.model.subtract_mean_frame=True` for an encoder pretrained on
                    frames minus their clip's mean frame: on the DFEW demo twin the probe then
                    reaches UAR 0.75-0.77 against 0.57 from a random encoder; design section 21;
                    fine-tuned on the large twin, a VoxCeleb2-twin encoder gives a 5-fold UAR of
                    0.941 and a random one 0.953, and 0.842 against 0.841 with
                    `--config.data.train_examples_per_class=24`, a tenth of the labels)

Sizes (`size=`): `base` is CLIP ViT-B/16 at 224 pixels (or ViViT-B/16x2); real runs start from a
local Hugging Face CLIP directory, `--config.model.clip_checkpoint=/path/to/clip-vit-base-patch16`
(its tokenizer then tokenises the prompts). `tiny` is the CPU-sized CLIP of
`fdjax.models.clip.CLIP_VARIANTS` (32 pixels, 2 blocks, width 64) or ViViT, trained from its
random initialisation under the same freezing rules as `base`: what the tests run. `small` is
the CPU-sized CLIP at 64 pixels (4 blocks, width 128; ViViT stays `tiny`), where the synthetic
faces' brows, lids and lip corners are a few pixels tall rather than one. `runlocal=True`
shrinks data (the `tiny` twin) and steps for tests.

Only adapters, LoRA and the head train in the PEFT variants (`config.optim.freeze`). At B/16
(7 classes), `clip_adapter` (adapter width 64, head width 256) trains 3,307,015 of 89,499,655
parameters (3.70%) and `clip_lora` (rank 8, head width 512) 3,460,615 of 89,653,255 (3.86%);
at the `tiny` size `clip_adapter` trains 62,279 of 177,991 (35.0%: the head dominates a
180k-parameter CLIP). `fdjax.tasks.dfer.parameter_counts` recomputes these from shapes alone,
and every run logs its own counts (metrics.jsonl, split "params").

The vit_mae variants take the pretraining run as `--config.model.init_from=runs/mae_b` (its
`encoder` subtree, or its EMA when it kept one; fdjax/pretrained.py); `init_from` is empty by
default, which trains from a random encoder: a baseline, not a fine-tuning. Sizes map to the
MAE encoders of `fdjax.models.video_mae.ENCODER_VARIANTS`: base = B (224 px), small = S, tiny =
tiny (32 px); the run's encoder fields must match (an error names the one that differs, e.g.
`--config.model.image_size=160` for a mae_dfer run).

`clip_workdir` starts the CLIP towers from a finished fdjax run of the same size (for example
one trained on another dataset), the way `clip_checkpoint` starts them from Hugging Face weights.

Cross-validation: `fdjax train --config ... --workdir W --folds all` runs every fold
(`config.data.fold`) in W/fold1, W/fold2, ... and writes W/folds_summary.{json,md}.
"""

from ml_collections import ConfigDict

from fdjax.config import base_config
from fdjax.models.clip import peft_freeze_patterns
from fdjax.models.video_mae import ENCODER_VARIANTS

VARIANTS = (
  "clip_linear", "clip_text", "clip_adapter", "clip_lora", "vivit_scratch", "vit_mae_probe",
  "vit_mae_finetune",
)  # fmt: skip
# MAE encoder variant per size (fdjax.models.video_mae.ENCODER_VARIANTS).
MAE_SIZES = {"base": "B", "small": "S", "tiny": "tiny"}
SIZES = ("base", "small", "tiny")
# CLIP tower variant per size (fdjax.models.clip.CLIP_VARIANTS).
CLIP_SIZES = {"base": "B/16", "small": "small", "tiny": "tiny"}

# Words and a fine-grained description per expression, for the text classifier's prompts.
EXPRESSIONS = {
  "happiness": ("happy", "a smiling face with raised cheeks and the lip corners pulled up"),
  "sadness": ("sad", "a face with raised inner brows and the lip corners pulled down"),
  "neutral": ("neutral", "a relaxed face with no expression"),
  "anger": ("angry", "a face with lowered, drawn brows and pressed, tightened lips"),
  "surprise": ("surprised", "a face with raised brows, wide open eyes and a dropped jaw"),
  "disgust": ("disgusted", "a face with a wrinkled nose and a raised upper lip"),
  "fear": ("fearful", "a face with raised, drawn brows, wide eyes and stretched lips"),
  "contempt": ("contemptuous", "a face with one lip corner tightened and raised"),
  "anxiety": ("anxious", "a tense face with drawn brows and pressed lips"),
  "helplessness": ("helpless", "a face with raised inner brows and slightly parted lips"),
  "disappointment": ("disappointed", "a face with lowered lip corners and a faint fading smile"),
}
# Class names of the datasets -> the expressions above.
ALIASES = {
  "happy": "happiness",
  "sad": "sadness",
  "angry": "anger",
  "disgusted": "disgust",
  "fearful": "fear",
  "surprised": "surprise",
}


def expression_prompts(class_names) -> ConfigDict:
  """Three prompts per class name: a photo, the emotion's name, and what the face does."""
  prompts = ConfigDict()
  for name in class_names:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in EXPRESSIONS:
      raise ValueError(f"no description for the expression class {name!r}; add it to EXPRESSIONS")
    adjective, description = EXPRESSIONS[key]
    prompts[name] = (f"a photo of a {adjective} face.", f"a face showing {key}.", description + ".")
  return prompts


def video_model_config(variant: str, size: str, num_frames: int) -> tuple[ConfigDict, tuple]:
  """(config.model, config.optim.freeze) of a video variant at a size.

  Shared by the expression and the action-unit experiments.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
  if size not in SIZES:
    raise ValueError(f"size={size!r}: expected one of {SIZES}")
  m = ConfigDict()
  # Weights to start from, `SOURCE[:SUBTREE]` specs (fdjax/pretrained.py), e.g.
  # `runs/dfew_fold1:temporal_head`; "" = none beyond clip_checkpoint / clip_workdir.
  m.init_from = ""
  if variant.startswith("vit_mae"):
    probe = variant == "vit_mae_probe"
    m.kind = "vit_mae"  # fdjax.models.video_mae.VideoViTClassifier.
    m.variant = MAE_SIZES[size]  # Named encoder size; must match the pretraining run's.
    m.image_size = 32 if size == "tiny" else 224  # Frame side in pixels (160: a mae_dfer run).
    m.patch_size = ENCODER_VARIANTS[m.variant]["patch_size"]  # Pixels; as the pretraining run's.
    m.dropout = 0.0 if probe else 0.1  # Dropout on the clip embedding before the head.
    m.stop_backbone_gradient = probe  # Linear probe: no backward pass into the encoder.
    m.remat = size == "base" and not probe  # Recompute block activations in the backward pass.
    # Input minus the clip's mean frame; must match the pretraining run's encoder.
    m.subtract_mean_frame = False
    # Convolutional stem stages before the tubelets (e.g. (32, 64)); must match the pretraining
    # run's encoder.
    m.stem_widths = ()
    return m, (r"^encoder/",) if probe else ()
  if variant == "vivit_scratch":
    m.kind = "vivit"  # fdjax.models.vivit.VideoVisionTransformer, from scratch.
    m.variant = "B/16x2" if size == "base" else "tiny"  # Named ViViT size.
    m.image_size = 224 if size == "base" else 32  # Frame side in pixels.
    m.max_frames = max(num_frames, 16)  # Longest clip (sets the learned temporal positions).
    m.dropout = 0.1  # Dropout before the classifier.
    m.remat = size == "base"  # Recompute activations in the backward pass.
    m.subtract_mean_frame = False  # Input minus the clip's mean frame (only motion remains).
    m.stem_widths = ()  # Convolutional stem stages before the tubelets (e.g. (32, 64)).
    return m, ()
  m.kind = "clip"  # fdjax.models.temporal.VideoClassifier.
  m.variant = CLIP_SIZES[size]  # CLIP towers, fdjax.models.clip.CLIP_VARIANTS.
  m.clip_checkpoint = ""  # Local Hugging Face CLIP directory to start from ("": random init).
  m.clip_workdir = ""  # Or: a finished fdjax run of the same CLIP size to take the towers from.
  m.classifier = "text" if variant == "clip_text" else "linear"  # Linear or prompt similarity.
  m.prompts = ConfigDict()  # Prompts per class name (text classifier), filled by the dataset.
  m.prompt_length = 77 if size == "base" else 24  # Tokens per prompt (CLIP's context is 77).
  m.adapter_dim = 0  # Bottleneck of the image-encoder adapters (0: none).
  m.lora_rank = 0  # LoRA rank on the image encoder (0: none).
  m.lora_alpha = 16.0  # LoRA scale numerator.
  m.lora_targets = ("q_proj", "v_proj")  # Projections with LoRA.
  m.stop_backbone_gradient = variant in ("clip_linear", "clip_text")  # No backward through CLIP.
  m.head_width = {"base": 512, "small": 128, "tiny": 64}[size]  # Temporal transformer width.
  m.head_depth = 1  # Temporal transformer blocks.
  m.head_num_heads = 8 if size == "base" else 4  # Temporal attention heads.
  m.head_mlp_dim = 4 * m.head_width  # Temporal MLP width.
  m.max_frames = max(num_frames, 16)  # Longest clip the temporal head accepts.
  m.pooling = "cls"  # Temporal pooling: learned class token ("cls") or "mean".
  m.dropout = 0.1  # Dropout on the clip embedding before the classifier.
  m.remat = size == "base"  # Recompute the image encoder's activations in the backward pass.
  if variant == "clip_adapter":
    m.adapter_dim = {"base": 64, "small": 32, "tiny": 16}[size]
    if size == "base":
      # Width 512 would make 6.1% of B/16 trainable; 256 keeps the variant under 5% (3.7%).
      m.head_width, m.head_mlp_dim = 256, 1024
  if variant == "clip_lora":
    m.lora_rank = 8
  trainable = ("lora", "adapter", "temporal_head")
  return m, peft_freeze_patterns(trainable)


def video_config(dataset: ConfigDict, args: ConfigDict, task: str) -> ConfigDict:
  """The base config specialised to a video task (`dfer` or `au`) on `dataset`."""
  c = base_config()
  c.task = task
  c.data.update(dataset)
  c.data.fold = args.fold  # Cross-validation fold (1-based); `--folds all` sets it per run.
  c.data.num_frames = args.frames  # T: frames per clip.
  c.data.crop_fraction = 0.875  # Evaluation: side of the centred crop, share of the frame.
  c.data.augment = ConfigDict()  # Training augmentation (data_pipelines.video.train_transform).
  c.data.augment.scale = (0.6, 1.0)  # Area share range of the random resized crop.
  c.data.augment.ratio = (3 / 4, 4 / 3)  # Aspect range of the crop.
  c.data.augment.flip_prob = 0.5  # Probability of mirroring a clip.
  c.data.augment.brightness = 0.3  # Colour jitter strengths.
  c.data.augment.contrast = 0.3
  c.data.augment.saturation = 0.3
  c.data.eval_batch_size = 32  # Clips per evaluation batch.
  c.data.builder_config = ""  # TFDS builder config ("": the one built, e.g. 128px_32f).
  c.data.synthetic = "tiny" if args.runlocal else "demo"  # Twin to write when no data is found.
  c.data.raw_dir = ""  # Raw download (or twin) directory; "" = the twin's cache directory.
  c.data.data_dir = ""  # Built array_record directory; "" = the twin's cache directory.
  c.data.skip_invalid = False  # Skip (and count) invalid examples instead of failing the build.

  c.model, c.optim.freeze = video_model_config(args.variant, args.size, args.frames)

  c.optim.optimizer = "adamw"
  c.optim.lr = 3e-4 if args.size == "base" else 1e-3
  c.optim.weight_decay = 0.05
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 200 if args.size == "base" else 50
  c.optim.end_lr_factor = 0.01
  c.optim.clip_norm = 1.0
  c.batch_size = 32 if args.size == "base" else 16
  c.total_steps = 10000 if args.size == "base" else 1200
  c.log_every = 50
  c.eval_every = 2000 if args.size == "base" else 0
  c.checkpoint.every = 1000 if args.size == "base" else 0
  if args.variant == "vit_mae_probe":
    c.optim.weight_decay = 0.0  # A linear probe is not regularised by decay (MAE's probe).
  if args.variant == "vit_mae_finetune":
    c.optim.layer_decay = 0.75  # Block i of L: lr x 0.75^(L - i) (VideoMAE fine-tuning).
    if args.size == "base":
      c.optim.lr = 1e-3 * c.batch_size / 256  # VideoMAE's base lr 1e-3 per 256 clips.
  if args.runlocal:
    c.total_steps = args.steps or 30
    c.batch_size = 8
    c.optim.warmup_steps = 5
    c.log_every = 10
    c.eval_every = 0
    c.data.eval_batch_size = 8
  elif args.steps:
    c.total_steps = args.steps
  return c


def dfer_config(dataset: ConfigDict, args: ConfigDict) -> ConfigDict:
  """The base config specialised to expression recognition on `dataset`."""
  c = video_config(dataset, args, "dfer")
  # Label efficiency: train on up to this many clips of each class of the training split, the
  # same ones for every seed (fdjax.tasks.dfer.train_subset); 0 trains on every clip.
  c.data.train_examples_per_class = 0
  if c.model.kind == "clip":
    c.model.prompts = expression_prompts(dataset.class_names)
  c.loss = ConfigDict()
  c.loss.label_smoothing = 0.1  # Share of the target spread over all classes.
  c.loss.class_balanced = False  # Weight classes by their effective number of samples.
  c.loss.class_balance_beta = 0.999  # Beta of the effective number (-> 1: inverse frequency).
  c.sweep_metric = "uar"
  c.sweep_mode = "max"
  return c
