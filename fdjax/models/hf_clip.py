"""Load a local Hugging Face CLIP checkpoint directory into `fdjax.models.clip.ClipModel`.

Where it sits: task modules call `load_hf_clip(path)` before fine-tuning, and put the converted
towers into a larger model (`temporal.init_from_clip` for `VideoClassifier`) with
`init_missing_params`; nothing is downloaded.

A checkpoint directory holds `config.json` and the weights as `model.safetensors`, sharded
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`, or `pytorch_model.bin`
(read with `torch`, needed only for that format), as `hf_convert.read_state_dict` reads them.

The mapping from `transformers.CLIPModel` names is a renaming plus layout changes: PyTorch linear
weights `[out, in]` become kernels `[in, out]` (attention ones split into `[D, heads, head_dim]`),
the patch convolution `[D, 3, p, p]` becomes `[p, p, 3, D]`, LayerNorm `weight` becomes `scale`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdjax.models.clip import ClipModel, ClipTextEncoder, ClipVisionEncoder
from fdjax.models.hf_convert import read_state_dict

# transformers' defaults for keys that older config.json files leave out.
_HF_TEXT_DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  eos_token_id=49407,
)
_HF_VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  num_channels=3,
  image_size=224,
  patch_size=32,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)
# Buffers that some checkpoints carry and the model recomputes.
_IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")


def _square(value: Any, field: str, source: str) -> int:
  if isinstance(value, list | tuple):
    if len(set(value)) != 1:
      raise ValueError(f"{source}: vision_config.{field}={value} is not square")
    value = value[0]
  return int(value)


def clip_model_from_hf_config(
  hf_config: Mapping[str, Any], source: str = "config.json", **overrides: Any
) -> ClipModel:
  """The `ClipModel` a `transformers` CLIP `config.json` describes; `overrides` (PEFT fields,
  dtype, remat) go to both towers."""
  text_cfg = {
    **_HF_TEXT_DEFAULTS,
    **(hf_config.get("text_config") or {}),
    **(hf_config.get("text_config_dict") or {}),
  }
  vision_cfg = {
    **_HF_VISION_DEFAULTS,
    **(hf_config.get("vision_config") or {}),
    **(hf_config.get("vision_config_dict") or {}),
  }
  if vision_cfg["num_channels"] != 3:
    raise ValueError(f"{source}: vision_config.num_channels must be 3 (RGB)")
  eos = text_cfg["eos_token_id"]
  if isinstance(eos, list):
    raise ValueError(f"{source}: text_config.eos_token_id must be one id, got {eos}")
  projection_dim = int(hf_config.get("projection_dim") or 512)
  vision = ClipVisionEncoder(
    image_size=_square(vision_cfg["image_size"], "image_size", source),
    patch_size=_square(vision_cfg["patch_size"], "patch_size", source),
    width=vision_cfg["hidden_size"],
    depth=vision_cfg["num_hidden_layers"],
    num_heads=vision_cfg["num_attention_heads"],
    mlp_dim=vision_cfg["intermediate_size"],
    projection_dim=projection_dim,
    hidden_act=vision_cfg["hidden_act"],
    layer_norm_eps=vision_cfg["layer_norm_eps"],
    **overrides,
  )
  text = ClipTextEncoder(
    vocab_size=text_cfg["vocab_size"],
    max_length=text_cfg["max_position_embeddings"],
    width=text_cfg["hidden_size"],
    depth=text_cfg["num_hidden_layers"],
    num_heads=text_cfg["num_attention_heads"],
    mlp_dim=text_cfg["intermediate_size"],
    projection_dim=projection_dim,
    hidden_act=text_cfg["hidden_act"],
    layer_norm_eps=text_cfg["layer_norm_eps"],
    eos_token_id=int(eos),
    **overrides,
  )
  return ClipModel(
    vision=vision,
    text=text,
    logit_scale_init=float(hf_config.get("logit_scale_init_value", math.log(1 / 0.07))),
  )


def _linear(num_heads: int | None = None, split: str | None = None) -> Callable:
  """PyTorch Linear weight [out, in] -> kernel [in, out], heads split out where attention needs."""

  def convert(w: np.ndarray) -> np.ndarray:
    kernel = w.T  # [in, out]
    if split == "out":
      return kernel.reshape(kernel.shape[0], num_heads, -1)  # [D, H, Dh]
    if split == "in":
      return kernel.reshape(num_heads, -1, kernel.shape[1])  # [H, Dh, D]
    return kernel

  return convert


def _bias(num_heads: int | None = None) -> Callable:
  return (lambda b: b) if num_heads is None else (lambda b: b.reshape(num_heads, -1))


def _hf_rules(model: ClipModel) -> list[tuple[re.Pattern, str, Callable]]:
  """(HF key pattern, our path template, value conversion) for every CLIPModel parameter."""
  identity = lambda x: x
  rules = []
  for hf_tower, tower, heads in (
    ("text_model", "text", model.text.num_heads),
    ("vision_model", "vision", model.vision.num_heads),
  ):
    layer = rf"{hf_tower}\.encoder\.layers\.(\d+)\."
    ours = tower + "/encoder/layers_{0}/"
    for proj in ("q", "k", "v"):
      rules += [
        (
          layer + rf"self_attn\.{proj}_proj\.weight",
          ours + f"attention/{proj}_proj/kernel",
          _linear(heads, "out"),
        ),
        (
          layer + rf"self_attn\.{proj}_proj\.bias",
          ours + f"attention/{proj}_proj/bias",
          _bias(heads),
        ),
      ]
    rules += [
      (
        layer + r"self_attn\.out_proj\.weight",
        ours + "attention/out_proj/kernel",
        _linear(heads, "in"),
      ),
      (layer + r"self_attn\.out_proj\.bias", ours + "attention/out_proj/bias", identity),
      (layer + r"mlp\.(fc[12])\.weight", ours + "{1}/kernel", _linear()),
      (layer + r"mlp\.(fc[12])\.bias", ours + "{1}/bias", identity),
      (layer + r"(layer_norm[12])\.weight", ours + "{1}/scale", identity),
      (layer + r"(layer_norm[12])\.bias", ours + "{1}/bias", identity),
    ]
  norms = (
    ("text_model.final_layer_norm", "text/final_layer_norm"),
    ("vision_model.pre_layrnorm", "vision/pre_layernorm"),
    ("vision_model.post_layernorm", "vision/post_layernorm"),
  )
  for hf_name, ours in norms:
    rules += [
      (re.escape(hf_name) + r"\.weight", ours + "/scale", identity),
      (re.escape(hf_name) + r"\.bias", ours + "/bias", identity),
    ]
  rules += [
    (r"text_model\.embeddings\.token_embedding\.weight", "text/token_embedding", identity),
    (r"text_model\.embeddings\.position_embedding\.weight", "text/position_embedding", identity),
    (r"vision_model\.embeddings\.class_embedding", "vision/class_embedding", identity),
    (
      r"vision_model\.embeddings\.position_embedding\.weight",
      "vision/position_embedding",
      identity,
    ),
    (
      r"vision_model\.embeddings\.patch_embedding\.weight",
      "vision/patch_embedding/kernel",
      lambda w: w.transpose(2, 3, 1, 0),
    ),  # [D, 3, p, p] -> [p, p, 3, D]
    (r"visual_projection\.weight", "vision/projection/kernel", _linear()),
    (r"text_projection\.weight", "text/projection/kernel", _linear()),
    (r"logit_scale", "logit_scale", identity),
  ]
  return [(re.compile(pattern + "$"), template, convert) for pattern, template, convert in rules]


def _flat_paths(tree: Any) -> dict[str, Any]:
  flat = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat["/".join(str(k.key) for k in key_path)] = leaf
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _plain(model: ClipModel) -> ClipModel:
  """The same architecture without PEFT parameters: what a checkpoint holds."""
  no_peft = dict(lora_rank=0, adapter_dim=0)
  return model.clone(vision=model.vision.clone(**no_peft), text=model.text.clone(**no_peft))


def abstract_params(model: nn.Module, *inputs: Any) -> dict[str, Any]:
  """Parameter shapes and dtypes of `model` (unboxed), by tracing `init` without allocating."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return nn.meta.unbox(variables)["params"]


