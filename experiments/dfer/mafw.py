"""Dynamic facial expression recognition on MAFW (11 single-expression classes, 5 folds).

The demo, on the synthetic twin (built on first use), with the CPU-sized CLIP:

    fdjax train --config experiments/dfer/mafw.py:variant=clip_adapter,size=tiny \\
        --workdir runs/mafw_adapter [--folds all]

CLIP ViT-B/16 from a local Hugging Face directory, on the real data:

    fdjax train --config experiments/dfer/mafw.py:variant=clip_text \\
        --config.model.clip_checkpoint=/path/to/clip-vit-base-patch16 \\
        --config.data.raw_dir=/path/to/MAFW --config.data.data_dir=/path/to/tfds \\
        --workdir runs/mafw_b16 --folds all

MAFW's classes are unbalanced (few contempt or disappointment clips), so the loss is
class-balanced by default here. Arguments as experiments/dfer/dfew.py.
"""

from ml_collections import ConfigDict

from data_pipelines.builders import mafw
from experiments.dfer.common import dfer_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(
    arg, variant="clip_adapter", size="base", frames=16, fold=1, runlocal=False, steps=0
  )
  dataset = ConfigDict()
  dataset.name = "mafw"  # TFDS builder data_pipelines/builders/mafw.py.
  dataset.class_names = mafw.CLASS_NAMES  # Label i is class_names[i].
  dataset.num_folds = mafw.NUM_FOLDS  # Folds of the cross-validation protocol.
  dataset.train_split = "fold{fold}_train"  # Split names, `{fold}` filled from data.fold.
  dataset.eval_split = "fold{fold}_test"
  c = dfer_config(dataset, args)
  c.loss.class_balanced = True
  return c
