"""The mae_video task: targets, the loss on masked tubelets only, the face-part requirement, the
adversarial term's gradients, a short pretraining that learns, and ViT-L over fsdp=4 with a
checkpoint restored onto another mesh."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdjax import config as config_lib
from fdjax import masking
from fdjax.tasks import load_task, mae_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(ROOT, "experiments", "pretrain", "voxceleb2.py")


def _config(arg: str, *overrides):
  return config_lib.load_config(f"{PRETRAIN}:{arg}", [("compilation_cache_dir", ""), *overrides])


def _init(config, batch, seed=0):
  model = mae_video.build_model(config)
  variables = jax.jit(lambda r: mae_video.init_fn(model, {"params": r}, batch))(
    jax.random.key(seed)
  )
  return model, nn.meta.unbox(variables)["params"]


def _clips(batch=2, frames=4, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8)


def test_the_task_fits_the_contract():
  task = load_task("mae_video")
  for hook in ("evaluate", "flops_per_example", "init_fn"):
    assert task.has(hook)


def test_patches_round_trip_and_normalised_targets_have_zero_mean_unit_std():
  video = jnp.asarray(_clips(), jnp.float32) / 255.0
  patches = mae_video.video_patches(video, 8, 2)
  assert patches.shape == (2, 2 * 4 * 4, 2 * 8 * 8 * 3)
  # Token 5 = (t 0, y 1, x 1): frames 0-1, rows 8-15, columns 8-15.
  np.testing.assert_array_equal(patches[1, 5], video[1, 0:2, 8:16, 8:16].reshape(-1))
  np.testing.assert_array_equal(
    mae_video.unpatch(np.asarray(patches[0]), (2, 4, 4), 8, 2), video[0]
  )
  normed = mae_video.normalize_patches(patches).reshape(2, 32, -1, 3)
  np.testing.assert_allclose(normed.mean(2), 0.0, atol=1e-5)
  np.testing.assert_allclose(normed.std(2, ddof=1), 1.0, atol=1e-3)
  diff = mae_video.frame_differences(video)
  np.testing.assert_array_equal(diff[:, 0], 0.0)
  np.testing.assert_allclose(diff[:, 2], video[:, 2] - video[:, 1])


def test_loss_is_the_mse_of_the_masked_tubelets_only():
  config = _config(
    "variant=videomae,size=tiny,dataset=dfew,runlocal=True", ("loss.target", "pixels")
  )
  batch = {"video": _clips()}
  model, params = _init(config, batch)
  loss_fn = mae_video.make_loss_fn(config)
  rng = jax.random.key(5)
  loss, aux = loss_fn(model, params, batch, rng, True)
  keys = jax.random.split(jax.random.fold_in(rng, 0), 2)
  visible, masked = mae_video.draw_masks(config, model, batch, keys)
  assert masked.shape == (2, 28)  # tube 0.9 of 4x4 per step: 14 x 2 steps
  pixels, _ = model.apply(
    {"params": params}, batch["video"], visible, masked, method=model.reconstruct
  )
  truth = mae_video.video_patches(jnp.asarray(batch["video"], jnp.float32) / 255.0, 8, 2)
  expected = np.mean(
    (np.asarray(pixels) - np.take_along_axis(np.asarray(truth), np.asarray(masked)[..., None], 1))
    ** 2
  )
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  # Changing visible pixels changes the prediction, changing only masked ones leaves it.
  video = batch["video"].copy()
  grid = (2, 4, 4)
  for b in range(2):
    for token in np.asarray(masked[b]):
      t, y, x = np.unravel_index(token, grid)
      video[b, 2 * t : 2 * t + 2, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 0
  pixels2, _ = model.apply({"params": params}, video, visible, masked, method=model.reconstruct)
  np.testing.assert_allclose(pixels2, pixels, rtol=1e-5, atol=1e-6)


def test_mean_subtracted_input_and_target_with_tube_masks():
  """`model.subtract_mean_frame` with `loss.target=mean_subtracted_pixels`: the target is each
  tubelet of the clip minus its mean frame, the loss its MSE on the masked tubelets; tube masks
  hide a position in every frame, so the masked pixels reach neither the visible tokens nor,
  through the mean frame, the prediction; a perfect prediction draws the truth in the PNG strip;
  masks that hide some frames of a position are refused."""
  config = _config(
    "variant=videomae,size=tiny,dataset=dfew,runlocal=True",
    ("loss.target", "mean_subtracted_pixels"),
    ("model.subtract_mean_frame", True),
  )
  batch = {"video": _clips()}
  model, params = _init(config, batch)
  assert model.encoder.subtract_mean_frame
  pixels = np.asarray(batch["video"], np.float64) / 255.0
  expected = mae_video.video_patches(jnp.asarray(pixels - pixels.mean(1, keepdims=True)), 8, 2)
  appearance, _ = mae_video.targets(batch["video"], model, config.loss.target)
  np.testing.assert_allclose(appearance, expected, rtol=0, atol=1e-6)
  rng = jax.random.key(5)
  loss, _ = mae_video.make_loss_fn(config)(model, params, batch, rng, True)
  keys = jax.random.split(jax.random.fold_in(rng, 0), 2)
  visible, masked = mae_video.draw_masks(config, model, batch, keys)
  predicted, _ = model.apply(
    {"params": params}, batch["video"], visible, masked, method=model.reconstruct
  )
  truth = np.take_along_axis(np.asarray(expected), np.asarray(masked)[..., None], 1)
  assert float(loss) == pytest.approx(float(np.mean((np.asarray(predicted) - truth) ** 2)), 1e-5)
  video = batch["video"].copy()
  for b in range(2):
    for token in np.asarray(masked[b]):
      t, y, x = np.unravel_index(token, (2, 4, 4))
      video[b, 2 * t : 2 * t + 2, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 0
  again, _ = model.apply({"params": params}, video, visible, masked, method=model.reconstruct)
  np.testing.assert_allclose(again, predicted, rtol=1e-5, atol=1e-6)
  strip = mae_video.reconstruction_strip(
    config, model, batch["video"][0], truth[0], np.asarray(visible[0]), np.asarray(masked[0])
  )
  side = strip.shape[0] // 3
  assert np.abs(strip[side : 2 * side].astype(int) - strip[2 * side :].astype(int)).max() <= 1
  for kind in ("random", "frame"):
    refused = _config(
      "variant=videomae,size=tiny,dataset=dfew,runlocal=True",
      ("model.subtract_mean_frame", True),
      ("mask.kind", kind),
    )
    message = f"subtract_mean_frame=True with config.mask.kind='{kind}'"
    with pytest.raises(ValueError, match=message):
      mae_video.build_model(refused)


def test_face_region_masking_without_face_parts_names_the_field():
  config = _config("variant=marlin,size=tiny,dataset=dfew,runlocal=True")
  batch = mae_video.dummy_batch(config, 2)
  assert batch["face_parts"].shape == (2, 4, 32, 32)
  model, params = _init(config, batch)
  loss_fn = mae_video.make_loss_fn(config)
  with pytest.raises(ValueError, match="face_parts"):
    loss_fn(model, params, {"video": batch["video"]}, jax.random.key(0), True)
  with pytest.raises(ValueError, match="face_parts"):
    mae_video.pretrain_transform(
      {"video": np.zeros((8, 48, 48, 3), np.uint8)}, None, num_frames=4, frame_stride=2,
      image_size=32, face_parts=True,
    )  # fmt: skip


def test_face_region_loss_masks_the_face_first_and_the_adversarial_parts_stop_gradients():
  config = _config("variant=marlin,size=tiny,dataset=dfew,runlocal=True")
  batch = {"video": _clips()}
  parts = np.full((2, 4, 32, 32), masking.BACKGROUND, np.uint8)
  parts[:, :, 8:24, 8:24] = masking.MOUTH  # the 2x2 centre tokens
  batch["face_parts"] = parts
  model, params = _init(config, batch)
  keys = jax.random.split(jax.random.key(1), 2)
  _, masked = mae_video.draw_masks(config, model, batch, keys)
  spatial = np.asarray(masked) % 16
  for b in range(2):
    assert {5, 6, 9, 10} <= set(spatial[b].tolist())  # every mouth token masked
  loss_fn = mae_video.make_loss_fn(config)
  (loss, aux), grads = jax.value_and_grad(
    lambda p: loss_fn(model, p, batch, jax.random.key(2), True), has_aux=True
  )(params)
  assert {"generator_loss", "discriminator_loss", "reconstruction_loss"} <= set(aux)
  # The discriminator's gradient is its own loss's alone.
  only_disc = jax.grad(
    lambda p: mae_video.adversarial_losses(model, p, *_fake_real(config, model, p, batch))[1]
  )(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
    grads["discriminator"],
    only_disc["discriminator"],
  )


def _fake_real(config, model, params, batch):
  keys = jax.random.split(jax.random.fold_in(jax.random.key(2), 0), 2)
  visible, masked = mae_video.draw_masks(config, model, batch, keys)
  pixels, _ = model.apply(
    {"params": params}, batch["video"], visible, masked, method=model.reconstruct
  )
  truth, _ = mae_video.targets(batch["video"], model, config.loss.target)
  return pixels, jnp.take_along_axis(truth, masked[..., None], 1)


def test_flops_count_the_encoder_on_visible_tokens_only():
  config = _config("variant=videomae,size=B")
  flops = mae_video.flops_per_example(config)
  # ViT-B on 160 of 1568 tokens plus a 384-wide 4-block decoder on all: about 0.18 TFLOPs per
  # clip for training, a fifth of the full-token encoder's 3 x 180 GFLOPs.
  assert 1.5e11 < flops < 2.5e11
  full = mae_video._transformer_flops(1568, 768, 3072, 12) * 3
  assert flops < 0.5 * full


def test_a_short_pretraining_lowers_the_masked_reconstruction_loss(tmp_path):
  """The whole path: DFEW tiny twin (labels ignored) -> Grain -> tube masks (0.9) drawn in the
  loss -> tiny VideoMAE -> raw-pixel MSE on masked tubelets -> AdamW -> evaluation and PNG
  strip. The held-out reconstruction loss (fixed masks) must fall to under half its value at
  initialisation, the training loss likewise."""
  from fdjax import sharding as sharding_lib
  from fdjax import trainer

  config = _config(
    "variant=videomae,size=tiny,dataset=dfew,runlocal=True,steps=60",
    ("loss.target", "pixels"),
    ("optim.lr", 3e-3),
    ("workdir", str(tmp_path)),
  )
  model = mae_video.build_model(config)
  _, fresh = _init(config, mae_video.dummy_batch(config, 1), seed=config.seed)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    initial = mae_video.evaluate(config, model, fresh, mesh=mesh, rules=rules, workdir="", step=0)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train = [r["reconstruction_loss"] for r in rows if r["split"] == "train"]
  assert train[-1] < 0.5 * train[0]
  assert result.eval_metrics["num_examples"] == initial["num_examples"] == 7
  final = result.eval_metrics["reconstruction_loss"]
  assert final < 0.5 * initial["reconstruction_loss"], (final, initial)
  assert (tmp_path / "reconstruction.png").exists()
  assert any(n.startswith("events") for n in os.listdir(tmp_path / "tensorboard"))


def _vit_l_config(workdir, *mesh):
  """ViT-L's widths (encoder 1024 wide, 16 heads, MLP 4096; decoder 512) with one block each
  in encoder and decoder and 4-frame 64-pixel clips, so that a train step fits a CPU test."""
  config = _config(
    "variant=videomae,size=L,dataset=dfew,runlocal=True",
    ("model.image_size", 64),
    ("model.remat", False),
    ("workdir", str(workdir)),
    *mesh,
  ).as_configdict()
  config.model.depth = 1
  config.model.decoder_depth = 1
  return ml_collections.FrozenConfigDict(config)


def _build(config):
  from fdjax import sharding as sharding_lib
  from fdjax import trainer

  task = load_task(config.task)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.as_rules(config.rules)
  return task, mesh, rules, trainer, sharding_lib


def test_vit_l_trains_sharded_over_fsdp_4_and_its_checkpoint_restores_on_data_8(tmp_path):
  import grain

  from fdjax import checkpoint as checkpoint_lib

  config = _vit_l_config(tmp_path, ("mesh.data", 2), ("mesh.fsdp", 4))
  task, mesh, rules, trainer, sharding_lib = _build(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, state, _, train_step = trainer.build_train_step(config, task, mesh, rules)
    kernel = state.params["encoder"]["transformer"]["layers_0"]["fc1"]["kernel"]  # [1024, 4096]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.sharding.shard_shape(kernel.shape) == (256, 4096)
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4  # 4 distinct blocks
    host = {"video": _clips(batch=8, frames=4, size=64)}
    batch = {
      k: jax.device_put(v, sharding_lib.batch_sharding(mesh, rules)) for k, v in host.items()
    }
    state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    kernel = state.params["encoder"]["transformer"]["layers_0"]["fc1"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (256, 4096)
    saved = jax.device_get(state.params)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpointer.save(1, state, data_iter, force=True)
    checkpointer.close()
  del state, batch

  other = _vit_l_config(tmp_path, ("mesh.data", 8), ("mesh.fsdp", 1))
  task, mesh, rules, trainer, sharding_lib = _build(other)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, fresh, shardings, _ = trainer.build_train_step(other, task, mesh, rules)
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), fresh, shardings
    )
    del fresh
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), other.checkpoint)
    step, restored = checkpointer.restore(abstract, None)
    checkpointer.close()
  assert step == 1
  kernel = restored.params["encoder"]["transformer"]["layers_0"]["fc1"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
  jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(restored.params))


def test_the_training_transform_crops_and_flips_face_parts_with_the_frames():
  video = np.zeros((10, 48, 48, 3), np.uint8)
  parts = np.zeros((10, 48, 48), np.uint8)
  video[:, :, :20] = 255  # the left 20 columns: white mouth
  parts[:, :, :20] = masking.MOUTH
  flipped = 0
  for seed in range(6):
    out = mae_video.pretrain_transform(
      {"video": video, "face_parts": parts}, np.random.default_rng(seed), num_frames=4,
      frame_stride=2, image_size=32, scale=(0.4, 1.0), ratio=(0.75, 1.33), flip_prob=0.5,
      face_parts=True,
    )  # fmt: skip
    assert out["video"].shape == (4, 32, 32, 3) and out["face_parts"].shape == (4, 32, 32)
    agree = (out["video"][..., 0] > 127) == (out["face_parts"] == masking.MOUTH)
    assert agree.mean() > 0.95
    flipped += int(out["face_parts"][0, :, -1].mean() > out["face_parts"][0, :, 0].mean())
  assert 0 < flipped < 6  # some clips mirrored, some not


def test_an_example_without_its_face_part_map_is_refused_naming_it():
  # Real VoxCeleb2 clips are built with an empty map and has_face_parts False.
  example = {
    "video": np.zeros((10, 48, 48, 3), np.uint8),
    "face_parts": np.zeros((0, 48, 48), np.uint8),
    "has_face_parts": False,
    "key": "id00012/abc/00001@0",
  }
  with pytest.raises(ValueError, match=r"id00012/abc/00001@0.*no face-part map"):
    mae_video.pretrain_transform(
      example, None, num_frames=4, frame_stride=2, image_size=32, face_parts=True
    )
  # Without face-region masking the same example is a valid clip.
  out = mae_video.pretrain_transform(example, None, num_frames=4, frame_stride=2, image_size=32)
  assert out["video"].shape == (4, 32, 32, 3) and "face_parts" not in out