def clip_dummy_inputs(model: ClipModel) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Abstract (pixel_values, input_ids) for tracing `model.init`."""
  size = model.vision.image_size
  return (
    jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    jax.ShapeDtypeStruct((1, model.text.max_length), jnp.int32),
  )


def _match_rule(key: str, rules: list) -> tuple[str, Callable] | None:
  """(our path, value conversion) of the first rule matching a HF key, or None."""
  for pattern, template, convert in rules:
    match = pattern.match(key)
    if match:
      return template.format(*match.groups()), convert
  return None


def convert_clip_state_dict(
  state_dict: Mapping[str, np.ndarray], model: ClipModel, source: str = "state dict"
) -> dict[str, Any]:
  """The params (nested dict of float32 numpy arrays, no PEFT leaves) of a CLIPModel state dict.

  Raises ValueError naming `source` and the missing, unexpected or mis-shaped keys.
  """
  plain = _plain(model)
  expected = _flat_paths(abstract_params(plain, *clip_dummy_inputs(plain)))
  rules = _hf_rules(plain)
  converted: dict[str, np.ndarray] = {}
  unexpected, mis_shaped = [], []
  for key, value in state_dict.items():
    if _IGNORED_KEYS.search(key):
      continue
    found = _match_rule(key, rules)
    if found is None or found[0] not in expected:
      unexpected.append(key)
      continue
    path, convert = found
    array = convert(np.asarray(value, dtype=np.float32))
    if array.shape != expected[path].shape:
      mis_shaped.append(f"{key} -> {path}: {array.shape} != {expected[path].shape}")
      continue
    converted[path] = array
  missing = sorted(set(expected) - set(converted))
  problems = []
  if missing:
    problems.append(f"missing parameters {missing}")
  if unexpected:
    problems.append(f"unexpected keys {sorted(unexpected)}")
  if mis_shaped:
    problems.append(f"shape mismatches {mis_shaped}")
  if problems:
    raise ValueError(f"{source}: cannot convert to ClipModel: " + "; ".join(problems))
  return _unflatten(converted)


def init_missing_params(
  model: nn.Module, params: Mapping[str, Any], rng: jax.Array, *inputs: Any
) -> dict[str, Any]:
  """`params` completed with freshly initialised values for the leaves it lacks.

  Runs `model` once on `inputs` with `params` mutable: Flax initialises only the parameters that
  are absent (LoRA, adapters, task heads), so the pretrained ones are kept and no random values
  are drawn (or compiled) for them. Pretrained leaves of the wrong shape raise Flax's
  `ScopeParamShapeError`.
  """

  def fill(params, rng, *inputs):
    _, variables = model.apply(
      {"params": params}, *inputs, rngs={"params": rng}, mutable=["params"]
    )
    return nn.meta.unbox(variables["params"])

  return jax.jit(fill)(params, rng, *inputs)


def load_hf_clip(
  checkpoint_dir: str | Path, *, rng: jax.Array | None = None, **overrides: Any
) -> tuple[ClipModel, dict[str, Any]]:
  """(ClipModel, params) from a local HF CLIP checkpoint directory.

  `overrides` set model fields on both towers (`lora_rank`, `adapter_dim`, `dtype`, ...). When
  they add PEFT parameters, `rng` initialises those, and the returned params hold them too.
  """
  root = Path(checkpoint_dir)
  config_path = root / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{root}: no config.json (not a Hugging Face checkpoint directory)")
  model = clip_model_from_hf_config(
    json.loads(config_path.read_text()), str(config_path), **overrides
  )
  state = read_state_dict(root)
  params = convert_clip_state_dict(state.tensors, model, state.source)
  has_peft = any(
    tower.lora_rank > 0 or tower.adapter_dim > 0 for tower in (model.vision, model.text)
  )
  if has_peft:
    if rng is None:
      raise ValueError("load_hf_clip: PEFT fields were given, so `rng` must initialise them")
    dummy = tuple(jnp.zeros(s.shape, s.dtype) for s in clip_dummy_inputs(model))
    params = init_missing_params(model, params, rng, *dummy)
  return model, params
