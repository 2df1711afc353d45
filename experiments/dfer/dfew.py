"""Dynamic facial expression recognition on DFEW (7 classes, 5-fold cross-validation).

The demo, on the synthetic twin (built on first use), with the CPU-sized CLIP:

    fdjax train --config experiments/dfer/dfew.py:variant=clip_adapter,size=tiny \\
        --workdir runs/dfew_adapter

All five folds, then the mean +/- std summary in runs/dfew_adapter_folds/folds_summary.md:

    fdjax train --config experiments/dfer/dfew.py:variant=clip_adapter,size=tiny \\
        --workdir runs/dfew_adapter_folds --folds all

CLIP ViT-B/16 from a local Hugging Face directory, on the real data stored at 256 pixels for
224-pixel crops (`data_pipelines.builders.dfew.build(raw_dir, data_dir, frame_size=256)`; the
128-pixel build that `fdjax data build` makes is upscaled otherwise):

    fdjax train --config experiments/dfer/dfew.py:variant=clip_adapter \\
        --config.model.clip_checkpoint=/path/to/clip-vit-base-patch16 \\
        --config.data.raw_dir=/path/to/DFEW --config.data.data_dir=/path/to/tfds \\
        --config.data.builder_config=256px_32f --workdir runs/dfew_b16 --folds all

A masked-autoencoder encoder (a `mae_video` run, experiments/pretrain/voxceleb2.py), probed
linearly or fine-tuned with layer-wise lr decay on all five folds; `init_from` is the pretraining
workdir as is (its `encoder`, its EMA if it kept one):

    fdjax train --config experiments/pretrain/voxceleb2.py:variant=videomae,size=B \
        --workdir runs/videomae_b
    fdjax train --config experiments/dfer/dfew.py:variant=vit_mae_finetune \
        --config.model.init_from=runs/videomae_b --workdir runs/dfew_videomae_ft --folds all

(`variant=vit_mae_probe` for the linear probe; `size=tiny` with a `size=tiny` pretraining for the
CPU-sized demo.)

Arguments: variant (clip_linear, clip_text, clip_adapter, clip_lora, vivit_scratch,
vit_mae_probe, vit_mae_finetune), size
(base, small, tiny), frames (T, 16), fold (1-5), runlocal (tiny data and steps, for tests), steps
(override total_steps). See experiments/dfer/common.py.
"""

from ml_collections import ConfigDict

from data_pipelines.builders import dfew
from experiments.dfer.common import dfer_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(
    arg, variant="clip_adapter", size="base", frames=16, fold=1, runlocal=False, steps=0
  )
  dataset = ConfigDict()
  dataset.name = "dfew"  # TFDS builder data_pipelines/builders/dfew.py.
  dataset.class_names = dfew.CLASS_NAMES  # Label i is class_names[i].
  dataset.num_folds = dfew.NUM_FOLDS  # Folds of the cross-validation protocol.
  dataset.train_split = "fold{fold}_train"  # Split names, `{fold}` filled from data.fold.
  dataset.eval_split = "fold{fold}_test"
  return dfer_config(dataset, args)
