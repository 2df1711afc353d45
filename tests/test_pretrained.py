"""fdjax.pretrained: parameter subtrees merged from another run, a bare checkpoint or an HF
directory into a fresh model, with errors that name paths, shapes and what exists."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tinytask

from fdjax import config as config_lib
from fdjax import pretrained, trainer
from fdjax.pretrained import InitFrom
from fdjax.state import strip_boxes

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished 5-step run of the tiny task, and its final parameters (host numpy)."""
  workdir = str(tmp_path_factory.mktemp("source_run"))
  config = config_lib.load_config(TINY, ["--config.total_steps=5"])
  trainer.train_and_evaluate(config, workdir)
  _, _, params, _ = trainer.restore_params(config, workdir)
  return config, workdir, jax.device_get(params)


def _fresh(config, seed: int) -> dict:
  """Parameters of the tiny model from another seed than the run's (host numpy)."""
  model = tinytask.build_model(config)
  variables = model.init(jax.random.key(seed), tinytask.dummy_batch(config, 1))
  return jax.device_get(strip_boxes(variables["params"]))


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, e)


def test_parse_spec_reads_same_and_renamed_paths_and_several_sources():
  assert pretrained.parse_spec("runs/a") == [InitFrom("runs/a", "", "")]
  assert pretrained.parse_spec("runs/a:decoder/vq") == [
    InitFrom("runs/a", "decoder/vq", "decoder/vq")
  ]
  assert pretrained.parse_spec("runs/s1:prior=>decoder/prior, hf/w2v:=>encoder") == [
    InitFrom("runs/s1", "prior", "decoder/prior"),
    InitFrom("hf/w2v", "", "encoder"),
  ]
  assert str(InitFrom("runs/s1", "prior", "decoder/prior")) == "runs/s1:prior=>decoder/prior"
  with pytest.raises(ValueError, match="no source directory"):
    pretrained.parse_spec(":encoder")


def test_merges_a_workdir_subtree_into_a_differently_initialised_model(run):
  config, workdir, trained = run
  fresh = _fresh(config, seed=7)
  assert not np.array_equal(
    fresh["encoder"]["dense"]["kernel"], trained["encoder"]["dense"]["kernel"]
  )
  merged = pretrained.merge_specs(fresh, pretrained.parse_spec(f"{workdir}:encoder"))
  _assert_trees_equal(merged["encoder"], trained["encoder"])
  _assert_trees_equal(merged["head"], fresh["head"])  # outside the subtree: fresh


def test_apply_init_from_reads_config_model_init_from(run):
  config, workdir, trained = run
  fresh = _fresh(config, seed=7)
  assert pretrained.apply_init_from(config, fresh) is fresh  # the tiny config has no init_from
  spec = ml_collections.ConfigDict({"model": {"init_from": f"{workdir}:head"}})
  merged = pretrained.apply_init_from(spec, fresh)
  _assert_trees_equal(merged["head"], trained["head"])
  _assert_trees_equal(merged["encoder"], fresh["encoder"])
  everything = pretrained.apply_init_from(
    ml_collections.ConfigDict({"model": {"init_from": workdir}}), fresh
  )
  _assert_trees_equal(everything, trained)


def test_merges_from_a_checkpoint_step_directory_and_its_state_item(run):
  config, workdir, trained = run
  step = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  fresh = _fresh(config, seed=3)
  for directory in ("checkpoints", f"checkpoints/{step}", f"checkpoints/{step}/state"):
    merged = pretrained.merge_specs(
      fresh, [InitFrom(os.path.join(workdir, directory), "encoder/dense", "encoder/dense")]
    )
    _assert_trees_equal(merged["encoder"], trained["encoder"])


