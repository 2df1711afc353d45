"""fdjax explain: attention rollout arithmetic, gradient x input, and the PNG strip of a run."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import cli, explain, trainer
from fdjax import config as config_lib
from fdjax.models.vivit import vivit_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DFEW = os.path.join(ROOT, "experiments", "dfer", "dfew.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step dfer run on the tiny twin: enough for a checkpoint to explain."""
  workdir = str(tmp_path_factory.mktemp("explain_run"))
  config = config_lib.load_config(
    f"{DFEW}:variant=clip_linear,size=tiny,runlocal=True,steps=2,frames=4",
    [("workdir", workdir), ("compilation_cache_dir", "")],
  )
  trainer.train_and_evaluate(config, workdir)
  return workdir


def test_rollout_of_identity_attention_is_identity_and_of_uniform_is_uniform():
  identity = np.broadcast_to(np.eye(3, dtype=np.float32), (1, 2, 3, 3))
  np.testing.assert_allclose(explain.rollout([identity, identity]), np.eye(3)[None], atol=1e-6)
  uniform = np.full((1, 2, 4, 4), 0.25, np.float32)
  one = 0.5 * uniform[0, 0] + 0.5 * np.eye(4)
  np.testing.assert_allclose(explain.rollout([uniform, uniform])[0], one @ one, atol=1e-6)
  np.testing.assert_allclose(explain.rollout([uniform] * 5).sum(-1), 1.0, atol=1e-6)


def test_gradient_x_input_is_the_gradient_times_the_normalised_pixels(run):
  config = config_lib.load_config(os.path.join(run, "config.json"))
  _, model, params, _ = trainer.restore_params(config, run)
  clip = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  saliency = explain.gradient_x_input(model, params, clip, target=2)
  assert saliency.shape == (4, 32, 32) and (saliency >= 0).all() and saliency.max() > 0
  # The same quantity in raw pixel units: d logit / d pixel * (pixel - 255 mean), with the
  # gradient through the image encoder that this run's training skips.
  assert model.stop_backbone_gradient
  model = model.clone(stop_backbone_gradient=False)
  grad = jax.grad(lambda v: model.apply({"params": params}, v[None])[0][0, 2])(
    jnp.asarray(clip, jnp.float32)
  )
  centred = clip.astype(np.float32) - 255 * np.asarray(model.pixel_mean, np.float32)
  expected = np.abs(np.asarray(grad) * centred).sum(-1)
  np.testing.assert_allclose(saliency, expected, rtol=1e-4, atol=1e-7 * expected.max())


def test_rollout_of_a_vivit_gives_one_map_per_tubelet():
  model = vivit_model("tiny", num_classes=3)
  clip = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  params = nn.meta.unbox(model.init(jax.random.key(0), clip[None]))["params"]
  saliency = explain.attention_rollout(model, params, clip)
  assert saliency.shape == (4, 32, 32) and (saliency > 0).all()
  np.testing.assert_array_equal(saliency[0], saliency[1])  # frames 0 and 1 form one tubelet
  assert not np.array_equal(saliency[1], saliency[2])


@pytest.mark.parametrize("method", ["gradxinput", "rollout"])
def test_explain_command_writes_the_strip(run, tmp_path, capsys, method):
  out = str(tmp_path / f"{method}.png")
  argv = ["explain", "--workdir", run, "--out", out, "--index", "3", "--method", method]
  assert cli.main(argv) == 0
  info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert info["split"] == "fold1_test" and info["index"] == 3 and info["method"] == method
  assert len(info["frame_share"]) == 4 and sum(info["frame_share"]) == pytest.approx(1, abs=1e-3)
  from PIL import Image

  # A strip: a column per frame (1.3 inches each), two rows, at 110 dpi.
  assert Image.open(out).size == (round((1.3 * 4 + 0.6) * 110), round(3.2 * 110))


def test_explain_names_a_bad_index(run, tmp_path, capsys):
  argv = ["explain", "--workdir", run, "--out", str(tmp_path / "x.png"), "--index", "99"]
  assert cli.main(argv) == 1
  assert "--index 99" in capsys.readouterr().err
