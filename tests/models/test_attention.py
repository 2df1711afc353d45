"""The one attention of fdjax against a plain numpy reference, and its implementation choice."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.models.attention import (
  BlockNames,
  MultiHeadAttention,
  TransformerBlock,
  aligned_attention,
  attention_weights,
  cudnn_unsupported,
  dot_product_attention,
)

BATCH, LENGTH, WIDTH, HEADS = 2, 6, 16, 4
HEAD_DIM = WIDTH // HEADS


def _array(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _softmax(scores):
  scores = scores - scores.max(axis=-1, keepdims=True)
  weights = np.exp(scores)
  return weights / weights.sum(axis=-1, keepdims=True)


def reference(params, inputs_q, inputs_kv, bias=None, mask=None, past=None):
  """Multi-head attention in float64 numpy: projections, scaled scores, bias, mask, softmax."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x, source = np.asarray(inputs_q, np.float64), np.asarray(inputs_kv, np.float64)
  query = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
  key = np.einsum("bsd,dhk->bshk", source, p["key"]["kernel"]) + p["key"]["bias"]
  value = np.einsum("bsd,dhk->bshk", source, p["value"]["kernel"]) + p["value"]["bias"]
  if past is not None:
    key = np.concatenate([np.asarray(past[0], np.float64), key], axis=1)
    value = np.concatenate([np.asarray(past[1], np.float64), value], axis=1)
  scores = np.einsum("bthk,bshk->bhts", query, key) / np.sqrt(query.shape[-1])
  if bias is not None:
    scores = scores + np.asarray(bias, np.float64)
  if mask is not None:
    scores = np.where(np.asarray(mask), scores, -1e300)
  weights = _softmax(scores)
  heads = np.einsum("bhts,bshk->bthk", weights, value)
  out = np.einsum("bthk,hkd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  return out, weights


def _module_and_params(**fields):
  module = MultiHeadAttention(num_heads=HEADS, **fields)
  params = nn.unbox(module.init(jax.random.key(0), _array(0, BATCH, LENGTH, WIDTH))["params"])
  # Non-zero biases, so that a projection's bias cannot go missing unnoticed.
  params = jax.tree.map(lambda a: a + 0.1 * _array(1, *a.shape), params)
  return module, params


def _causal_window(queries, keys, window, offset=0):
  """[Tq, Tk] bool: query i (at position offset + i) sees keys (pos - window, pos]."""
  query = offset + np.arange(queries)[:, None]
  key = np.arange(keys)[None, :]
  return (key <= query) & (key > query - window)


MASKS = {
  "key_padding": np.arange(LENGTH)[None, None, None, :]
  < np.array([LENGTH, 3])[:, None, None, None],
  "causal_window": _causal_window(LENGTH, LENGTH, 3)[None, None],
  "none": None,
}


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_self_attention_matches_the_numpy_reference(mask_name, with_bias):
  module, params = _module_and_params()
  x = _array(2, BATCH, LENGTH, WIDTH)
  mask = MASKS[mask_name]
  bias = _array(3, 1, HEADS, LENGTH, LENGTH) if with_bias else None
  out, (key, value) = module.apply(
    {"params": params}, x, bias=bias, mask=None if mask is None else jnp.asarray(mask)
  )
  expected, _ = reference(params, x, x, bias, mask)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert key.shape == value.shape == (BATCH, LENGTH, HEADS, HEAD_DIM)


def test_cross_attention_matches_the_numpy_reference():
  module, params = _module_and_params()
  x, memory = _array(2, BATCH, LENGTH, WIDTH), _array(4, BATCH, 9, WIDTH)
  memory_mask = jnp.asarray(
    np.arange(9)[None, None, None, :] < np.array([9, 5])[:, None, None, None]
  )
  out, _ = module.apply({"params": params}, x, memory, mask=memory_mask)
  expected, _ = reference(params, x, memory, mask=memory_mask)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_past_keys_and_values_give_the_frames_of_the_whole_sequence():
  module, params = _module_and_params()
  x = _array(2, BATCH, LENGTH, WIDTH)
  full_mask = jnp.asarray(_causal_window(LENGTH, LENGTH, 4)[None, None])
  whole, _ = module.apply({"params": params}, x, mask=full_mask)
  split = 2
  _, past = module.apply({"params": params}, x[:, :split], mask=full_mask[..., :split, :split])
  later_mask = jnp.asarray(_causal_window(LENGTH - split, LENGTH, 4, offset=split)[None, None])
  later, (key, _) = module.apply({"params": params}, x[:, split:], mask=later_mask, past=past)
  np.testing.assert_allclose(later, whole[:, split:], atol=1e-6)
  expected, _ = reference(params, x[:, split:], x[:, split:], mask=later_mask, past=past)
  np.testing.assert_allclose(later, expected, atol=1e-5)
  assert key.shape == (BATCH, LENGTH - split, HEADS, HEAD_DIM)  # only the new frames' keys


def test_cached_one_frame_steps_equal_the_causal_whole_sequence():
  module, params = _module_and_params()
  x = _array(2, BATCH, LENGTH, WIDTH)
  positions = np.arange(LENGTH)
  whole, _ = module.apply(
    {"params": params}, x, mask=jnp.asarray(positions[None] <= positions[:, None])
  )
  cache = (jnp.zeros((BATCH, LENGTH, HEADS, HEAD_DIM)),) * 2
  steps = []
  for t in range(LENGTH):
    slot = jnp.asarray(positions == t)
    mask = jnp.asarray(positions <= t)[None]  # [1, T]: this frame and the earlier ones
    out, cache = module.apply(
      {"params": params}, x[:, t : t + 1], mask=mask, past=cache, cache_slot=slot
    )
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), whole, atol=1e-6)
  _, (keys, _) = module.apply({"params": params}, x)
  np.testing.assert_allclose(cache[0], keys, atol=1e-6)  # every slot written once


