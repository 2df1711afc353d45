"""Config of the test family `inbetween` (tests/newfamily/inbetween.py).

fdjax train --config tests/newfamily/config.py --workdir /tmp/inbetween
    (with tests/ on PYTHONPATH)
"""

from fdjax.config import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=60, ema=0.9)
  c = base_config()
  c.task = "newfamily.inbetween"
  c.model.stride = 4
  c.model.hidden = 32
  c.model.momentum = 0.9
  c.data.num_examples = 512
  c.data.num_keyframes = 5
  c.total_steps = args.steps
  c.batch_size = 32
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 5
  c.ema.decay = args.ema
  c.log_every = 10
  c.eval_every = 0
  c.checkpoint.every = 20
  c.compilation_cache_dir = ""
  return c
