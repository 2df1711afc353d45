"""The au task: positive weights from the training split, the weighted loss, and evaluation
against scikit-learn's per-AU and macro F1."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import video
from fdjax import config as config_lib
from fdjax import sharding as sharding_lib
from fdjax.tasks import au, dfer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BP4D = os.path.join(ROOT, "experiments", "au", "bp4d.py")


def _config(arg: str, *overrides):
  return config_lib.load_config(f"{BP4D}:{arg}", list(overrides))


def _init(config, seed: int = 0):
  model = au.build_model(config)
  batch = au.dummy_batch(config, 1)
  init = jax.jit(lambda r: au.init_fn(model, {"params": r}, batch))
  return model, nn.meta.unbox(init(jax.random.key(seed)))["params"]


def test_positive_weights_are_negatives_per_positive_capped():
  weights = au.positive_weights(np.array([0.5, 0.2, 0.01, 0.0, 0.9]), max_weight=10.0)
  np.testing.assert_allclose(weights, [1.0, 4.0, 10.0, 10.0, 1.0])


def test_positive_rates_come_from_every_training_frame(tmp_path):
  config = _config("variant=clip_linear,size=tiny,runlocal=True", ("workdir", str(tmp_path)))
  rates = au.positive_rates(config)
  source = dfer.open_split(config, "fold1_train")
  frames = np.concatenate([np.asarray(source[i]["frame_aus"]) for i in range(len(source))])
  np.testing.assert_allclose(rates, frames.mean(axis=0))
  assert (tmp_path / "label_stats_fold1_train.json").exists()


def test_train_subjects_keeps_every_window_of_that_many_subjects_and_their_rates(tmp_path):
  """`data.train_subjects=k`: all the windows of k training subjects, the same for every seed,
  one subject's inside two subjects'; the positive weights come from those windows only."""
  arg = "variant=clip_linear,size=tiny,runlocal=True"
  config = _config(arg, ("workdir", str(tmp_path / "two")), ("data.train_subjects", 2))
  subjects = np.asarray(au.window_subjects(config))
  assert len(set(subjects.tolist())) > 2
  indices = au.train_indices(config)
  kept = sorted(set(subjects[indices].tolist()))
  assert len(kept) == 2
  np.testing.assert_array_equal(indices, np.flatnonzero(np.isin(subjects, kept)))
  reseeded = _config(arg, ("workdir", str(tmp_path / "s")), ("data.train_subjects", 2), ("seed", 5))
  np.testing.assert_array_equal(au.train_indices(reseeded), indices)
  one = _config(arg, ("workdir", str(tmp_path / "one")), ("data.train_subjects", 1))
  assert set(au.train_indices(one).tolist()) < set(indices.tolist())
  assert au.train_indices(_config(arg, ("workdir", str(tmp_path / "all")))) is None

  source = au.train_source(config)
  assert len(source) == len(indices)
  frames = np.concatenate([np.asarray(source[i]["frame_aus"]) for i in range(len(source))])
  np.testing.assert_allclose(au.positive_rates(config), frames.mean(axis=0))
  for bad in (-1, True):
    with pytest.raises(ValueError, match="data.train_subjects"):
      au.train_indices(_config(arg, ("data.train_subjects", bad)))


def test_loss_weights_positive_terms_per_au(tmp_path):
  config = _config("variant=clip_linear,size=tiny,runlocal=True", ("workdir", str(tmp_path)))
  model, params = _init(config)
  loss_fn = au.make_loss_fn(config)
  weights = au.positive_weights(au.positive_rates(config), config.loss.max_positive_weight)
  rng = np.random.default_rng(0)
  batch = au.dummy_batch(config, 2)
  batch["aus"] = rng.integers(0, 2, batch["aus"].shape).astype(np.float32)
  batch["video"] = rng.integers(0, 255, batch["video"].shape, dtype=np.uint8)
  params["temporal_head"]["classifier"]["bias"] = jnp.asarray(
    rng.normal(size=params["temporal_head"]["classifier"]["bias"].shape), jnp.float32
  )
  loss, _ = loss_fn(model, params, batch, jax.random.key(0), False)
  logits = np.asarray(model.apply({"params": params}, batch["video"])[0], np.float64)
  probability = 1 / (1 + np.exp(-logits))
  y = batch["aus"]
  expected = -(weights * y * np.log(probability) + (1 - y) * np.log(1 - probability)).mean()
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_evaluate_reports_sklearn_f1_per_au_and_mean():
  config = _config("variant=clip_linear,size=tiny,runlocal=True")
  model, params = _init(config)
  # Random classifier weights spread the predictions over present and absent.
  head = params["temporal_head"]["classifier"]
  head["kernel"] = 3.0 * jax.random.normal(jax.random.key(1), head["kernel"].shape)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    metrics = au.evaluate(config, model, sharded, mesh=mesh, rules=rules, workdir="", step=1)

  source = dfer.open_split(config, "fold1_test")
  apply = jax.jit(lambda p, v: model.apply({"params": p}, v)[0])
  labels, predicted = [], []
  for i in range(len(source)):
    example = video.eval_transform(source[i], num_frames=config.data.num_frames, image_size=32)
    labels.append(example["aus"])
    predicted.append(np.asarray(jax.nn.sigmoid(apply(params, example["video"][None])[0])) >= 0.5)
  labels, predicted = np.stack(labels).astype(int), np.stack(predicted).astype(int)
  assert 0 < predicted.mean() < 1
  assert metrics["num_examples"] == len(source)
  per_au = sklearn.metrics.f1_score(labels, predicted, average=None, zero_division=0)
  for name, value in zip(au.au_names(config), per_au):
    assert metrics[f"au_f1/{name}"] == pytest.approx(value)
  assert metrics["au_f1"] == pytest.approx(
    sklearn.metrics.f1_score(labels, predicted, average="macro", zero_division=0)
  )


def test_predict_gives_au_probabilities_and_metadata_names_them():
  config = _config("variant=clip_adapter,size=tiny,runlocal=True")
  model, params = _init(config)
  predict, specs = au.predict_fn(config, model)
  assert specs == {"video": ("b, 8, 32, 32, 3", "uint8")}
  outputs = predict(params, np.zeros((2, 8, 32, 32, 3), np.uint8))
  assert outputs["probabilities"].shape == (2, 12)
  assert ((outputs["probabilities"] > 0) & (outputs["probabilities"] < 1)).all()
  metadata = au.export_metadata(config)
  assert metadata["class_names"][:3] == ["AU1", "AU2", "AU4"] and metadata["threshold"] == 0.5
