"""wav2vec2 / HuBERT encoder: parity with `transformers` (PyTorch) and the frame-alignment helpers.

Parity uses tiny randomly initialised `Wav2Vec2Model` / `HubertModel`s whose every parameter is
additionally perturbed (so a swapped scale/bias or a dropped bias cannot hide behind the default
ones/zeros init), saved to disk in the formats real checkpoints come in and loaded through
`fdjax.models.hf_convert.load_wav2vec2`. Tolerance: 1e-4 absolute on the hidden states.
"""

import functools
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from fdjax.config import base_config
from fdjax.models.hf_convert import CheckpointError, load_wav2vec2, read_state_dict
from fdjax.models.wav2vec2 import (
  Wav2Vec2Encoder,
  interpolate_features,
  pair_audio_frames,
  span_mask,
)
from fdjax.optim import make_optimizer, trainable_mask

TOLERANCE = 1e-4
NUM_SAMPLES = 2400
# Right-padded batch: full, shorter, much shorter.
LENGTHS = (2400, 1800, 1111)

# name -> (model family, config fields, weight file format written to disk): "safetensors" as
# `save_pretrained` writes it (weight norm as `parametrizations.weight.original0/1`), "bin" an
# old-style pytorch_model.bin (`weight_g` / `weight_v`), "folded" safetensors whose positional
# conv carries a plain `weight` (weight norm removed).
CONFIGS = {
  "wav2vec2_group_postnorm": (
    "wav2vec2",
    dict(
      feat_extract_norm="group",
      do_stable_layer_norm=False,
      conv_bias=False,
      conv_dim=(16, 16, 16),
      conv_kernel=(10, 3, 3),
      conv_stride=(5, 2, 2),
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      num_conv_pos_embeddings=16,  # even: the trailing frame is dropped
      num_conv_pos_embedding_groups=4,
    ),
    "safetensors",
  ),
  "wav2vec2_layer_prenorm": (
    "wav2vec2",
    dict(
      feat_extract_norm="layer",
      do_stable_layer_norm=True,
      conv_bias=True,
      conv_dim=(24, 16, 16, 16),
      conv_kernel=(8, 4, 3, 2),
      conv_stride=(4, 2, 2, 2),
      hidden_size=48,
      num_hidden_layers=3,
      num_attention_heads=6,
      intermediate_size=80,
      num_conv_pos_embeddings=7,  # odd: nothing dropped
      num_conv_pos_embedding_groups=3,
      hidden_act="gelu_new",
    ),
    "bin",
  ),
  "hubert_group_postnorm_batch_norm": (
    "hubert",
    dict(
      feat_extract_norm="group",
      do_stable_layer_norm=False,
      feat_proj_layer_norm=False,
      conv_pos_batch_norm=True,
      conv_dim=(16, 24),
      conv_kernel=(10, 5),
      conv_stride=(5, 3),
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=48,
      num_conv_pos_embeddings=12,
      num_conv_pos_embedding_groups=2,
      hidden_act="relu",
    ),
    "bin",
  ),
  "hubert_layer_prenorm": (
    "hubert",
    dict(
      feat_extract_norm="layer",
      do_stable_layer_norm=True,
      conv_bias=True,
      conv_dim=(16, 16, 16),
      conv_kernel=(6, 3, 3),
      conv_stride=(3, 2, 2),
      hidden_size=40,
      num_hidden_layers=2,
      num_attention_heads=5,
      intermediate_size=64,
      num_conv_pos_embeddings=9,
      num_conv_pos_embedding_groups=5,
    ),
    "folded",
  ),
}


def _hf_model(family: str, fields: dict, seed: int = 0, ctc_vocab: int | None = None):
  """A tiny `transformers` model with every parameter and BN statistic perturbed."""
  if family == "wav2vec2":
    config = transformers.Wav2Vec2Config(**fields, vocab_size=ctc_vocab)
    model_cls = transformers.Wav2Vec2ForCTC if ctc_vocab else transformers.Wav2Vec2Model
  else:
    config = transformers.HubertConfig(**fields, vocab_size=ctc_vocab or 32)
    model_cls = transformers.HubertForCTC if ctc_vocab else transformers.HubertModel
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    for name, buffer in model.named_buffers():
      if name.endswith("running_mean"):
        buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))
      elif name.endswith("running_var"):
        buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
  return model


