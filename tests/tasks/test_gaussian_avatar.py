"""The gaussian_avatar task: training on the tiny NeRSemble twin lowers the photometric loss and
densifies; `fdjax render avatar` renders it; the custom VJP's gradients; densification and pruning
at a fixed capacity."""

import json
import os

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import prepare
from fdjax import config as config_lib
from fdjax import render, trainer
from fdjax.models import gaussian_avatar as avatar_lib
from fdjax.tasks import gaussian_avatar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments/avatar/nersemble.py") + ":runlocal=True,steps=16"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 16-step run on the tiny twin (32 px, 8 cameras), densifying once at step 8."""
  workdir = tmp_path_factory.mktemp("avatar")
  overrides = [
    "--config.log_every=1",
    "--config.densify.start=8",
    "--config.densify.stop=8",
    "--config.densify.every=8",
    "--config.model.capacity=11000",
    "--config.checkpoint.every=0",
    "--config.optim.groups.sh.lr=0.05",  # colours move visibly within 16 steps
  ]
  config = config_lib.load_config(CONFIG, overrides)
  return config, workdir, trainer.train_and_evaluate(config, str(workdir))


def test_training_lowers_the_photometric_loss_densifies_and_evaluates(trained):
  _, workdir, result = trained
  with open(workdir / "metrics.jsonl") as f:
    train = [r for r in map(json.loads, f) if r["split"] == "train"]
  first, last = (
    np.mean([r["photometric"] for r in train[:3]]),
    np.mean([r["photometric"] for r in train[-3:]]),
  )
  assert last < 0.8 * first, (first, last)
  assert {"l1", "ssim", "psnr", "bucket_overflow", "pair_overflow", "num_gaussians"} <= set(
    train[0]
  )
  # Densification at step 8 filled free slots (976 of them), counting what found no room.
  grown = next(r for r in train if r["densified"] > 0)
  assert grown["densified"] + grown["densify_overflow"] > 0
  assert grown["densified"] <= 11000 - 10024
  assert train[-1]["num_gaussians"] > 10024
  metrics = result.eval_metrics
  assert metrics["val_psnr"] > 12 and metrics["test_psnr"] > 12
  assert 0 < metrics["test_ssim"] < 1 and "eval_overflow" in metrics


def test_render_avatar_writes_a_clip_of_every_frame(trained, tmp_path, capsys):
  config, workdir, _ = trained
  raw_dir, _ = prepare.resolve_dirs(config.data)
  flame_dir = os.path.join(raw_dir, "flame_param")
  camera = os.path.join(raw_dir, "transforms_val.json")
  out = tmp_path / "clip.mp4"
  common = ["avatar", "--workdir", str(workdir), "--camera", camera, "--out", str(out)]
  assert render.main([*common, "--flame", flame_dir, "--camera_index", "2"]) == 0
  assert "wrote" in capsys.readouterr().out
  with av.open(str(out)) as container:
    assert sum(1 for _ in container.decode(video=0)) == len(os.listdir(flame_dir))
  bad = tmp_path / "bad.npz"
  np.savez(bad, expr=np.zeros((3, 100)))
  assert render.main([*common, "--flame", str(bad)]) == 1
  error = capsys.readouterr().err
  assert f"{bad}: missing FLAME parameters" in error and error.count("\n") == 1


def test_custom_vjp_gives_the_plain_gradient_and_the_probe_gradient():
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(4, 3)))
  context = (jnp.asarray(rng.normal(size=(4,))), jnp.arange(3))

  def fn(params, probe, context):
    shift, index = context
    value = jnp.sum(jnp.tanh(params["a"] @ weights + probe[index]) * shift[:3]) + params["b"] ** 2
    return value, {"index_sum": jnp.sum(index)}

  params = {"a": jnp.asarray(rng.normal(size=(2, 4))), "b": jnp.asarray(0.7)}
  probe = jnp.zeros((3,))

  def through_vjp(params):
    loss, probe_grad, aux = gaussian_avatar.loss_and_probe_gradient(fn, params, probe, context)
    return 3.0 * loss, (probe_grad, aux)

  grads, (probe_grad, aux) = jax.grad(through_vjp, has_aux=True)(params)
  expected = jax.grad(lambda p: 3.0 * fn(p, probe, context)[0])(params)
  expected_probe = jax.grad(lambda q: fn(params, q, context)[0])(probe)
  for name in params:
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-6)
  np.testing.assert_allclose(probe_grad, expected_probe, rtol=1e-6)
  assert int(aux["index_sum"]) == 3


def test_densify_clones_splits_prunes_and_counts_overflow():
  faces = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]])
  model = avatar_lib.GaussianAvatar(faces=faces, capacity=6, init_scale=0.5)
  params, state = model.init()
  params = {**params, "scale": params["scale"].at[1].set(np.log(2.0))}  # slot 1 is large
  params["sh"] = params["sh"].at[:3, 0, 0].set(jnp.array([0.1, 0.2, 0.3]))
  params["opacity"] = params["opacity"].at[2].set(-10.0)  # slot 2: transparent
  state = {
    **state,
    "grad_sum": jnp.array([5.0, 9.0, 1.0, 0, 0, 0]),
    "grad_count": jnp.ones(6),
  }
  settings = avatar_lib.DensifySettings(grad_threshold=4.0, split_scale=1.0, prune_opacity=0.005)
  densify = jax.jit(avatar_lib.densify_and_prune, static_argnums=3)
  new, counts = densify(params, state, jax.random.key(0), settings)
  effective = avatar_lib.effective_params(params, new)
  # Slot 1 (largest gradient) takes free slot 3 and splits; slot 0 clones into slot 4.
  assert new["active"].tolist() == [True, True, True, True, True, False]
  assert new["binding"].tolist()[:5] == [0, 1, 2, 1, 0]
  np.testing.assert_allclose(effective["sh"][4], effective["sh"][0])
  np.testing.assert_allclose(effective["position"][4], effective["position"][0])
  np.testing.assert_allclose(np.asarray(effective["scale"])[[1, 3]], np.log(2.0 / 1.6), rtol=1e-6)
  assert not np.allclose(effective["position"][1], effective["position"][3])
  # Slot 2 is transparent but its triangle's last Gaussian, so it stays.
  assert int(counts["densified"]) == 2 and int(counts["pruned"]) == 0
  assert float(new["grad_sum"].sum()) == 0

  crowded = {
    **state,
    "grad_sum": jnp.array([5.0, 9.0, 8.0, 7.0, 6.0, 0]),
    "active": jnp.arange(6) < 5,
  }
  crowded["binding"] = jnp.array([0, 1, 2, 2, 0, 0])
  _, counts = densify(params, crowded, jax.random.key(0), settings)
  assert int(counts["densified"]) == 1 and int(counts["densify_overflow"]) == 4
  # Slot 2 is now transparent and its triangle keeps slot 3: it is pruned.
  assert int(counts["pruned"]) == 1
