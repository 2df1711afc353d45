"""Config of the tests' tiny regression task (tests/tinytask.py).

fdjax train --config tests/configs/tiny.py --workdir /tmp/tiny   (with tests/ on PYTHONPATH)
"""

from fdjax.config import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=20, batch_size=16)
  c = base_config()
  c.task = "tinytask"
  c.model.hidden = 16
  c.model.dropout = 0.1
  c.data.num_examples = 256
  c.data.nan_indices = ()
  c.data.delay_s = 0.0
  c.total_steps = args.steps
  c.batch_size = args.batch_size
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  c.log_every = 5
  c.eval_every = 10
  c.checkpoint.every = 5
  c.checkpoint.keep = 2
  c.compilation_cache_dir = ""
  c.sweep_metric = "loss"
  return c


def get_sweep():
  return [{"optim.lr": lr} for lr in (1e-3, 1e-2)]