def _save(model, directory: str, weights: str) -> str:
  """Writes `model` as a checkpoint directory in the `weights` format (see CONFIGS)."""
  model.save_pretrained(directory)
  safetensors_path = os.path.join(directory, "model.safetensors")
  if weights == "bin":
    state = {}
    for key, value in model.state_dict().items():
      key = key.replace("parametrizations.weight.original0", "weight_g")
      key = key.replace("parametrizations.weight.original1", "weight_v")
      state[key] = value.clone()
    os.remove(safetensors_path)
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
  elif weights == "folded":
    tensors = load_file(safetensors_path)
    conv = "encoder.pos_conv_embed.conv"
    tensors.pop(f"{conv}.parametrizations.weight.original0")
    tensors.pop(f"{conv}.parametrizations.weight.original1")
    tensors[f"{conv}.weight"] = model.encoder.pos_conv_embed.conv.weight.detach().numpy()
    save_file(tensors, safetensors_path)
  return directory


@functools.cache
def _checkpoint(name: str, root: str) -> tuple[object, str]:
  family, fields, weights = CONFIGS[name]
  model = _hf_model(family, fields)
  return model, _save(model, os.path.join(root, name), weights)


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("hf_checkpoints"))


def _audio() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((len(LENGTHS), NUM_SAMPLES)).astype(np.float32)  # [B, S]
  mask = np.arange(NUM_SAMPLES)[None] < np.array(LENGTHS)[:, None]  # [B, S]
  return np.where(mask, audio, 0).astype(np.float32), mask


@functools.cache
def _jitted_apply(encoder: Wav2Vec2Encoder, static: tuple):
  return jax.jit(
    lambda p, a, m, arrays: encoder.apply({"params": p}, a, audio_mask=m, **arrays, **dict(static))
  )


def _apply(encoder: Wav2Vec2Encoder, params, audio, audio_mask=None, **options):
  """encoder.apply under jit, compiled once per encoder and options (compiles dominate here)."""
  arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array | np.ndarray)}
  static = tuple(sorted((k, v) for k, v in options.items() if k not in arrays))
  return _jitted_apply(encoder, static)(params, audio, audio_mask, arrays)


def _torch_run(model, audio: np.ndarray, mask: np.ndarray | None):
  with torch.no_grad():
    attention_mask = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    return model(torch.from_numpy(audio), attention_mask=attention_mask, output_hidden_states=True)


# Loaded with unrolled layers (`layers_{i}`) rather than one scanned, stacked `layers`.
UNROLLED = ("wav2vec2_layer_prenorm",)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_hidden_state_matches_transformers(name, checkpoint_root):
  model, directory = _checkpoint(name, checkpoint_root)
  encoder, params = load_wav2vec2(directory, scan_layers=name not in UNROLLED)
  layers = CONFIGS[name][1]["num_hidden_layers"]
  if name in UNROLLED:
    assert f"layers_{layers - 1}" in params["encoder"]
  else:
    assert params["encoder"]["layers"]["layer_norm"]["scale"].shape[0] == layers
  audio, mask = _audio()

  expected = _torch_run(model, audio, None)
  unmasked, aux = _apply(encoder, params, audio, output_hidden_states=True)
  np.testing.assert_allclose(unmasked, expected.last_hidden_state.numpy(), atol=TOLERANCE, rtol=0)
  assert aux["hidden_states"].shape[0] == len(expected.hidden_states)
  for ours, theirs in zip(aux["hidden_states"], expected.hidden_states, strict=True):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=TOLERANCE, rtol=0)
  if CONFIGS[name][0] == "wav2vec2":
    np.testing.assert_allclose(
      aux["extract_features"], expected.extract_features.numpy(), atol=TOLERANCE, rtol=0
    )

  expected = _torch_run(model, audio, mask)
  hidden, aux = _apply(encoder, params, audio, mask)
  np.testing.assert_allclose(hidden, expected.last_hidden_state.numpy(), atol=TOLERANCE, rtol=0)
  lengths = encoder.num_audio_frames(np.array(LENGTHS))
  np.testing.assert_array_equal(aux["frame_mask"].sum(-1), lengths)
  # The padding changed the valid frames of the shorter examples.
  assert not np.allclose(hidden[1], unmasked[1], atol=1e-3)