def test_merges_a_renamed_subtree_from_a_bare_checkpoint_keeping_the_fresh_dtype(tmp_path):
  rng = np.random.default_rng(0)
  saved = {
    "prior": {
      "codebook": rng.normal(size=(16, 4)).astype(np.float32),
      "decoder": {"kernel": rng.normal(size=(4, 6)).astype(np.float32)},
    },
    "other": {"bias": np.ones(3, np.float32)},
  }
  directory = str(tmp_path / "bare")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, saved)
  fresh = {
    "decoder": {
      "prior": {
        "codebook": jnp.zeros((16, 4), jnp.bfloat16),
        "decoder": {"kernel": jnp.zeros((4, 6), jnp.float32)},
      },
      "head": jnp.ones((2,), jnp.float32),
    }
  }
  merged = pretrained.merge_specs(fresh, pretrained.parse_spec(f"{directory}:prior=>decoder/prior"))
  prior = merged["decoder"]["prior"]
  assert prior["codebook"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(prior["codebook"], saved["prior"]["codebook"].astype(jnp.bfloat16))
  np.testing.assert_array_equal(prior["decoder"]["kernel"], saved["prior"]["decoder"]["kernel"])
  np.testing.assert_array_equal(merged["decoder"]["head"], fresh["decoder"]["head"])


def _tiny_wav2vec2(directory: str) -> None:
  """A random `transformers` wav2vec2 of test size, saved as a Hugging Face directory."""
  import torch
  import transformers

  config = transformers.Wav2Vec2Config(
    conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=False,
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
  )  # fmt: skip
  torch.manual_seed(0)
  transformers.Wav2Vec2Model(config).save_pretrained(directory)


def test_merges_a_hugging_face_encoder_under_a_model_subtree(tmp_path):
  from fdjax.models import hf_convert

  directory = str(tmp_path / "wav2vec2")
  _tiny_wav2vec2(directory)
  module, reference = hf_convert.load_wav2vec2(directory)
  audio = jnp.zeros((1, module.receptive_field), jnp.float32)
  encoder = jax.device_get(strip_boxes(module.init(jax.random.key(1), audio)["params"]))
  fresh = {"encoder": encoder, "head": {"kernel": np.zeros((32, 3), np.float32)}}
  merged = pretrained.merge_specs(fresh, pretrained.parse_spec(f"{directory}:=>encoder"))
  _assert_trees_equal(merged["encoder"], reference)
  assert not np.array_equal(
    jax.tree.leaves(merged["encoder"])[-1], jax.tree.leaves(encoder)[-1]
  )  # the fresh encoder really differed
  np.testing.assert_array_equal(merged["head"]["kernel"], fresh["head"]["kernel"])
  with pytest.raises(ValueError, match=r"have no 'decoder'.*only encoder, feature_extractor"):
    pretrained.merge_specs(fresh, pretrained.parse_spec(f"{directory}:decoder=>encoder"))


def test_a_shape_mismatch_names_the_path_and_both_shapes(run):
  config, workdir, _ = run
  wider = config_lib.load_config(TINY, ["--config.total_steps=5", "--config.model.hidden=12"])
  fresh = _fresh(wider, seed=0)
  with pytest.raises(
    ValueError, match=r"head/kernel has shape \(16, 4\) in the source but \(12, 4\)"
  ):
    pretrained.merge_specs(fresh, pretrained.parse_spec(f"{workdir}:head"))


def test_a_missing_subtree_names_what_exists(run):
  config, workdir, _ = run
  fresh = _fresh(config, seed=0)
  with pytest.raises(ValueError, match=r"have no 'decoder/vq'.*no 'decoder', only encoder, head"):
    pretrained.merge_specs(fresh, pretrained.parse_spec(f"{workdir}:decoder/vq"))
  with pytest.raises(ValueError, match=r"model's parameters have no 'encoder/x'.*only dense"):
    pretrained.merge_specs(fresh, pretrained.parse_spec(f"{workdir}:encoder=>encoder/x"))


def test_missing_and_extra_leaves_are_errors_unless_kept_fresh(run):
  config, workdir, trained = run
  fresh = _fresh(config, seed=0)
  fresh["encoder"]["lora"] = {"down": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match="the source lacks encoder/lora/down"):
    pretrained.merge_specs(fresh, pretrained.parse_spec(f"{workdir}:encoder"))
  merged = pretrained.merge_specs(
    fresh, pretrained.parse_spec(f"{workdir}:encoder"), keep_fresh="lora"
  )
  np.testing.assert_array_equal(
    merged["encoder"]["dense"]["kernel"], trained["encoder"]["dense"]["kernel"]
  )
  np.testing.assert_array_equal(merged["encoder"]["lora"]["down"], fresh["encoder"]["lora"]["down"])
  del fresh["encoder"]["dense"]["bias"]
  with pytest.raises(
    ValueError, match="the source has parameters the model lacks.*encoder/dense/bias"
  ):
    pretrained.merge_specs(fresh, pretrained.parse_spec(f"{workdir}:encoder"), keep_fresh="lora")


def test_a_directory_that_is_no_source_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    pretrained.merge_specs({}, [InitFrom(str(tmp_path / "absent"))])
  with pytest.raises(FileNotFoundError, match="neither an fdjax workdir"):
    pretrained.merge_specs({}, [InitFrom(str(tmp_path))])


def test_dfer_clip_workdir_takes_a_runs_towers_but_keeps_fresh_adapters(tmp_path):
  """The `clip_workdir` alias: towers from the run's latest checkpoint, read with Orbax alone;
  the run's own adapters and the temporal head are not taken."""
  import json

  from fdjax.tasks import dfer

  dfew = os.path.join(os.path.dirname(TINY), os.pardir, os.pardir, "experiments/dfer/dfew.py")
  source_config = config_lib.load_config(
    f"{dfew}:variant=clip_adapter,size=tiny,runlocal=True,frames=4"
  )

  def init(config, seed):
    model, batch = dfer.build_model(config), dfer.dummy_batch(config, 1)
    variables = dfer.init_fn(model, {"params": jax.random.key(seed)}, batch)
    return jax.device_get(strip_boxes(variables["params"]))

  # A finished run's layout: config.json and `checkpoints/<step>/state` holding a train state.
  run_params = init(source_config, seed=1)
  workdir = tmp_path / "clip_run"
  os.makedirs(workdir / "checkpoints" / "3")
  with open(workdir / "config.json", "w") as f:
    json.dump(config_lib.to_dict(source_config), f)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
      str(workdir / "checkpoints" / "3" / "state"), {"params": run_params, "step": np.int32(3)}
    )

  config = config_lib.load_config(
    f"{dfew}:variant=clip_adapter,size=tiny,runlocal=True,frames=4",
    [("model.clip_workdir", str(workdir))],
  )
  fresh = init(config, seed=2)
  loaded = dfer.load_pretrained(config, fresh)
  layer = ("vision", "encoder", "layers_1")

  def at(tree, *path):
    for name in path:
      tree = tree[name]
    return tree

  np.testing.assert_array_equal(
    at(loaded, *layer, "fc1", "kernel"), at(run_params, *layer, "fc1", "kernel")
  )
  np.testing.assert_array_equal(
    at(loaded, *layer, "adapter_mlp", "down", "kernel"),
    at(fresh, *layer, "adapter_mlp", "down", "kernel"),
  )
  assert not np.array_equal(
    at(run_params, *layer, "adapter_mlp", "down", "kernel"),
    at(fresh, *layer, "adapter_mlp", "down", "kernel"),
  )
  _assert_trees_equal(loaded["temporal_head"], fresh["temporal_head"])
  with pytest.raises(ValueError, match="not both"):
    dfer.load_pretrained(
      config_lib.load_config(
        f"{dfew}:variant=clip_adapter,size=tiny,runlocal=True,frames=4",
        [("model.clip_workdir", str(workdir)), ("model.clip_checkpoint", str(workdir))],
      ),
      fresh,
    )


