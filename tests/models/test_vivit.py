"""ViViT-style factorised encoder: shapes, tubelet and per-frame patching, masks, frame order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fdjax.models.vivit import vivit_model


def _key(seed: int) -> jax.Array:
  # XLA's own generator compiles in a fraction of threefry's time on CPU; quality is irrelevant.
  return jax.random.key(seed, impl="unsafe_rbg")


def _video(batch: int, frames: int, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, frames, size, size, 3), np.uint8)


@pytest.fixture(scope="module")
def tiny():
  """The tiny classifier variant with its parameters and a jitted apply."""
  model = vivit_model("tiny", num_classes=5)
  variables = jax.jit(model.init)(_key(0), jnp.zeros((1, 4, 32, 32, 3), jnp.uint8))
  params = nn.meta.unbox(variables)["params"]
  return model, params, jax.jit(lambda p, v, m: model.apply({"params": p}, v, frame_mask=m))


def test_tiny_forward_shapes_and_parameter_layout(tiny):
  model, params, apply = tiny
  video = _video(2, 6)
  logits, aux = apply(params, video, np.ones((2, 6), bool))
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert aux["clip_embedding"].shape == (2, 64)
  assert aux["step_embeddings"].shape == (2, 3, 64)  # 6 frames / tubelets of 2
  assert np.all(np.isfinite(aux["clip_embedding"]))
  assert params["tubelet_embedding"]["kernel"].shape == (2, 8, 8, 3, 64)
  assert params["spatial_position_embedding"].shape == (1 + 16, 64)
  assert params["temporal_position_embedding"].shape == (16 // 2, 64)
  assert set(params) >= {"spatial_encoder", "temporal_encoder", "head"}


def test_clip_embedding_depends_on_frame_order(tiny):
  _, params, apply = tiny
  video = _video(2, 6)
  mask = np.ones((2, 6), bool)
  _, aux = apply(params, video, mask)
  _, aux_reversed = apply(params, np.ascontiguousarray(video[:, ::-1]), mask)
  assert np.abs(aux["clip_embedding"] - aux_reversed["clip_embedding"]).max() > 1e-4


def test_masked_tubelets_do_not_change_the_output(tiny):
  _, params, apply = tiny
  video = _video(2, 6)
  mask = np.ones((2, 6), bool)
  mask[0, 4:] = False  # the last tubelet of clip 0 is padding
  other_padding = video.copy()
  other_padding[0, 4:] = 255 - other_padding[0, 4:]
  logits, aux = apply(params, video, mask)
  _, aux_other = apply(params, other_padding, mask)
  np.testing.assert_allclose(aux["clip_embedding"], aux_other["clip_embedding"], atol=1e-5)
  np.testing.assert_allclose(logits, apply(params, other_padding, mask)[0], atol=1e-5)
  # Without the mask the padding content would matter.
  _, aux_unmasked = apply(params, other_padding, np.ones((2, 6), bool))
  assert np.abs(aux_unmasked["clip_embedding"][0] - aux["clip_embedding"][0]).max() > 1e-4


def test_gradients_reach_parameters_and_float_frames(tiny):
  model, params, _ = tiny
  video = _video(2, 6).astype(np.float32)

  def loss(params, video):
    _, aux = model.apply({"params": params}, video)
    return jnp.sum(aux["clip_embedding"] ** 2)

  # Float frames in [0, 255] are accepted, so explanations can differentiate w.r.t. the pixels.
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, video)
  assert np.isfinite(value)
  assert float(jnp.abs(grads[0]["tubelet_embedding"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads[0]["spatial_encoder"]["layers_0"]["fc1"]["kernel"]).max()) > 0
  assert grads[1].shape == video.shape and float(jnp.abs(grads[1]).max()) > 0


def test_per_frame_patches_and_embedding_output():
  model = vivit_model("tiny", tubelet_size=1, num_classes=0)
  video = jax.ShapeDtypeStruct((2, 3, 32, 32, 3), jnp.uint8)
  variables = jax.eval_shape(model.init, _key(1), video)
  params = nn.meta.unbox(variables)["params"]
  assert params["tubelet_embedding"]["kernel"].shape == (1, 8, 8, 3, 64)
  assert params["temporal_position_embedding"].shape == (16, 64)
  assert "head" not in params
  embedding, aux = jax.eval_shape(model.apply, variables, video)
  assert embedding.shape == (2, 64)
  assert aux["step_embeddings"].shape == (2, 3, 64)


@pytest.mark.parametrize(
  "shape,message",
  [
    ((1, 5, 32, 32, 3), "tubelet_size"),
    ((1, 4, 48, 48, 3), "video must be"),
    ((1, 18, 32, 32, 3), "max_frames"),
  ],
)
def test_bad_video_shapes_are_named(shape, message):
  model = vivit_model("tiny")
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.uint8))


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match="tiny"):
    vivit_model("XL/99")


def test_every_parameter_maps_to_the_mesh_by_logical_names():
  rules = (("batch", "data"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  model = vivit_model("tiny", num_classes=5)
  abstract = jax.eval_shape(model.init, _key(2), jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.uint8))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)["params"]
  assert shardings["tubelet_embedding"]["kernel"].spec == P(None, None, None, None, "fsdp")
  assert shardings["temporal_encoder"]["layers_0"]["fc2"]["kernel"].spec == P("tensor", "fsdp")


def test_subtracting_the_mean_frame_removes_what_stays_still():
  """With `subtract_mean_frame`, a static image added to every frame (a background, a face at
  rest) changes nothing; only what moves reaches the model. Masked frames do not count."""
  rng = np.random.default_rng(0)
  video = rng.integers(40, 150, (2, 4, 32, 32, 3)).astype(np.float32)
  still = video + rng.integers(0, 100, (2, 1, 32, 32, 3)).astype(np.float32)
  for subtract in (True, False):
    model = vivit_model("tiny", subtract_mean_frame=subtract, max_frames=4)
    params = model.init(jax.random.key(0), video)
    a, _ = model.apply(params, video)
    b, _ = model.apply(params, still)
    assert np.allclose(a, b, atol=1e-4) == subtract
  model = vivit_model("tiny", subtract_mean_frame=True, max_frames=4)
  params = model.init(jax.random.key(0), video)
  mask = np.array([[True, True, False, False]] * 2)
  padded = video.copy()
  padded[:, 2:] = 255.0  # frames past the clip's end: neither the mean nor the output sees them
  a, _ = model.apply(params, video, frame_mask=mask)
  b, _ = model.apply(params, padded, frame_mask=mask)
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_convolutional_stem_keeps_the_token_grid_and_is_local():
  """`stem_widths`: convolutions on every frame, then tubelets of patch / 2^stages cells, so the
  token grid and outputs keep their shapes; a token only sees pixels near its own patch."""
  model = vivit_model("tiny", num_classes=5, stem_widths=(4, 8), max_frames=4)
  video = _video(1, 4)
  params = nn.meta.unbox(model.init(_key(0), video))["params"]
  assert params["stem_0_0"]["kernel"].shape == (3, 3, 3, 4)
  assert params["stem_1_1"]["kernel"].shape == (3, 3, 8, 8)
  assert params["tubelet_embedding"]["kernel"].shape == (2, 2, 2, 8, 64)  # 8 px / 4 = 2 cells
  assert params["spatial_position_embedding"].shape == (1 + 16, 64)  # still 4 x 4 tokens
  logits, aux = model.apply({"params": params}, video)
  assert logits.shape == (1, 5) and aux["step_embeddings"].shape == (1, 2, 64)

  # The stem's receptive field: a pixel changed in one corner moves the last stem convolution's
  # output near it (a 16 x 16 map of 2 x 2-pixel cells) and not in the far corner.
  def stem_output(v):
    _, state = model.apply(
      {"params": params}, v, capture_intermediates=True, mutable=["intermediates"]
    )
    return np.asarray(state["intermediates"]["stem_1_1"]["__call__"][0])  # [B T, 16, 16, 8]

  changed = video.copy()
  changed[0, 0, 0, 0] = 255 - changed[0, 0, 0, 0]
  delta = np.abs(stem_output(changed) - stem_output(video))[0]  # the first frame
  assert delta[:2, :2].max() > 0 and delta[8:, 8:].max() == 0
  with pytest.raises(ValueError, match="not a multiple of the stem's reduction 8"):
    vivit_model("tiny", stem_widths=(4, 4, 4, 4)[:3], patch_size=4).init(_key(0), video)