def test_ctc_checkpoint_loads_the_base_model_and_ignores_the_head(tmp_path):
  family, fields, _ = CONFIGS["wav2vec2_group_postnorm"]
  model = _hf_model(family, fields, ctc_vocab=12)
  directory = _save(model, str(tmp_path / "ctc"), "safetensors")
  assert any(k.startswith("lm_head.") for k in read_state_dict(directory).keys())
  encoder, params = load_wav2vec2(directory)
  audio, _ = _audio()
  with torch.no_grad():
    expected = model.wav2vec2(torch.from_numpy(audio)).last_hidden_state.numpy()
  hidden, _ = _apply(encoder, params, audio, output_hidden_states=True)  # same compile as parity
  np.testing.assert_allclose(hidden, expected, atol=TOLERANCE, rtol=0)


def _edited_copy(directory: str, target: str, edit) -> str:
  shutil.copytree(directory, target)
  path = os.path.join(target, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)
  return path


def test_missing_tensor_error_names_the_key_and_the_file(checkpoint_root, tmp_path):
  _, directory = _checkpoint("wav2vec2_group_postnorm", checkpoint_root)
  key = "encoder.layers.1.feed_forward.output_dense.bias"
  path = _edited_copy(directory, str(tmp_path / "missing"), lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=re.escape(key)) as error:
    load_wav2vec2(os.path.dirname(path))
  assert path in str(error.value)


def test_unexpected_tensor_error_names_the_key_and_the_file(checkpoint_root, tmp_path):
  _, directory = _checkpoint("wav2vec2_group_postnorm", checkpoint_root)
  key = "encoder.layers.0.attention.rel_bias.weight"
  path = _edited_copy(
    directory, str(tmp_path / "unexpected"), lambda t: t.update({key: np.zeros(3, np.float32)})
  )
  with pytest.raises(CheckpointError, match=re.escape(key)) as error:
    load_wav2vec2(os.path.dirname(path))
  assert path in str(error.value)


def test_misshapen_tensor_error_names_both_shapes(checkpoint_root, tmp_path):
  _, directory = _checkpoint("wav2vec2_group_postnorm", checkpoint_root)
  key = "encoder.layers.0.attention.q_proj.weight"
  path = _edited_copy(
    directory, str(tmp_path / "shape"), lambda t: t.update({key: np.zeros((32, 8), np.float32)})
  )
  with pytest.raises(CheckpointError, match=r"\(32, 8\).*\(32, 32\)"):
    load_wav2vec2(os.path.dirname(path))


def test_bfloat16_safetensors_are_read_as_float32(tmp_path):
  from safetensors.torch import save_file as save_torch_file

  weight = torch.randn(3, 5).to(torch.bfloat16)
  save_torch_file({"w": weight}, str(tmp_path / "model.safetensors"))
  state = read_state_dict(tmp_path)
  value = state.take("w", (3, 5))
  assert value.dtype == np.float32
  np.testing.assert_array_equal(value, weight.float().numpy())


def test_directory_without_weights_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
    load_wav2vec2(tmp_path)


def test_other_model_types_are_refused():
  with pytest.raises(ValueError, match="wavlm"):
    Wav2Vec2Encoder.from_hf_config({"model_type": "wavlm"})
  with pytest.raises(ValueError, match="add_adapter"):
    Wav2Vec2Encoder.from_hf_config({"model_type": "wav2vec2", "add_adapter": True})


def test_variants_have_the_published_shapes():
  base = Wav2Vec2Encoder.from_variant("base")
  assert (base.hidden_size, base.num_hidden_layers, base.receptive_field) == (768, 12, 400)
  assert base.num_audio_frames(16000) == 49  # 20 ms hop, 25 ms window
  large = Wav2Vec2Encoder.from_variant("large", dtype=jnp.bfloat16)
  assert (large.hidden_size, large.do_stable_layer_norm, large.dtype) == (1024, True, jnp.bfloat16)
  with pytest.raises(ValueError, match="huge"):
    Wav2Vec2Encoder.from_variant("huge")
  with pytest.raises(ValueError, match="num_attention_heads"):
    Wav2Vec2Encoder(hidden_size=30, num_attention_heads=4)