def _mae_run(tmp_path, *overrides, ema_offset=None):
  """A finished `mae_video` run's layout (config.json, `checkpoints/<step>/state`) holding the
  tiny VideoMAE's parameters, and an EMA of them shifted by `ema_offset` when given."""
  import json

  from fdjax.tasks import mae_video

  pretrain = os.path.join(os.path.dirname(TINY), os.pardir, os.pardir, "experiments/pretrain")
  config = config_lib.load_config(
    f"{pretrain}/voxceleb2.py:variant=videomae,size=tiny,dataset=dfew,runlocal=True",
    list(overrides),
  )
  model = mae_video.build_model(config)
  variables = mae_video.init_fn(
    model, {"params": jax.random.key(1)}, mae_video.dummy_batch(config, 1)
  )
  params = jax.device_get(strip_boxes(variables["params"]))
  state = {"params": params, "step": np.int32(4)}
  if ema_offset is not None:
    state["ema"] = jax.tree.map(lambda p: p + ema_offset, params)
  workdir = tmp_path / "mae_run"
  os.makedirs(workdir / "checkpoints" / "4")
  with open(workdir / "config.json", "w") as f:
    json.dump(config_lib.to_dict(config), f)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(workdir / "checkpoints" / "4" / "state"), state)
  return str(workdir), state


def _vit_mae_config(workdir: str, *overrides):
  dfew = os.path.join(os.path.dirname(TINY), os.pardir, os.pardir, "experiments/dfer/dfew.py")
  return config_lib.load_config(
    f"{dfew}:variant=vit_mae_probe,size=tiny,runlocal=True,frames=4",
    [("model.init_from", workdir), *overrides],
  )


