"""The config shared by the action-unit (au) experiments: BP4D and DISFA layouts.

The variants and sizes are those of the expression experiments (experiments/dfer/common.py:
clip_linear, clip_text, clip_adapter, clip_lora, vivit_scratch, vit_mae_probe,
vit_mae_finetune; base = CLIP ViT-B/16 from
`--config.model.clip_checkpoint=DIR`, tiny = the CPU-sized CLIP from its random initialisation),
with one logit per action unit. A training example is T consecutive frames centred on a coded
frame, and the target is that frame's AU occurrence; the text classifier compares the clip
embedding with descriptions of each AU (FACS names).

Cross-validation: `fdjax train --config ... --workdir W --folds all` runs the three
subject-exclusive folds in W/fold1..fold3 and writes W/folds_summary.{json,md}.
"""

from ml_collections import ConfigDict

from experiments.dfer.common import video_config

# FACS names of the action units, for the text classifier's prompts.
FACS_NAMES = {
  1: "inner brow raiser",
  2: "outer brow raiser",
  4: "brow lowerer",
  5: "upper lid raiser",
  6: "cheek raiser",
  7: "lid tightener",
  9: "nose wrinkler",
  10: "upper lip raiser",
  12: "lip corner puller",
  14: "dimpler",
  15: "lip corner depressor",
  17: "chin raiser",
  20: "lip stretcher",
  23: "lip tightener",
  24: "lip pressor",
  25: "lips part",
  26: "jaw drop",
}


def au_prompts(aus) -> ConfigDict:
  """Two prompts per AU, keyed `AU<n>` as the task names them."""
  prompts = ConfigDict()
  for au in aus:
    if au not in FACS_NAMES:
      raise ValueError(f"no FACS name for AU{au}; add it to FACS_NAMES")
    prompts[f"AU{au}"] = (
      f"a face with the {FACS_NAMES[au]}.",
      f"a photo of AU{au}, {FACS_NAMES[au]}.",
    )
  return prompts


def au_config(dataset: ConfigDict, args: ConfigDict) -> ConfigDict:
  """The base config specialised to action-unit detection on `dataset`."""
  c = video_config(dataset, args, "au")
  if c.model.kind == "clip":
    c.model.prompts = au_prompts(dataset.aus)
  # AU appearance is local: milder crops keep the brows and the chin in the frame.
  c.data.augment.scale = (0.8, 1.0)
  # Label efficiency: train on the windows of this many of the training split's subjects, the
  # same ones for every seed (fdjax.tasks.au.train_indices); 0 trains on every subject.
  c.data.train_subjects = 0
  c.loss = ConfigDict()
  c.loss.positive_weighting = True  # Weight each AU's positives by (1 - p) / p of training.
  c.loss.max_positive_weight = 10.0  # Cap of those weights (rare AUs).
  c.loss.threshold = 0.5  # Probability at which an AU counts as detected (F1).
  c.sweep_metric = "au_f1"
  c.sweep_mode = "max"
  return c