# A small encoder for behaviour tests: 3 convs with a 20-sample hop (1000 samples -> 49 frames).
MICRO = dict(
  conv_dim=(16, 16, 16),
  conv_kernel=(10, 3, 3),
  conv_stride=(5, 2, 2),
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  num_conv_pos_embeddings=8,
  num_conv_pos_embedding_groups=4,
  mask_time_prob=0.3,
  mask_feature_prob=0.2,
)


def _micro_params(dtype=jnp.float32):
  """The MICRO encoder with random numpy params (compiling `init` costs more than the tests)."""
  encoder = Wav2Vec2Encoder(**MICRO, dtype=dtype)
  audio = jax.random.normal(jax.random.key(1), (2, 1000))  # [B, S]
  shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), audio))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), nn.meta.unbox(shapes)
  )
  return encoder, params, audio


def test_feature_extractor_is_freezable_by_name():
  """`optim.freeze=("feature_extractor",)` selects exactly the conv stack's parameters."""
  encoder = Wav2Vec2Encoder.from_variant("base")
  audio = jnp.zeros((1, encoder.receptive_field))
  params = nn.meta.unbox(jax.eval_shape(lambda: encoder.init(jax.random.key(0), audio))["params"])
  mask = traverse_util.flatten_dict(trainable_mask(params, ("feature_extractor",)), sep="/")
  frozen = {path for path, trainable in mask.items() if not trainable}
  assert frozen == {path for path in mask if path.startswith("feature_extractor/")}
  assert "feature_extractor/conv_layers_0/conv/kernel" in frozen
  assert len(frozen) == 9 and len(mask) > len(frozen)  # 7 conv kernels + group norm scale, bias


def test_frozen_feature_extractor_gets_no_updates():
  _, params, _ = _micro_params()
  optim = base_config().optim
  optim.update(lr=1e-2, schedule="constant", weight_decay=0.1, freeze=("feature_extractor",))
  tx, _ = make_optimizer(optim, total_steps=10)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  for path, update in traverse_util.flatten_dict(updates, sep="/").items():
    moved = bool(np.any(np.asarray(update) != 0))
    assert moved != path.startswith("feature_extractor/"), path


def test_batch_norm_statistics_stay_as_loaded_under_adamw_with_weight_decay():
  # HuBERT's positional-conv batch norm keeps its running statistics among the parameters.
  fields = dict(CONFIGS["hubert_group_postnorm_batch_norm"][1], layerdrop=0.0)
  encoder = Wav2Vec2Encoder(**fields)
  audio = np.random.default_rng(0).standard_normal((2, NUM_SAMPLES)).astype(np.float32)
  params = jax.jit(encoder.init)(jax.random.key(0), audio)["params"]
  params = jax.tree.map(lambda x: np.asarray(x) + 0.5, nn.meta.unbox(params))  # "loaded" stats
  optim = base_config().optim
  optim.update(optimizer="adamw", lr=1e-2, schedule="constant", weight_decay=0.1)
  tx, _ = make_optimizer(optim, total_steps=10)
  loss = lambda p: jnp.mean(encoder.apply({"params": p}, audio)[0] ** 2)

  @jax.jit
  def steps(params):
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return params

  before = traverse_util.flatten_dict(params, sep="/")
  after = traverse_util.flatten_dict(steps(params), sep="/")
  statistics = [path for path in before if re.search(r"batch_norm/(mean|var)$", path)]
  assert len(statistics) == 2, sorted(before)
  for path, value in before.items():
    unchanged = np.array_equal(np.asarray(after[path]), value)
    assert unchanged == (path in statistics), path


def test_train_mode_is_stochastic_finite_and_differentiable():
  encoder, params, audio = _micro_params()

  def loss(params, seed):
    rngs = {"dropout": jax.random.key(seed)}
    hidden, _ = encoder.apply({"params": params}, audio, train=True, rngs=rngs)
    return jnp.mean(hidden**2), hidden

  loss_and_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, a), grads = loss_and_grads(params, 0)
  (_, b), _ = loss_and_grads(params, 1)
  (_, a_again), _ = loss_and_grads(params, 0)
  np.testing.assert_array_equal(a, a_again)
  assert not np.allclose(a, b)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["masked_spec_embed"]).sum() > 0  # time masks were applied


