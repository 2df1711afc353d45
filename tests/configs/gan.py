"""Config of the tests' two-network adversarial task (tests/gantask.py): one step, one combined
loss, a learning rate per network through `optim.groups`.

fdjax train --config tests/configs/gan.py --workdir /tmp/gan   (with tests/ on PYTHONPATH)
"""

from fdjax.config import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=30, batch_size=32)
  c = base_config()
  c.task = "gantask"
  c.model.hidden = 16
  c.data.num_examples = 512
  c.total_steps = args.steps
  c.batch_size = args.batch_size
  c.optim.optimizer = "adam"
  c.optim.b1 = 0.5
  c.optim.lr = 2e-3
  c.optim.schedule = "constant"
  c.optim.groups = {"discriminator": {"pattern": "^discriminator/", "lr": 1e-3}}
  c.log_every = 10
  c.eval_every = 0
  c.checkpoint.every = 0
  c.compilation_cache_dir = ""
  return c
