"""Dynamic facial expression recognition on FERV39k (7 classes, one train/test split).

The demo, on the synthetic twin (built on first use), with the CPU-sized CLIP:

    fdjax train --config experiments/dfer/ferv39k.py:variant=clip_adapter,size=tiny \\
        --workdir runs/ferv39k_adapter

CLIP ViT-B/16 from a local Hugging Face directory, on the real data:

    fdjax train --config experiments/dfer/ferv39k.py:variant=clip_adapter \\
        --config.model.clip_checkpoint=/path/to/clip-vit-base-patch16 \\
        --config.data.raw_dir=/path/to/FERV39k --config.data.data_dir=/path/to/tfds \\
        --workdir runs/ferv39k_b16

FERV39k has no folds (`--folds` is refused). Arguments as experiments/dfer/dfew.py, less fold.
"""

from ml_collections import ConfigDict

from data_pipelines.builders import ferv39k
from experiments.dfer.common import dfer_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, variant="clip_adapter", size="base", frames=16, runlocal=False, steps=0)
  args.fold = 1
  dataset = ConfigDict()
  dataset.name = "ferv39k"  # TFDS builder data_pipelines/builders/ferv39k.py.
  dataset.class_names = ferv39k.CLASS_NAMES  # Label i is class_names[i].
  dataset.num_folds = 0  # One fixed split: no cross-validation.
  dataset.train_split = "train"
  dataset.eval_split = "test"
  return dfer_config(dataset, args)
