"""Config loading: `path.py:arg` specs, typed overrides, unknown keys, the saved config.json."""

import json

import pytest
from helpers import TINY, run_fdjax

from fdjax import config as config_lib


def test_spec_argument_and_overrides_are_typed():
  config = config_lib.load_config(
    TINY + ":steps=7", ["--config.optim.lr=3e-4", "--config.checkpoint.use_async=false"]
  )
  assert config.total_steps == 7
  assert config.optim.lr == pytest.approx(3e-4)
  assert config.checkpoint.use_async is False
  with pytest.raises(AttributeError):  # Frozen.
    config.total_steps = 3


def test_int_override_of_float_field_becomes_float():
  config = config_lib.load_config(TINY, ["--config.optim.lr=1"])
  assert isinstance(config.optim.lr, float) and config.optim.lr == 1.0


def test_wrong_type_is_rejected_with_the_key():
  with pytest.raises(ValueError, match="total_steps"):
    config_lib.load_config(TINY, ["--config.total_steps=many"])


def test_unknown_key_suggests_nearest():
  with pytest.raises(KeyError, match=r"did you mean 'optim.lr'"):
    config_lib.load_config(TINY, ["--config.optim.lrr=1"])


def test_unknown_key_on_the_command_line_suggests_nearest(tmp_path):
  result = run_fdjax("train", "--config", TINY, "--workdir", str(tmp_path), "--config.optim.lrr=1")
  assert result.returncode != 0
  assert "did you mean 'optim.lr'" in result.stderr


def test_unknown_config_argument_suggests_nearest():
  with pytest.raises(KeyError, match="did you mean 'steps'"):
    config_lib.load_config(TINY + ":step=3")


def test_save_config_writes_resolved_json(tmp_path):
  config = config_lib.load_config(TINY, ["--config.seed=5"])
  path = config_lib.save_config(config, str(tmp_path))
  saved = json.load(open(path))
  assert saved["seed"] == 5 and saved["task"] == "tinytask"
  assert config_lib.config_hash(config) == config_lib.config_hash(
    config_lib.load_config(TINY, ["--config.seed=5"])
  )
