"""CLIP encoders: parity with `transformers.CLIPModel`, the checkpoint converter, and PEFT.

Parity uses the same random weights on both sides: a tiny `CLIPModel` (every parameter perturbed,
so biases and LayerNorms are not at their trivial initial values) is saved with `save_pretrained`
and read back through `fdjax.models.hf_clip.load_hf_clip`. Embeddings after projection must agree
within 1e-4 absolute.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fdjax.models import hf_clip
from fdjax.models.clip import (
  clip_model,
  peft_freeze_patterns,
)

ATOL = 1e-4

# Two architectures that differ in every dimension the converter reshapes: patch and image
# size, widths, heads, depths, activation (quick_gelu vs exact gelu), and the pooling rule
# (eos_token_id=2 pools at the largest id; otherwise at the first end-of-text id).
CONFIGS = {
  "quick_gelu_argmax_safetensors": dict(
    vision=dict(
      image_size=32,
      patch_size=8,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      hidden_act="quick_gelu",
    ),
    text=dict(
      vocab_size=99,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      hidden_act="quick_gelu",
      eos_token_id=2,
      bos_token_id=0,
      pad_token_id=1,
    ),
    projection_dim=24,
    safe_serialization=True,
  ),
  "gelu_first_eos_bin": dict(
    vision=dict(
      image_size=30,
      patch_size=6,
      hidden_size=48,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=6,
      hidden_act="gelu",
    ),
    text=dict(
      vocab_size=120,
      hidden_size=40,
      intermediate_size=50,
      num_hidden_layers=1,
      num_attention_heads=5,
      max_position_embeddings=12,
      hidden_act="gelu",
      eos_token_id=98,
      bos_token_id=97,
      pad_token_id=98,
    ),
    projection_dim=16,
    safe_serialization=False,
  ),
}


def _torch_clip(spec: dict, seed: int) -> transformers.CLIPModel:
  config = transformers.CLIPConfig(
    text_config=spec["text"], vision_config=spec["vision"], projection_dim=spec["projection_dim"]
  )
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model


def _text_inputs(spec: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [3, L]: bos, random tokens, an end-of-text token, then padding; and the mask."""
  text = spec["text"]
  vocab, length = text["vocab_size"], text["max_position_embeddings"]
  eos, bos, pad = text["eos_token_id"], text["bos_token_id"], text["pad_token_id"]
  if eos == 2:
    # This rule pools at the largest id, so the end-of-text token is the largest id.
    eos_token = vocab - 1
    ids = rng.integers(3, eos_token, size=(3, length))
  else:
    # Ids above eos_token_id make the first-occurrence rule differ from the largest-id rule.
    eos_token = eos
    ids = rng.integers(3, vocab, size=(3, length))
    ids[np.isin(ids, (eos, bos))] = 3
  ids[:, 0] = bos
  mask = np.ones((3, length), np.int64)
  for row, eos_position in enumerate((length - 1, length // 2, 3)):
    ids[row, eos_position] = eos_token
    ids[row, eos_position + 1 :] = pad
    mask[row, eos_position + 1 :] = 0
  return ids, mask


def _inputs(spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  size = spec["vision"]["image_size"]
  pixel_values = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  ids, mask = _text_inputs(spec, np.random.default_rng(1))
  return pixel_values, ids, mask


def apply(model, params, *inputs):
  return jax.jit(model.apply)({"params": params}, *inputs)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
  """(spec, torch model, its outputs, our model, converted params, checkpoint dir)."""
  spec = CONFIGS[request.param]
  torch_model = _torch_clip(spec, seed=len(request.param))
  checkpoint = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(checkpoint)
  if not spec["safe_serialization"]:
    # transformers 5 writes safetensors only; older checkpoints ship a pickled state dict.
    (checkpoint / "model.safetensors").unlink()
    torch.save(torch_model.state_dict(), checkpoint / "pytorch_model.bin")
  pixel_values, ids, mask = _inputs(spec)
  with torch.no_grad():
    pixels_t, ids_t, mask_t = map(torch.from_numpy, (pixel_values, ids, mask))
    expected = dict(
      image=torch_model.get_image_features(pixel_values=pixels_t),
      text=torch_model.get_text_features(input_ids=ids_t, attention_mask=mask_t),
      both=torch_model(input_ids=ids_t, pixel_values=pixels_t, attention_mask=mask_t),
    )
  model, params = hf_clip.load_hf_clip(checkpoint)
  with jax.default_matmul_precision("highest"):
    ours = apply(model, params, pixel_values.transpose(0, 2, 3, 1), ids, mask)
  return dict(
    spec=spec,
    torch_model=torch_model,
    expected=expected,
    model=model,
    params=params,
    ours=ours,
    checkpoint=checkpoint,
  )


def test_image_embeds_match_transformers(converted):
  expected, (_, aux) = converted["expected"]["image"], converted["ours"]
  np.testing.assert_allclose(aux["image_embeds"], expected.pooler_output, atol=ATOL, rtol=0)
  np.testing.assert_allclose(
    aux["vision"]["last_hidden_state"], expected.last_hidden_state, atol=ATOL, rtol=0
  )


def test_text_embeds_match_transformers(converted):
  expected, (_, aux) = converted["expected"]["text"], converted["ours"]
  np.testing.assert_allclose(aux["text_embeds"], expected.pooler_output, atol=ATOL, rtol=0)
  valid = _inputs(converted["spec"])[2].astype(bool)
  np.testing.assert_allclose(
    np.asarray(aux["text"]["last_hidden_state"])[valid],
    expected.last_hidden_state.numpy()[valid],
    atol=ATOL,
    rtol=0,
  )


def test_logits_and_temperature_match_transformers(converted):
  expected, (logits, aux) = converted["expected"]["both"], converted["ours"]
  torch_scale = converted["torch_model"].logit_scale.exp().item()
  assert float(aux["logit_scale"]) == pytest.approx(torch_scale, rel=1e-6)
  np.testing.assert_allclose(logits, expected.logits_per_image, atol=ATOL, rtol=0)


def test_converter_reads_bfloat16_safetensors(tmp_path):
  spec = CONFIGS["quick_gelu_argmax_safetensors"]
  torch_model = _torch_clip(spec, seed=5).to(torch.bfloat16)
  torch_model.save_pretrained(tmp_path)
  _, params = hf_clip.load_hf_clip(tmp_path)
  expected = torch_model.text_projection.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["text"]["projection"]["kernel"], expected)


def test_converter_reads_sharded_safetensors(converted, tmp_path):
  converted["torch_model"].save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  _, params = hf_clip.load_hf_clip(tmp_path)
  for path, a, b in zip(
    _paths(params), jax.tree.leaves(params), jax.tree.leaves(converted["params"])
  ):
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_converter_names_missing_and_unexpected_keys(converted):
  torch_model, model = converted["torch_model"], converted["model"]
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  state.pop("text_projection.weight")
  state["vision_model.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="my-file") as error:
    hf_clip.convert_clip_state_dict(state, model, source="my-file")
  assert "text/projection/kernel" in str(error.value)
  assert "vision_model.extra.weight" in str(error.value)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_clip.load_hf_clip(converted["checkpoint"] / "nowhere")


@pytest.mark.parametrize("converted", ["quick_gelu_argmax_safetensors"], indirect=True)
def test_peft_model_at_init_equals_plain_model(converted):
  spec, params = converted["spec"], converted["params"]
  peft_model, peft_params = hf_clip.load_hf_clip(
    converted["checkpoint"],
    rng=jax.random.key(0, impl="unsafe_rbg"),  # compiles faster than threefry on CPU
    lora_rank=4,
    lora_targets=("q_proj", "v_proj", "fc1"),
    adapter_dim=8,
  )
  pixel_values, ids, mask = _inputs(spec)
  inputs = (pixel_values.transpose(0, 2, 3, 1), ids, mask)
  plain_logits, plain_aux = converted["ours"]
  peft_apply = jax.jit(peft_model.apply)
  precision = jax.default_matmul_precision("highest")
  with precision:
    peft_logits, peft_aux = peft_apply({"params": peft_params}, *inputs)
  np.testing.assert_allclose(peft_aux["image_embeds"], plain_aux["image_embeds"], atol=1e-6)
  np.testing.assert_allclose(peft_aux["text_embeds"], plain_aux["text_embeds"], atol=1e-6)
  np.testing.assert_allclose(peft_logits, plain_logits, atol=1e-6)
  # Pretrained leaves come through unchanged; the new ones are exactly the PEFT ones.
  np.testing.assert_array_equal(
    peft_params["vision"]["position_embedding"], params["vision"]["position_embedding"]
  )
  new_leaves = set(_paths(peft_params)) - set(_paths(params))
  assert new_leaves and all(re.search("lora_[ab]$|adapter_", p) for p in new_leaves)
  assert any("fc1/lora_a" in p for p in new_leaves)

  # Each PEFT path is live: moving its zero-initialised factors changes both towers. (Random
  # values: a constant shift of every feature would vanish in the next LayerNorm.)
  for moved_factor in ("lora_b", "adapter_.*/up/kernel"):
    noise = np.random.default_rng(6)

    def perturb(path, leaf, moved_factor=moved_factor, noise=noise):
      if re.search(moved_factor, "/".join(str(k.key) for k in path)):
        return leaf + 0.1 * noise.normal(size=leaf.shape).astype(np.float32)
      return leaf

    moved = jax.tree_util.tree_map_with_path(perturb, peft_params)
    with precision:
      _, moved_aux = peft_apply({"params": moved}, *inputs)
    assert np.abs(moved_aux["image_embeds"] - plain_aux["image_embeds"]).max() > 1e-3
    assert np.abs(moved_aux["text_embeds"] - plain_aux["text_embeds"]).max() > 1e-3


def _paths(params) -> list[str]:
  return [
    "/".join(str(k.key) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]


@pytest.mark.parametrize(
  "peft,max_fraction", [(dict(adapter_dim=64), 0.05), (dict(lora_rank=8), 0.01)]
)
def test_freeze_patterns_leave_only_peft_trainable_for_b16(peft, max_fraction):
  model = clip_model("B/16", peft_text=False, **peft)
  params = hf_clip.abstract_params(model, *hf_clip.clip_dummy_inputs(model))
  frozen_re = [re.compile(p) for p in peft_freeze_patterns()]
  sizes = {path: leaf.size for path, leaf in zip(_paths(params), jax.tree.leaves(params))}
  trainable = {path for path in sizes if not any(r.search(path) for r in frozen_re)}
  assert trainable and all(("lora" in p or "adapter" in p) for p in trainable)
  assert all(p.startswith("vision/") for p in trainable)
  total = sum(sizes.values())
  trainable_count = sum(sizes[p] for p in trainable)
  # What stays frozen is exactly openai/clip-vit-base-patch16: 149,620,737 parameters.
  assert total - trainable_count == 149_620_737
  assert params["vision"]["position_embedding"].shape == (197, 768)
  fraction = trainable_count / total
  print(
    f"B/16 CLIP {peft}: {total} parameters, {trainable_count} ({100 * fraction:.2f}%) trainable"
  )
  assert 0 < fraction < max_fraction


@pytest.mark.parametrize("converted", ["quick_gelu_argmax_safetensors"], indirect=True)
def test_remat_changes_memory_not_values(converted):
  vision, params = converted["model"].vision, converted["params"]["vision"]
  pixels = _inputs(converted["spec"])[0].transpose(0, 2, 3, 1)

  def grads(tower):
    def loss(params):
      image_embeds, _ = tower.apply({"params": params}, pixels)
      return jnp.sum(image_embeds**2)

    return jax.jit(jax.grad(loss))(params)

  plain, remat = grads(vision), grads(vision.clone(remat=True))
  for path, a, b in zip(_paths(plain), jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
