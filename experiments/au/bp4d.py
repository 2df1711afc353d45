"""Action-unit detection on BP4D (12 AUs, 3 subject-exclusive folds).

The demo, on the synthetic twin (built on first use), with the CPU-sized CLIP:

    fdjax train --config experiments/au/bp4d.py:variant=clip_adapter,size=tiny \\
        --workdir runs/bp4d_adapter [--folds all]

CLIP ViT-B/16 from a local Hugging Face directory, on the real data:

    fdjax train --config experiments/au/bp4d.py:variant=clip_adapter \\
        --config.model.clip_checkpoint=/path/to/clip-vit-base-patch16 \\
        --config.data.raw_dir=/path/to/BP4D --config.data.data_dir=/path/to/tfds \\
        --workdir runs/bp4d_b16 --folds all

A `mae_video` pretraining run's encoder (experiments/pretrain/voxceleb2.py), fine-tuned with
layer-wise lr decay (or `variant=vit_mae_probe`, linearly probed) on the three folds:

    fdjax train --config experiments/au/bp4d.py:variant=vit_mae_finetune \
        --config.model.init_from=runs/videomae_b --workdir runs/bp4d_videomae_ft --folds all

On the twin (a built demo set in D), the tiny MAE encoder with a convolutional stem, pretrained
on fold 1's training windows without their labels, then fine-tuned (docs/design.md section 21:
held-out mean AU F1 0.75 on fold 1; `--config.data.train_subjects=3` trains on three subjects'
labels only):

    D="--config.data.raw_dir=D/raw --config.data.data_dir=D/tfds \\
        --config.data.builder_config=64px_16f"
    M="--config.model.image_size=48 --config.model.stem_widths=(32,64)"
    PRE=variant=videomae,size=tiny,dataset=bp4d,steps=3000
    fdjax train --config experiments/pretrain/voxceleb2.py:$PRE $D $M --config.data.num_frames=2 \\
        --config.data.frame_stride=1 --config.mask.ratio=0.75 --workdir runs/bp4d_mae_stem
    FT=variant=vit_mae_finetune,size=tiny,frames=2,steps=4000
    fdjax train --config experiments/au/bp4d.py:$FT $D $M \\
        --config.model.init_from=runs/bp4d_mae_stem --workdir runs/bp4d_mae_stem_ft

Arguments: variant (clip_linear, clip_text, clip_adapter, clip_lora, vivit_scratch,
vit_mae_probe, vit_mae_finetune), size
(base, small, tiny), frames (T consecutive frames, 8), fold (1-3), runlocal, steps. See
experiments/au/common.py.
"""

from ml_collections import ConfigDict

from data_pipelines.builders import bp4d
from experiments.au.common import au_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(
    arg, variant="clip_adapter", size="base", frames=8, fold=1, runlocal=False, steps=0
  )
  dataset = ConfigDict()
  dataset.name = "bp4d"  # TFDS builder data_pipelines/builders/bp4d.py.
  dataset.aus = bp4d.AUS  # Action units, in the order of the `aus` label vector.
  dataset.num_folds = len(bp4d.PARTS)  # Subject-exclusive folds.
  dataset.train_split = "fold{fold}_train"  # Split names, `{fold}` filled from data.fold.
  dataset.eval_split = "fold{fold}_test"
  return au_config(dataset, args)
