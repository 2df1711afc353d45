"""Temporal heads and the CLIP video classifier: shapes, masks, frame order, text logits, PEFT."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fdjax.models import hf_clip
from fdjax.models.clip import (
  CLIP_MEAN,
  CLIP_STD,
  peft_freeze_patterns,
)
from fdjax.models.temporal import TemporalHead, VideoClassifier, init_from_clip, normalize_video


def _key(seed: int) -> jax.Array:
  # XLA's own generator compiles in a fraction of threefry's time on CPU; quality is irrelevant.
  return jax.random.key(seed, impl="unsafe_rbg")


def _paths(params) -> list[str]:
  return [
    "/".join(str(k.key) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]


@pytest.fixture(scope="module")
def head():
  """A small CLS-pooled head with the linear classifier, its params and a jitted apply."""
  model = TemporalHead(num_classes=7, width=16, depth=1, num_heads=2, mlp_dim=32, max_frames=8)
  features = jnp.zeros((2, 5, 24))
  params = nn.meta.unbox(jax.jit(model.init)(_key(0), features))["params"]
  # The classifier starts at zero; random values make the logits informative for these checks.
  params["classifier"]["kernel"] = jax.random.normal(_key(1), params["classifier"]["kernel"].shape)
  return model, params, jax.jit(lambda p, f, m: model.apply({"params": p}, f, m))


def test_head_shapes_and_parameters(head):
  model, params, apply = head
  features = np.random.default_rng(0).normal(size=(2, 5, 24)).astype(np.float32)
  logits, aux = apply(params, features, np.ones((2, 5), bool))
  assert logits.shape == (2, 7)
  assert aux["clip_embedding"].shape == (2, 16)
  assert params["input_projection"]["kernel"].shape == (24, 16)  # 24-d features -> width 16
  assert params["temporal_position_embedding"].shape == (8, 16)
  assert params["cls_token"].shape == (16,)


def test_head_output_depends_on_frame_order(head):
  _, params, apply = head
  features = np.random.default_rng(1).normal(size=(2, 5, 24)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  logits, _ = apply(params, features, mask)
  shuffled, _ = apply(params, features[:, [3, 0, 4, 1, 2]], mask)
  assert np.abs(logits - shuffled).max() > 1e-4


def test_head_ignores_masked_frames(head):
  _, params, apply = head
  features = np.random.default_rng(2).normal(size=(2, 5, 24)).astype(np.float32)
  mask = np.array([[True] * 5, [True, True, True, False, False]])
  changed = features.copy()
  changed[1, 3:] = 100.0
  logits, _ = apply(params, features, mask)
  logits_changed, _ = apply(params, changed, mask)
  np.testing.assert_allclose(logits, logits_changed, atol=1e-5)
  # A clip padded to 5 frames scores like the same 3 frames alone (positions are shared).
  short, _ = jax.jit(lambda p, f: head[0].apply({"params": p}, f))(params, features[1:, :3])
  np.testing.assert_allclose(logits[1:], short, atol=1e-5)


def test_mean_pooling_and_text_classifier():
  model = TemporalHead(
    num_classes=3, classifier="text", pooling="mean", width=16, depth=1, num_heads=2, mlp_dim=32,
    max_frames=8,
  )  # fmt: skip
  rng = np.random.default_rng(3)
  features = rng.normal(size=(2, 4, 16)).astype(np.float32)
  class_embeds = rng.normal(size=(3, 12)).astype(np.float32)
  variables = jax.jit(model.init)(_key(2), features, None, class_embeds)
  params = nn.meta.unbox(variables)["params"]
  assert "cls_token" not in params and "input_projection" not in params
  assert params["text_projection"]["kernel"].shape == (16, 12)
  logits, aux = jax.jit(model.apply)({"params": params}, features, None, class_embeds)
  video = aux["video_embeds"] / np.linalg.norm(aux["video_embeds"], axis=-1, keepdims=True)
  classes = class_embeds / np.linalg.norm(class_embeds, axis=-1, keepdims=True)
  np.testing.assert_allclose(logits, (1 / 0.07) * video @ classes.T, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="class_embeds"):
    model.apply({"params": params}, features)
  reversed_logits, _ = jax.jit(model.apply)(
    {"params": params}, features[:, ::-1], None, class_embeds
  )
  assert np.abs(logits - reversed_logits).max() > 1e-4


def test_head_rejects_clips_longer_than_its_positions(head):
  model, params, _ = head
  with pytest.raises(ValueError, match="max_frames=8"):
    model.apply({"params": params}, jnp.zeros((1, 9, 24)))


# Token ids of 2 prompts per class for 3 classes: start token, words, end-of-text, padding.
BOS, EOS = 49406, 49407
CLASS_TOKEN_IDS = tuple(
  tuple(tuple([BOS, 320 + c, 1125 + p, 539, EOS] + [EOS] * 3) for p in range(2)) for c in range(3)
)


@pytest.fixture(scope="module")
def text_classifier(tmp_path_factory):
  """The intended flow: a local HF CLIP checkpoint of the tiny shape -> a text-classifier
  `VideoClassifier` with adapters, its towers from the checkpoint (`init_from_clip`).

  Returns (model, params, jitted apply, the PyTorch CLIP model).
  """
  config = transformers.CLIPConfig(
    vision_config=dict(
      image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=4,
    ),
    text_config=dict(
      hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
    projection_dim=32,
  )  # fmt: skip
  torch.manual_seed(0)
  torch_model = transformers.CLIPModel(config).eval()
  checkpoint = tmp_path_factory.mktemp("clip_tiny")
  torch_model.save_pretrained(checkpoint)
  _, clip_params = hf_clip.load_hf_clip(checkpoint)
  model = VideoClassifier(
    variant="tiny", num_classes=3, classifier="text", class_token_ids=CLASS_TOKEN_IDS,
    adapter_dim=4, head_width=32, head_num_heads=2, head_mlp_dim=64, max_frames=8,
  )  # fmt: skip
  params = init_from_clip(model, clip_params, _key(3))
  np.testing.assert_array_equal(
    params["vision"]["patch_embedding"]["kernel"],
    clip_params["vision"]["patch_embedding"]["kernel"],
  )

  def apply(params, video):
    with jax.default_matmul_precision("highest"):
      return model.apply({"params": params}, video)

  return model, params, jax.jit(apply), torch_model


def test_video_classifier_embeds_frames_and_prompts_like_clip(text_classifier):
  """At init (adapters are identity) the frame embeddings are CLIP's image embeddings of the
  normalised frames, and the class embeddings the normalised mean of the normalised prompt
  embeddings, both as PyTorch CLIP computes them."""
  model, params, apply, torch_model = text_classifier
  assert set(params) == {"vision", "text", "temporal_head"}
  assert "adapter_mlp" in params["vision"]["encoder"]["layers_1"]
  assert "classifier" not in params["temporal_head"]  # the text classifier has none
  video = np.random.default_rng(4).integers(0, 256, (2, 3, 32, 32, 3), np.uint8)
  logits, aux = apply(params, video)
  assert logits.shape == (2, 3)
  assert aux["frame_embeds"].shape == (2, 3, 32)
  assert aux["class_embeds"].shape == (3, 32)

  pixels = (video.reshape(6, 32, 32, 3) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  token_ids = torch.from_numpy(np.asarray(CLASS_TOKEN_IDS).reshape(6, -1))
  with torch.no_grad():
    image_embeds = torch_model.get_image_features(
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()
    ).pooler_output.numpy()
    prompts = torch_model.get_text_features(input_ids=token_ids).pooler_output.numpy()
  np.testing.assert_allclose(aux["frame_embeds"], image_embeds.reshape(2, 3, -1), atol=1e-4)
  prompts = (prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)).reshape(3, 2, -1).mean(1)
  expected = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
  np.testing.assert_allclose(aux["class_embeds"], expected, atol=1e-4)

  # Frame order matters end to end.
  reversed_logits, _ = apply(params, np.ascontiguousarray(video[:, ::-1]))
  assert np.abs(reversed_logits - logits).max() > 1e-5


def test_frames_are_normalised_inside_from_uint8_or_float():
  video = np.random.default_rng(8).integers(0, 256, (1, 2, 4, 4, 3), np.uint8)
  from_uint8 = normalize_video(video, CLIP_MEAN, CLIP_STD, jnp.float32)
  from_float = normalize_video(video.astype(np.float32), CLIP_MEAN, CLIP_STD, jnp.float32)
  expected = (video / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  np.testing.assert_allclose(from_uint8, expected, atol=1e-6)
  np.testing.assert_array_equal(from_uint8, from_float)


def test_freeze_patterns_train_only_adapters_and_head(text_classifier):
  params = text_classifier[1]
  frozen = [re.compile(p) for p in peft_freeze_patterns()]
  trainable = [p for p in _paths(params) if not any(r.search(p) for r in frozen)]
  assert any(p.startswith("temporal_head/") for p in trainable)
  assert any("/adapter_mlp/" in p for p in trainable)
  for path in trainable:
    assert path.startswith("temporal_head/") or (path.startswith("vision/") and "adapter" in path)
  assert not any(p.startswith("text/") for p in trainable)


def test_video_classifier_linear_single_frame_and_normalisation():
  model = VideoClassifier(
    variant="tiny", num_classes=12, head_width=32, head_num_heads=2, head_mlp_dim=64, max_frames=8,
    stop_backbone_gradient=True,
  )  # fmt: skip
  video = jnp.zeros((2, 1, 32, 32, 3), jnp.uint8)  # the single-frame baseline: T = 1
  variables = jax.eval_shape(model.init, _key(4), video)
  params = nn.meta.unbox(variables)["params"]
  assert set(params) == {"vision", "temporal_head"}  # no text tower for the linear classifier
  logits, aux = jax.eval_shape(model.apply, variables, video)
  assert logits.shape == (2, 12)  # e.g. 12 action units for multi-label logits
  assert aux["frame_embeds"].shape == (2, 1, 32)
  assert model.pixel_mean == CLIP_MEAN and model.pixel_std == CLIP_STD
  with pytest.raises(ValueError, match="video must be"):
    jax.eval_shape(model.init, _key(4), jax.ShapeDtypeStruct((2, 1, 48, 48, 3), jnp.uint8))
  with pytest.raises(ValueError, match="PEFT"):
    jax.eval_shape(model.clone(adapter_dim=4).init, _key(4), video)


# A rules table in the style of the config: data parallel batch, FSDP over embed, tensor over mlp
# and heads.
RULES = (
  ("batch", "data"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
  ("vocab", "tensor"), ("classes", None), ("frames", None),
)  # fmt: skip


def test_every_parameter_maps_to_the_mesh_by_logical_names():
  model = VideoClassifier(
    variant="tiny", num_classes=3, classifier="text", class_token_ids=CLASS_TOKEN_IDS,
    lora_rank=2, adapter_dim=4, peft_text=True, head_width=32, head_num_heads=2, head_mlp_dim=64,
  )  # fmt: skip
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  abstract = jax.eval_shape(model.init, _key(5), jax.ShapeDtypeStruct((2, 2, 32, 32, 3), jnp.uint8))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)["params"]
  layer = shardings["vision"]["encoder"]["layers_0"]
  assert layer["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert layer["attention"]["q_proj"]["kernel"].spec == P("fsdp", "tensor", None)
  assert layer["attention"]["q_proj"]["lora_b"].spec == P(None, "tensor", None)
  assert shardings["text"]["token_embedding"].spec == P("tensor", "fsdp")
  assert shardings["temporal_head"]["temporal_position_embedding"].spec == P(None, "fsdp")