def test_aligned_groups_attend_to_their_own_entries_only():
  module, params = _module_and_params()
  x, groups = _array(2, BATCH, LENGTH, WIDTH), _array(5, BATCH, LENGTH, 2, WIDTH)
  out, _ = module.apply({"params": params}, x, groups)
  flat = groups.reshape(BATCH, 2 * LENGTH, WIDTH)
  own = (np.arange(2 * LENGTH)[None] // 2 == np.arange(LENGTH)[:, None])[None, None]
  expected, _ = reference(params, x, flat, mask=own)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_sown_weights_are_the_weights_the_output_was_made_with():
  module, params = _module_and_params(sow_weights=True)
  x = _array(2, BATCH, LENGTH, WIDTH)
  mask = jnp.asarray(MASKS["key_padding"])
  (out, _), state = module.apply({"params": params}, x, mask=mask, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  expected, expected_weights = reference(params, x, x, mask=mask)
  np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # The output from those weights by hand, and the fused path's output without the sow.
  p = params
  value = jnp.einsum("btd,dhk->bthk", x, p["value"]["kernel"]) + p["value"]["bias"]
  heads = jnp.einsum("bhts,bshk->bthk", weights, value)
  by_hand = jnp.einsum("bthk,hkd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, by_hand, atol=1e-6)
  fused, _ = module.apply({"params": params}, x, mask=mask)
  np.testing.assert_allclose(fused, out, atol=1e-6)


def _qkv(dtype=jnp.float32, queries=5, keys=7):
  return (
    _array(6, BATCH, queries, HEADS, HEAD_DIM).astype(dtype),
    _array(7, BATCH, keys, HEADS, HEAD_DIM).astype(dtype),
    _array(8, BATCH, keys, HEADS, HEAD_DIM).astype(dtype),
  )


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_xla_path_equals_the_explicit_formulation(dtype, atol):
  query, key, value = _qkv(dtype)
  bias = _array(9, 1, HEADS, 5, 7)
  mask = np.ones((BATCH, 1, 5, 7), bool)
  mask[0, 0, 1] = False  # a fully masked row: uniform weights, not NaN
  mask[1, 0, :, 4:] = False
  mask = jnp.asarray(mask)
  fused = dot_product_attention(query, key, value, bias=bias, mask=mask, implementation="xla")
  weights = attention_weights(query, key, bias=bias, mask=mask)
  explicit = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
  assert fused.dtype == explicit.dtype == dtype
  assert np.isfinite(np.asarray(fused, np.float32)).all()
  np.testing.assert_allclose(
    np.asarray(fused, np.float32), np.asarray(explicit, np.float32), atol=atol
  )
  np.testing.assert_allclose(np.asarray(weights[0, :, 1], np.float32), 1 / 7, atol=1e-2)
  np.testing.assert_array_equal(np.asarray(weights[1, :, :, 4:], np.float32), 0)


def test_aligned_attention_is_dot_product_attention_per_frame():
  query, _, _ = _qkv(queries=LENGTH)
  key, value = (
    _array(10, BATCH, LENGTH, 3, HEADS, HEAD_DIM),
    _array(11, BATCH, LENGTH, 3, HEADS, HEAD_DIM),
  )
  out = aligned_attention(query, key, value)
  for t in range(LENGTH):
    frame = dot_product_attention(query[:, t : t + 1], key[:, t], value[:, t])
    np.testing.assert_allclose(out[:, t : t + 1], frame, atol=1e-6)


def test_a_cudnn_request_on_cpu_is_a_clear_error_and_auto_falls_back_to_xla():
  query, key, value = _qkv()
  reason = cudnn_unsupported(query, key, value)
  assert reason is not None and "CUDA GPU" in reason
  with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run here: .*CUDA GPU"):
    dot_product_attention(query, key, value, implementation="cudnn")
  auto = dot_product_attention(query, key, value, implementation="auto")
  xla = dot_product_attention(query, key, value, implementation="xla")
  np.testing.assert_array_equal(auto, xla)
  module, params = _module_and_params()
  with pytest.raises(ValueError, match="cannot run here"):
    module.clone(attention_impl="cudnn").apply({"params": params}, _array(2, 1, 3, WIDTH))
  with pytest.raises(ValueError, match="not one of"):
    dot_product_attention(query, key, value, implementation="flash")


def test_block_names_and_dropout_placement():
  names = BlockNames(
    feed_forward=None,
    norms=("layer_norm1", "layer_norm2"),
    projections=("q_proj", "k_proj", "v_proj", "out_proj"),
    mlp=("fc1", "fc2"),
    dropout="dropout",
  )
  block = TransformerBlock(
    num_heads=HEADS, mlp_dim=32, pre_norm=True, names=names, attention_dropout=0.5
  )
  x = _array(2, BATCH, LENGTH, WIDTH)
  params = block.init(jax.random.key(0), x)["params"]
  assert sorted(params) == [
    "attention", "fc1", "fc2", "layer_norm1", "layer_norm2"
  ]  # fmt: skip
  assert sorted(params["attention"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]
  evaluated, _ = block.apply({"params": params}, x)
  trained, _ = block.apply({"params": params}, x, None, True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(trained - evaluated)).max() > 1e-3  # dropout on the probabilities
  decoder = TransformerBlock(
    num_heads=HEADS,
    mlp_dim=32,
    cross_attention=True,
    names=BlockNames(norms=("a", "b", "c")),
  )
  variables = decoder.init(jax.random.key(0), x, memory=_array(3, BATCH, 4, WIDTH))
  assert sorted(variables["params"]) == [
    "a",
    "attention",
    "b",
    "c",
    "cross_attention",
    "feed_forward",
  ]
  with pytest.raises(ValueError, match="must name 3 norms"):
    decoder.clone(names=BlockNames()).init(jax.random.key(0), x, memory=x)
