"""A 4-point sweep of the tests' tiny task: learning rate 0 (no learning) or 3e-2, times two widths.

fdjax sweep --config tests/launch/sweep_tiny.py:steps=6 --workdir /tmp/sweep --parallel 2
(with tests/ on PYTHONPATH, for the tiny task module)
"""

import os

from fdjax import sweep
from fdjax.config import load_config_module

_tiny = load_config_module(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))


def get_config(arg=None):
  return _tiny.get_config(arg)


def get_sweep():
  return sweep.product(**{"optim.lr": [0.0, 3e-2], "model.hidden": [4, 16]})
