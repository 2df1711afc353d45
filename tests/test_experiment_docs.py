"""Counts that experiment docstrings state are recomputed here, so the text cannot drift.

`experiments/dfer/common.py` states trainable/total parameter counts of the PEFT variants; each
stated count (`VARIANT` ... N of M) is checked against `dfer.parameter_counts` (shapes only,
so the B/16 counts run on any machine).
"""

from __future__ import annotations

import os
import re

import pytest

from experiments.dfer import common
from fdjax import config as config_lib
from fdjax.tasks import dfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COUNT = re.compile(
  r"(at the `tiny` size )?`(\w+)`(?: \([^)]*\))? (?:trains )?([\d,]+) of ([\d,]+)"
)


def _stated_counts() -> list[tuple[str, str, int, int]]:
  """(size, variant, trainable, total) for every count the dfer docstring states."""
  text = " ".join(common.__doc__.split())
  return [
    (
      "tiny" if tiny else "base",
      variant,
      int(trainable.replace(",", "")),
      int(total.replace(",", "")),
    )
    for tiny, variant, trainable, total in _COUNT.findall(text)
  ]


def test_the_docstring_states_the_counts_this_test_checks():
  stated = _stated_counts()
  assert {(s, v) for s, v, _, _ in stated} == {
    ("base", "clip_adapter"),
    ("base", "clip_lora"),
    ("tiny", "clip_adapter"),
  }


@pytest.mark.parametrize("size, variant, trainable, total", _stated_counts())
def test_stated_parameter_counts_equal_the_models(size, variant, trainable, total):
  config = config_lib.load_config(
    os.path.join(ROOT, "experiments", "dfer", "dfew.py") + f":variant={variant},size={size}"
  )
  assert dfer.parameter_counts(config) == (trainable, total)
