"""Config of the tests' BatchNorm regression task (tests/bntask.py), with an EMA of the params.

fdjax train --config tests/configs/bn.py --workdir /tmp/bn   (with tests/ on PYTHONPATH)
"""

import os

from fdjax.config import load_config_module, parse_arg

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")


def get_config(arg=None):
  args = parse_arg(arg, steps=20, batch_size=16, ema_decay=0.9)
  c = load_config_module(TINY).get_config(f"steps={args.steps},batch_size={args.batch_size}")
  c.task = "bntask"
  c.ema.decay = args.ema_decay
  return c
