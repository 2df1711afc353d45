"""Action-unit detection on DISFA (8 AUs, occurrence = intensity >= 2, 3 subject-exclusive folds).

The demo, on the synthetic twin (built on first use), with the CPU-sized CLIP:

    fdjax train --config experiments/au/disfa.py:variant=clip_adapter,size=tiny \\
        --workdir runs/disfa_adapter [--folds all]

CLIP ViT-B/16 from a local Hugging Face directory, on the real data:

    fdjax train --config experiments/au/disfa.py:variant=clip_adapter \\
        --config.model.clip_checkpoint=/path/to/clip-vit-base-patch16 \\
        --config.data.raw_dir=/path/to/DISFA --config.data.data_dir=/path/to/tfds \\
        --workdir runs/disfa_b16 --folds all

Arguments as experiments/au/bp4d.py.
"""

from ml_collections import ConfigDict

from data_pipelines.builders import disfa
from experiments.au.common import au_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(
    arg, variant="clip_adapter", size="base", frames=8, fold=1, runlocal=False, steps=0
  )
  dataset = ConfigDict()
  dataset.name = "disfa"  # TFDS builder data_pipelines/builders/disfa.py.
  dataset.aus = disfa.AUS  # Action units, in the order of the `aus` label vector.
  dataset.num_folds = len(disfa.PARTS)  # Subject-exclusive folds.
  dataset.train_split = "fold{fold}_train"  # Split names, `{fold}` filled from data.fold.
  dataset.eval_split = "fold{fold}_test"
  return au_config(dataset, args)