def test_bfloat16_compute_keeps_float32_params():
  encoder, params, audio = _micro_params(jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  hidden, _ = _apply(encoder, params, audio)
  reference, _ = _apply(encoder.clone(dtype=jnp.float32), params, audio)
  assert hidden.dtype == jnp.bfloat16
  assert np.abs(np.asarray(hidden, np.float32) - reference).mean() < 0.1


def test_exports_with_symbolic_audio_length():
  encoder, params, _ = _micro_params()
  batch, samples = jax.export.symbolic_shape(
    "b, s", constraints=(f"s >= {encoder.receptive_field}",)
  )
  audio = jax.ShapeDtypeStruct((batch, samples), jnp.float32)

  def encode(audio):  # mesh frames at 30 fps of 16 kHz audio, FaceFormer's VOCASET alignment
    return encoder.apply({"params": params}, audio, num_frames=audio.shape[1] * 30 // 16000)[0]

  exported = jax.export.export(jax.jit(encode))(audio)
  assert exported.out_avals[0].shape[0] == batch
  assert str(exported.out_avals[0].shape[1]) == "floordiv(30*s, 16000)"


def test_params_carry_logical_axis_names():
  encoder = Wav2Vec2Encoder.from_variant("tiny")
  audio = jnp.zeros((1, encoder.receptive_field))
  boxed = jax.eval_shape(lambda: encoder.init(jax.random.key(0), audio))["params"]
  layers = boxed["encoder"]["layers"]
  assert layers["attention"]["q_proj"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  assert layers["feed_forward"]["intermediate_dense"]["kernel"].names == ("layers", "embed", "mlp")
  conv = boxed["feature_extractor"]["conv_layers_1"]["conv"]["kernel"]
  assert conv.names == ("kernel", "conv_in", "conv_out")
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)


@pytest.mark.parametrize(
  ("num_audio_frames", "num_frames"), [(50, 30), (7, 13), (9, 1), (1, 4), (31, 31)]
)
def test_interpolate_features_matches_torch_align_corners(num_audio_frames, num_frames):
  features = np.random.default_rng(3).standard_normal((2, num_audio_frames, 5)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
    torch.from_numpy(features).transpose(1, 2), size=num_frames, mode="linear", align_corners=True
  ).transpose(1, 2)
  got = interpolate_features(jnp.asarray(features), num_frames)
  np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_interpolate_features_per_example_lengths_equal_unpadded():
  features = np.random.default_rng(4).standard_normal((2, 40, 3)).astype(np.float32)
  got = interpolate_features(
    jnp.asarray(features),
    24,
    source_lengths=jnp.array([40, 25]),
    target_lengths=jnp.array([24, 15]),
  )
  np.testing.assert_allclose(got[0], interpolate_features(features[:1], 24)[0], atol=1e-6)
  np.testing.assert_allclose(got[1, :15], interpolate_features(features[1:, :25], 15)[0], atol=1e-6)


def test_pair_audio_frames_crops_and_pads():
  features = jnp.arange(2 * 11 * 1, dtype=jnp.float32).reshape(2, 11, 1)
  cropped = pair_audio_frames(features, 4)
  np.testing.assert_array_equal(cropped, features[:, :8])
  padded = pair_audio_frames(features, 7, frames_per_frame=2)
  assert padded.shape == (2, 14, 1)
  np.testing.assert_array_equal(padded[:, :11], features)
  assert float(jnp.abs(padded[:, 11:]).sum()) == 0


def test_encoder_aligns_features_to_mesh_frames():
  encoder, params, audio = _micro_params()  # 1000 samples -> 49 audio frames
  audio_mask = jnp.arange(1000)[None] < jnp.array([[1000], [600]])  # 600 samples -> 29 frames
  frame_mask = jnp.arange(20)[None] < jnp.array([[20], [12]])
  hidden, aux = _apply(encoder, params, audio, audio_mask, frame_mask=frame_mask)
  assert hidden.shape == (2, 20, 32)
  np.testing.assert_array_equal(aux["frame_mask"], frame_mask)

  pairs = encoder.clone(frame_alignment="pairs")
  hidden, aux = _apply(pairs, params, audio, audio_mask, num_frames=26)
  assert hidden.shape == (2, 52, 32)
  # 49 audio frames make 24 pairs (the odd one is dropped), 29 make 14.
  np.testing.assert_array_equal(aux["frame_mask"].sum(-1), [48, 28])


def test_causal_encoder_resamples_padded_batches_to_mesh_frames():
  encoder, params, _ = _micro_params()
  encoder = encoder.clone(causal=True, feat_extract_norm="frame", fps=30.0)  # hop 20 samples
  audio = np.random.default_rng(5).standard_normal((2, 3200)).astype(np.float32)
  audio[1, 1600:] = 0.0
  audio_mask = jnp.arange(3200)[None] < jnp.array([[3200], [1600]])
  frame_mask = jnp.arange(6)[None] < jnp.array([[6], [3]])
  hidden, aux = _apply(encoder, params, audio, audio_mask, frame_mask=frame_mask)
  assert hidden.shape == (2, 6, 32)  # 160 audio frames -> 6 mesh frames at 30 fps
  np.testing.assert_array_equal(aux["frame_mask"], frame_mask)
  alone, alone_aux = _apply(encoder, params, audio[1:, :1600])  # whole mesh frames: 3
  assert alone.shape == (1, 3, 32) and alone_aux["frame_mask"].all()
  np.testing.assert_allclose(hidden[1, :3], alone[0], atol=1e-5, rtol=0)
  # Without a frame mask, mesh frames that read padded audio frames are the invalid ones.
  _, aux = _apply(encoder, params, audio, audio_mask, num_frames=6)
  np.testing.assert_array_equal(aux["frame_mask"].sum(-1), [6, 3])


def test_resampling_fields_are_checked():
  with pytest.raises(ValueError, match="fps=30 resamples a causal encoder's frames"):
    Wav2Vec2Encoder.from_variant("tiny", fps=30.0)
  with pytest.raises(ValueError, match="fps=60 is above the audio frame rate"):
    Wav2Vec2Encoder.from_variant("tiny", causal=True, feat_extract_norm="frame", fps=60.0)
  encoder, params, audio = _micro_params()
  with pytest.raises(ValueError, match="causal encoder with fps=0 returns one frame per hop"):
    _apply(encoder.clone(causal=True, feat_extract_norm="frame"), params, audio, num_frames=4)


def test_span_mask_respects_lengths_and_counts():
  masker = jax.jit(span_mask, static_argnums=(2, 3, 4, 5))
  lengths = jnp.array([200, 120, 9, 200])
  mask = np.asarray(masker(jax.random.key(0), lengths, 200, 0.3, 10, 2))
  for row, length in zip(mask, np.asarray(lengths), strict=True):
    assert not row[length:].any()
  assert mask[2].sum() == 0  # 9 frames cannot hold a span of 10
  assert 10 <= mask[0].sum() <= 7 * 10  # at most int(0.3 * 200 / 10 + 1) spans
  fractions = [
    masker(jax.random.key(s), jnp.full((8,), 1000), 1000, 0.3, 10, 0).mean() for s in range(4)
  ]
  assert 0.15 < np.mean(fractions) < 0.3  # overlaps make 0.3 an upper bound


@pytest.mark.parametrize(
  "method, length, padding",
  [
    ("auto", 37, (8, 8)),
    ("fft", 37, (8, 8)),
    ("fft", 37, (15, 0)),
    ("fft", 37, (0, 0)),
    ("shifted", 37, (8, 8)),
    ("shifted", 37, (15, 0)),
    ("shifted", 37, (0, 0)),
    ("shifted", 12, (8, 8)),
    ("auto", 12, (15, 0)),
  ],
)
def test_grouped_conv1d_equals_the_native_grouped_convolution_and_its_gradients(
  method, length, padding
):
  from fdjax.models.wav2vec2 import grouped_conv1d

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, length, 32)), jnp.float32)
  kernel = jnp.asarray(0.1 * rng.normal(size=(16, 8, 32)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, length + sum(padding) - 15, 32)), jnp.float32)

  def native(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, (1,), (padding,), dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=4
    )

  ours = lambda x, kernel: grouped_conv1d(x, kernel, padding, 4, method=method)
  np.testing.assert_allclose(ours(x, kernel), native(x, kernel), atol=1e-5)
  loss = lambda f: lambda x, kernel: jnp.sum((f(x, kernel) - target) ** 2)
  got = jax.grad(loss(ours), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(native), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
