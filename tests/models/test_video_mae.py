"""The masked video autoencoder and its classifier: shared encoder parameters, the encoder on
visible tokens, output shapes, logical sharding of every parameter (ViT-L over fsdp=4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from fdjax import masking
from fdjax.config import DEFAULT_RULES
from fdjax.models import video_mae

FRAMES = 4


def _video(batch=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (batch, FRAMES, size, size, 3), dtype=np.uint8))


def _indices(model, batch=2, ratio=0.75, seed=0):
  grid = model.encoder.grid(FRAMES)
  keys = jax.random.split(jax.random.key(seed), batch)
  return jax.vmap(lambda k: masking.make_mask("tube", k, grid, ratio))(keys)


def _unbox(tree):
  return nn.meta.unbox(tree)


def test_reconstruction_predicts_every_masked_tubelet_and_discriminator_scores_it():
  model = video_mae.video_mae_model("tiny", frame_difference=True, discriminator_width=16)
  video = _video()
  visible, masked = _indices(model)  # grid 2x4x4: 12 of 16 per step masked -> 24 of 32
  assert visible.shape == (2, 8) and masked.shape == (2, 24)
  variables = _unbox(model.init(jax.random.key(0), video, visible, masked))
  pixels, aux = model.apply(variables, video, visible, masked)
  assert pixels.shape == (2, 24, 2 * 8 * 8 * 3) and pixels.dtype == jnp.float32
  assert aux["motion"].shape == pixels.shape
  assert aux["tokens"].shape == (2, 8, 64)
  assert aux["discriminator_logits"].shape == (2, 24)
  assert set(variables["params"]) == {
    "encoder", "encoder_to_decoder", "mask_token", "decoder", "decoder_norm", "pixel_head",
    "motion_head", "discriminator",
  }  # fmt: skip


def test_classifier_encoder_has_the_mae_encoder_parameters_exactly():
  for variant, subtract in (("tiny", False), ("tiny", True), ("B", False)):
    mae = video_mae.video_mae_model(variant, subtract_mean_frame=subtract)
    classifier = video_mae.video_vit_classifier(
      variant, num_classes=7, subtract_mean_frame=subtract
    )
    assert mae.encoder.subtract_mean_frame == classifier.encoder.subtract_mean_frame == subtract
    size = mae.encoder.image_size
    video = jax.ShapeDtypeStruct((1, 16, size, size, 3), jnp.uint8)
    grid = mae.encoder.grid(16)
    n = int(np.prod(grid))
    m = masking.num_masked("tube", grid, 0.9)
    vis = jax.ShapeDtypeStruct((1, n - m), jnp.int32)
    msk = jax.ShapeDtypeStruct((1, m), jnp.int32)
    mae_params = jax.eval_shape(mae.init, jax.random.key(0), video, vis, msk)["params"]
    cls_params = jax.eval_shape(classifier.init, jax.random.key(0), video)["params"]
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), _unbox(t))
    assert jax.tree.structure(_unbox(mae_params["encoder"])) == jax.tree.structure(
      _unbox(cls_params["encoder"])
    )
    assert shapes(mae_params["encoder"]) == shapes(cls_params["encoder"])
    assert set(cls_params) == {"encoder", "fc_norm", "head"}
  # ViT-B's encoder: 86M parameters (tubelet embedding 1.18M + 12 blocks of 7.09M + norms).
  count = sum(x.size for x in jax.tree.leaves(_unbox(mae_params["encoder"])))
  assert 85_000_000 < count < 88_000_000


@pytest.mark.parametrize("subtract", [False, True])
def test_classifier_on_all_tokens_equals_the_mae_encoder_with_nothing_masked(subtract):
  mae = video_mae.video_mae_model("tiny", subtract_mean_frame=subtract)
  classifier = video_mae.video_vit_classifier("tiny", num_classes=0, subtract_mean_frame=subtract)
  video = _video()
  visible, masked = _indices(mae)
  mae_params = _unbox(mae.init(jax.random.key(3), video, visible, masked))["params"]
  cls_params = _unbox(classifier.init(jax.random.key(4), video))["params"]
  cls_params = {**cls_params, "encoder": mae_params["encoder"]}
  embedding, aux = classifier.apply({"params": cls_params}, video)
  everything = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
  tokens = mae.apply(
    {"params": mae_params}, video, everything, method=lambda m, v, i: m.encoder(v, i)
  )
  np.testing.assert_allclose(aux["tokens"], tokens, rtol=1e-5, atol=1e-5)
  pooled = tokens.mean(1)
  if subtract:  # pooled relative to a still clip, whose input is all zeros
    still = mae.apply(
      {"params": mae_params}, jnp.full_like(video[:1], 77), everything[:1],
      method=lambda m, v, i: m.encoder(v, i),
    )  # fmt: skip
    pooled = pooled - still.mean(1)
  normed = (pooled - pooled.mean(-1, keepdims=True)) / jnp.sqrt(
    pooled.var(-1, keepdims=True) + 1e-6
  )
  np.testing.assert_allclose(embedding, normed, rtol=1e-4, atol=1e-4)  # fc_norm starts at identity
  # The visible-token path is the all-token path gathered: the encoder sees only those tokens,
  # so its outputs differ from the all-token outputs at those positions (attention context),
  # but the visible tokens' embeddings before the transformer match.
  sub = mae.apply({"params": mae_params}, video, visible, method=lambda m, v, i: m.encoder(v, i))
  assert sub.shape == (2, 8, 64)
  assert not np.allclose(sub, jnp.take_along_axis(tokens, visible[..., None], 1), atol=1e-3)


def test_subtract_mean_frame_embeds_each_frame_minus_the_clips_mean_frame():
  """With `subtract_mean_frame` the tubelet embedding's input is the normalised clip minus its
  mean over time (checked against numpy, then by feeding that input to an encoder without the
  option under the same parameters); a still image added to every frame changes no token."""
  video = _video()
  mean, std = np.asarray(video_mae.IMAGENET_MEAN), np.asarray(video_mae.IMAGENET_STD)
  normalised = (np.asarray(video, np.float64) / 255.0 - mean) / std
  expected = normalised - normalised.mean(axis=1, keepdims=True)
  on = video_mae.VideoViTEncoder(**video_mae.ENCODER_VARIANTS["tiny"], subtract_mean_frame=True)
  off = video_mae.VideoViTEncoder(**video_mae.ENCODER_VARIANTS["tiny"])
  np.testing.assert_allclose(on.embedding_input(video), expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(off.embedding_input(video), normalised, rtol=0, atol=1e-5)
  params = _unbox(on.init(jax.random.key(0), video))
  # Pixel values (floats, possibly outside [0, 255]) that `off` normalises to `expected`.
  as_pixels = jnp.asarray((expected * std + mean) * 255.0, jnp.float32)
  np.testing.assert_allclose(off.embedding_input(as_pixels), expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(
    on.apply(params, video), off.apply(params, as_pixels), rtol=0, atol=1e-4
  )
  rng = np.random.default_rng(1)
  still = jnp.asarray(video, jnp.float32) + rng.uniform(-40, 40, (2, 1, 32, 32, 3))
  np.testing.assert_allclose(on.apply(params, video), on.apply(params, still), rtol=0, atol=1e-4)
  assert not np.allclose(off.apply(params, video), off.apply(params, still), atol=1e-2)
  # And the MAE's encoder on visible tokens takes the same input.
  mae = video_mae.video_mae_model("tiny", subtract_mean_frame=True)
  visible, masked = _indices(mae)
  mae_params = _unbox(mae.init(jax.random.key(1), video, visible, masked))["params"]
  tokens = lambda m, v, i: m.encoder(v, i)
  np.testing.assert_allclose(
    mae.apply({"params": mae_params}, video, visible, method=tokens),
    mae.apply({"params": mae_params}, still, visible, method=tokens),
    rtol=0,
    atol=1e-4,
  )


def test_vit_l_parameters_shard_over_fsdp_by_their_logical_names():
  model = video_mae.video_mae_model("L", discriminator_width=64)
  video = jax.ShapeDtypeStruct((8, 16, 224, 224, 3), jnp.uint8)
  visible = jax.ShapeDtypeStruct((8, 160), jnp.int32)
  masked = jax.ShapeDtypeStruct((8, 1408), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), video, visible, masked)
  mesh = Mesh(
    np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"),
    axis_types=(AxisType.Auto,) * 3,
  )  # fmt: skip
  specs = nn.get_partition_spec(abstract)["params"]
  shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
  enc = shardings["encoder"]
  assert enc["tubelet_embedding"]["kernel"].spec == P(None, None, None, None, "fsdp")
  assert enc["transformer"]["layers_23"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings["decoder"]["layers_3"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
  assert shardings["pixel_head"]["kernel"].spec == P("fsdp", None)
  # Every leaf has logical names (a bare array would have no partition spec box).
  boxed = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in boxed)
  # And every fsdp-sharded axis divides by 4.
  for leaf, sharding in zip(
    jax.tree.leaves(_unbox(abstract["params"])), jax.tree.leaves(shardings)
  ):
    for dim, axis in zip(leaf.shape, sharding.spec):
      assert axis != "fsdp" or dim % 4 == 0


@pytest.mark.parametrize(
  "shape,message", [((1, 3, 32, 32, 3), "tubelet_size"), ((1, 4, 40, 40, 3), "video must be")]
)
def test_bad_video_shapes_are_named(shape, message):
  model = video_mae.video_vit_classifier("tiny")
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.uint8))


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match="tiny"):
    video_mae.video_mae_model("XL")


def test_a_masked_stem_keeps_the_masked_tubelets_pixels_out_of_the_visible_tokens():
  """`stem_widths`: the encoder on visible tokens zeroes the masked tubelets' pixels and features
  before every stem convolution (ConvMAE), so noise on the masked pixels leaves the visible
  tokens unchanged although the stem's 3x3 convolutions see across patch borders. With every
  token visible it is the classifier's encoder (the same parameters)."""
  mae = video_mae.video_mae_model("tiny", stem_widths=(4, 8))
  video = _video()
  visible, masked = _indices(mae)
  params = _unbox(mae.init(jax.random.key(0), video, visible, masked))["params"]
  assert params["encoder"]["stem_1_1"]["kernel"].shape == (3, 3, 8, 8)
  assert params["encoder"]["tubelet_embedding"]["kernel"].shape == (2, 2, 2, 8, 64)  # 8 / 2^2

  def encode(v, indices):
    return mae.apply({"params": params}, v, indices, method=lambda m, v, i: m.encoder(v, i))

  seen = np.asarray(mae.encoder.visible_pixels(visible, FRAMES))[..., None]  # [B, T, H, W, 1]
  assert seen.mean() == 0.25  # 8 of 32 tubelets
  noise = np.random.default_rng(1).integers(0, 256, video.shape, dtype=np.uint8)
  changed = jnp.asarray(np.where(seen > 0, np.asarray(video), noise))
  np.testing.assert_allclose(encode(changed, visible), encode(video, visible), atol=1e-6)

  classifier = video_mae.video_vit_classifier("tiny", num_classes=0, stem_widths=(4, 8))
  cls_params = _unbox(classifier.init(jax.random.key(1), video))["params"]
  _, aux = classifier.apply({"params": {**cls_params, "encoder": params["encoder"]}}, video)
  everything = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
  np.testing.assert_allclose(aux["tokens"], encode(video, everything), rtol=1e-5, atol=1e-5)