def test_a_bare_mae_video_workdir_gives_its_ema_encoder_to_a_vit_mae_classifier(tmp_path):
  """`--config.model.init_from=<mae run>` as typed: the run's `encoder` subtree (from its EMA,
  which it kept) goes into the classifier's `encoder`; fc_norm and the head stay fresh."""
  from fdjax.tasks import dfer

  workdir, state = _mae_run(tmp_path, ema_offset=0.5)
  config = _vit_mae_config(workdir)
  model = dfer.build_model(config)
  fresh = jax.device_get(
    strip_boxes(
      dfer.init_fn(model, {"params": jax.random.key(2)}, dfer.dummy_batch(config, 1))["params"]
    )
  )
  loaded = pretrained.apply_init_from(config, dfer.load_pretrained(config, fresh))
  _assert_trees_equal(loaded["encoder"], state["ema"]["encoder"])
  _assert_trees_equal(loaded["head"], fresh["head"])
  _assert_trees_equal(loaded["fc_norm"], fresh["fc_norm"])
  # Into another VideoMAE the same bare spec still means the whole tree.
  spec = InitFrom(workdir)
  assert pretrained.default_subtree(spec, state["params"]) == spec
  assert pretrained.default_subtree(spec, fresh) == InitFrom(workdir, "encoder", "encoder")


def test_a_mae_run_without_ema_gives_its_parameters(tmp_path):
  from fdjax.tasks import dfer

  workdir, state = _mae_run(tmp_path)
  config = _vit_mae_config(workdir)
  model = dfer.build_model(config)
  fresh = jax.device_get(
    strip_boxes(
      dfer.init_fn(model, {"params": jax.random.key(2)}, dfer.dummy_batch(config, 1))["params"]
    )
  )
  loaded = pretrained.apply_init_from(config, fresh)
  _assert_trees_equal(loaded["encoder"], state["params"]["encoder"])


def test_a_mae_run_of_another_image_size_is_refused_naming_the_field(tmp_path):
  """Image size changes no parameter shape (sin-cos positions), so only the check catches it."""
  from fdjax.tasks import au, dfer

  workdir, _ = _mae_run(tmp_path, ("model.image_size", 48))
  with pytest.raises(ValueError, match=r"image_size=48 but config.model .* image_size=32"):
    dfer.load_pretrained(_vit_mae_config(workdir), {})
  bp4d = os.path.join(os.path.dirname(TINY), os.pardir, os.pardir, "experiments/au/bp4d.py")
  config = config_lib.load_config(
    f"{bp4d}:variant=vit_mae_finetune,size=tiny,runlocal=True",
    [("model.init_from", workdir), ("model.image_size", 48)],
  )
  au.load_pretrained(config, {})  # The same run matches once the size agrees.


def test_a_mae_run_with_another_input_is_refused_naming_subtract_mean_frame(tmp_path):
  """An encoder pretrained on frames minus their clip's mean frame has the parameter shapes of
  one pretrained on raw frames: only the check keeps it out of a model fed the other input."""
  from fdjax.tasks import dfer

  workdir, _ = _mae_run(
    tmp_path,
    ("model.subtract_mean_frame", True),
    ("loss.target", "mean_subtracted_pixels"),
  )
  with pytest.raises(
    ValueError, match=r"subtract_mean_frame=True but config.model .* subtract_mean_frame=False"
  ):
    dfer.load_pretrained(_vit_mae_config(workdir), {})
  config = _vit_mae_config(workdir, ("model.subtract_mean_frame", True))
  assert dfer.build_model(config).encoder.subtract_mean_frame  # config.model reaches the encoder
  dfer.load_pretrained(config, {})  # The same run matches once the input agrees.
  raw, _ = _mae_run(tmp_path / "raw")
  message = r"subtract_mean_frame=False but .* subtract_mean_frame=True"
  with pytest.raises(ValueError, match=message):
    dfer.load_pretrained(_vit_mae_config(raw, ("model.subtract_mean_frame", True)), {})
  assert not dfer.build_model(_vit_mae_config(raw)).encoder.subtract_mean_frame


def test_a_workdir_named_by_a_relative_path_is_read(run, monkeypatch):
  # Orbax reads no metadata through a relative path; `runs/x` as users type it must work.
  _, workdir, trained = run
  monkeypatch.chdir(os.path.dirname(workdir))
  relative = os.path.basename(workdir)
  _assert_trees_equal(pretrained.read_checkpoint_params(relative, "encoder"), trained["encoder"])
