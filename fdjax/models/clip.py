"""CLIP image and text encoders in Flax Linen, with LoRA and bottleneck adapters built in.

Where it sits: the video expression and action-unit models (`fdjax.models.temporal`) run every
frame through `ClipVisionEncoder` and, for text-prompt classifiers, the class descriptions through
`ClipTextEncoder`. Pretrained weights come from a local Hugging Face checkpoint through
`fdjax.models.hf_clip`; the layer layout follows `transformers.CLIPModel` so that the converter is
a renaming plus transposes, and the parity tests hold to 1e-4.

Parameter-efficient fine-tuning (PEFT) is chosen by fields: `lora_rank > 0` adds a low-rank update
`(alpha / rank) * x A B` beside the projections named in `lora_targets` (B starts at zero), and
`adapter_dim > 0` adds a bottleneck adapter after the attention and after the MLP of every block
(the up-projection starts at zero). Both start as the identity, so a freshly initialised PEFT
model computes exactly what the plain model computes. Their parameters live under names holding
`lora` / `adapter`, and `peft_freeze_patterns()` gives the `config.optim.freeze` regexes that
freeze everything else.

Layouts: images are `[B, H, W, 3]` float, already normalised with `CLIP_MEAN` / `CLIP_STD`
(PyTorch's NCHW pixel values convert with `x.transpose(0, 2, 3, 1)`); token ids are `[B, L]` int.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models import layers
from fdjax.models.attention import BlockNames, TransformerBlock, padding_mask

Array = jax.Array
Dtype = Any

# CLIP's image normalisation (OpenAI's training statistics), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tower(width: int, depth: int, num_heads: int, projection_dim: int, **fields: Any) -> dict:
  """Keyword arguments of one CLIP tower; CLIP's MLP is always four times the width."""
  return dict(
    width=width,
    depth=depth,
    num_heads=num_heads,
    mlp_dim=4 * width,
    projection_dim=projection_dim,
    **fields,
  )


# The hyper-parameters of the public OpenAI checkpoints (and a CPU-sized one for tests and smoke
# runs): keyword arguments of `ClipVisionEncoder` and `ClipTextEncoder`.
CLIP_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
  "B/32": dict(
    vision=_tower(768, 12, 12, 512, image_size=224, patch_size=32), text=_tower(512, 12, 8, 512)
  ),
  "B/16": dict(
    vision=_tower(768, 12, 12, 512, image_size=224, patch_size=16), text=_tower(512, 12, 8, 512)
  ),
  "L/14": dict(
    vision=_tower(1024, 24, 16, 768, image_size=224, patch_size=14),
    text=_tower(768, 12, 12, 768),
  ),
  "L/14-336": dict(
    vision=_tower(1024, 24, 16, 768, image_size=336, patch_size=14),
    text=_tower(768, 12, 12, 768),
  ),
  # CPU-sized: "small" sees faces at 64 pixels (patches of 8), enough for brows, eyelids and lip
  # corners; "tiny" (32 pixels) is for tests only.
  "small": dict(
    vision=_tower(128, 4, 4, 128, image_size=64, patch_size=8), text=_tower(64, 2, 4, 128)
  ),
  "tiny": dict(vision=_tower(64, 2, 4, 32, image_size=32, patch_size=8), text=_tower(32, 2, 4, 32)),
}

# The fields that configure parameter-efficient fine-tuning rather than the architecture.
PEFT_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "adapter_dim")

# The transformer blocks' parameter names, as `transformers.CLIPEncoderLayer` names them; the MLP
# layers fc1, fc2 sit in the block itself.
BLOCK_NAMES = BlockNames(
  feed_forward=None,
  norms=("layer_norm1", "layer_norm2"),
  projections=("q_proj", "k_proj", "v_proj", "out_proj"),
  mlp=("fc1", "fc2"),
  dropout="dropout",
)

# Dense kernels (patch embedding aside): truncated normal with fan-in variance.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def clip_variant(name: str) -> dict[str, dict[str, Any]]:
  """The `{"vision": kwargs, "text": kwargs}` of a named CLIP variant ("B/16", "tiny", ...)."""
  if name not in CLIP_VARIANTS:
    raise ValueError(f"unknown CLIP variant {name!r}; known: {sorted(CLIP_VARIANTS)}")
  return {tower: dict(kwargs) for tower, kwargs in CLIP_VARIANTS[name].items()}


def peft_freeze_patterns(trainable: Sequence[str] = ("lora", "adapter", "head")) -> tuple[str, ...]:
  """`config.optim.freeze` regexes that freeze every parameter whose path names none of `trainable`.

  The framework freezes a parameter when a regex `re.search`es its "/"-joined path, so one
  negative look-ahead leaves trainable exactly the LoRA factors, the adapters and the task head
  (`temporal_head/...` in `VideoClassifier`); add names such as "logit_scale" to train more.
  """
  if not trainable:
    raise ValueError("peft_freeze_patterns: `trainable` names no parameters; nothing would train")
  names = "|".join(trainable)
  return (rf"^(?!.*(?:{names})).*$",)


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with logically named parameters and PyTorch's two-pass variance."""
  return layers.layer_norm(epsilon=epsilon, dtype=dtype, name=name)


class Transformer(nn.Module):
  """A stack of pre-norm `TransformerBlock`s named `layers_{i}` in CLIP's layout; shared by CLIP,
  ViViT and the temporal heads. Attention weights are sown for attention rollout."""

  depth: int  # number of blocks
  num_heads: int  # attention heads per block
  mlp_dim: int  # MLP hidden width
  hidden_act: str = "quick_gelu"  # MLP activation, Hugging Face name
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  lora_rank: int = 0  # LoRA rank (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # projections with LoRA
  adapter_dim: int = 0  # adapter bottleneck (0 = none)
  remat: bool = False  # recompute block activations in the backward pass to save memory
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """x: [B, L, D]; mask: bool [B, 1, L, L] or None. Returns [B, L, D]."""
    block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    for i in range(self.depth):
      x, _ = block(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        activation=self.hidden_act,
        pre_norm=True,
        layer_norm_eps=self.layer_norm_eps,
        adapter_dim=self.adapter_dim,
        lora_rank=self.lora_rank,
        lora_alpha=self.lora_alpha,
        lora_targets=tuple(self.lora_targets),
        attention_kernel_init=_KERNEL_INIT,
        mlp_kernel_init=_KERNEL_INIT,
        names=BLOCK_NAMES,
        sequence_axis=None,
        sow_attention_weights=True,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        name=f"layers_{i}",
      )(x, mask)
    return x


def _tower_transformer(tower: ClipVisionEncoder | ClipTextEncoder) -> Transformer:
  """The `encoder` transformer of a CLIP tower, configured by the tower's fields."""
  return Transformer(
    depth=tower.depth,
    num_heads=tower.num_heads,
    mlp_dim=tower.mlp_dim,
    hidden_act=tower.hidden_act,
    layer_norm_eps=tower.layer_norm_eps,
    lora_rank=tower.lora_rank,
    lora_alpha=tower.lora_alpha,
    lora_targets=tower.lora_targets,
    adapter_dim=tower.adapter_dim,
    remat=tower.remat,
    attention_impl=tower.attention_impl,
    dtype=tower.dtype,
    name="encoder",
  )


def _embedding(module: nn.Module, name: str, shape: tuple[int, ...], stddev: float, axes) -> Array:
  init = nn.initializers.normal(stddev=stddev)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _projection(tower: ClipVisionEncoder | ClipTextEncoder) -> layers.DenseGeneral:
  """A tower's bias-free projection into the joint image-text embedding."""
  return layers.DenseGeneral(
    features=tower.projection_dim,
    kernel_axes=("embed", None),
    use_bias=False,
    kernel_init=_KERNEL_INIT,
    lora_rank=tower.lora_rank if "projection" in tower.lora_targets else 0,
    lora_alpha=tower.lora_alpha,
    dtype=tower.dtype,
    name="projection",
  )


class ClipVisionEncoder(nn.Module):
  """CLIP's ViT: patches + class token + positions, pre-LN, transformer, post-LN, projection."""

  image_size: int = 224  # input height and width in pixels
  patch_size: int = 16  # square patch side in pixels
  width: int = 768  # transformer width
  depth: int = 12  # transformer blocks
  num_heads: int = 12  # attention heads
  mlp_dim: int = 3072  # MLP hidden width
  projection_dim: int = 512  # size of the joint image-text embedding
  hidden_act: str = "quick_gelu"  # MLP activation, Hugging Face name
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  lora_rank: int = 0  # LoRA rank (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # projections with LoRA
  adapter_dim: int = 0  # adapter bottleneck (0 = none)
  remat: bool = False  # recompute block activations in the backward pass
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)

  @nn.compact
  def __call__(self, pixel_values: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """pixel_values: [B, H, W, 3] normalised. Returns (image_embeds [B, P], aux).

    aux: `last_hidden_state` [B, 1 + N, D] (before the post-LayerNorm, as in HF) and
    `pooled_output` [B, D] (the post-normalised class token).
    """
    del train  # CLIP has no dropout; the flag keeps the module interface uniform
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"pixel_values must be [B, {self.image_size}, {self.image_size}, 3] (NHWC), "
        f"got {pixel_values.shape}"
      )
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
    batch = pixel_values.shape[0]
    patch_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    patches = nn.Conv(
      features=self.width,
      kernel_size=(self.patch_size, self.patch_size),
      strides=(self.patch_size, self.patch_size),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(patch_init, (None, None, "conv_in", "embed")),
      name="patch_embedding",
    )(pixel_values.astype(self.dtype))  # [B, h, w, D]
    patches = patches.reshape(batch, -1, self.width)  # [B, N, D], row-major like HF's flatten
    num_positions = patches.shape[1] + 1
    class_embedding = _embedding(
      self, "class_embedding", (self.width,), self.width**-0.5, ("embed",)
    )
    position_embedding = _embedding(
      self, "position_embedding", (num_positions, self.width), 0.02, (None, "embed")
    )
    class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, self.width))
    x = jnp.concatenate([class_tokens, patches], axis=1) + position_embedding.astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    x = layer_norm(self.layer_norm_eps, self.dtype, "pre_layernorm")(x)
    x = _tower_transformer(self)(x)
    pooled = layer_norm(self.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])  # [B, D]
    image_embeds = _projection(self)(pooled)
    return image_embeds, {"last_hidden_state": x, "pooled_output": pooled}


class ClipTextEncoder(nn.Module):
  """CLIP's causal text transformer, pooled at the end-of-text token, then projected."""

  vocab_size: int = 49408  # token vocabulary size
  max_length: int = 77  # learned positions (longest token sequence)
  width: int = 512  # transformer width
  depth: int = 12  # transformer blocks
  num_heads: int = 8  # attention heads
  mlp_dim: int = 2048  # MLP hidden width
  projection_dim: int = 512  # size of the joint image-text embedding
  hidden_act: str = "quick_gelu"  # MLP activation, Hugging Face name
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  eos_token_id: int = 49407  # end-of-text id; 2 means "pool at the largest id" (old HF configs)
  lora_rank: int = 0  # LoRA rank (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # projections with LoRA
  adapter_dim: int = 0  # adapter bottleneck (0 = none)
  remat: bool = False  # recompute block activations in the backward pass
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)

  @nn.compact
  def __call__(
    self, input_ids: Array, attention_mask: Array | None = None, train: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    """input_ids: int [B, L]; attention_mask: [B, L] (1 = token). Returns (text_embeds [B, P], aux).

    aux: `last_hidden_state` [B, L, D] (after the final LayerNorm) and `pooled_output` [B, D].
    """
    del train  # CLIP has no dropout
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    if length > self.max_length:
      raise ValueError(
        f"input_ids has {length} tokens; the text encoder takes at most "
        f"max_length={self.max_length}"
      )
    token_embedding = _embedding(
      self, "token_embedding", (self.vocab_size, self.width), 0.02, ("vocab", "embed")
    )
    position_embedding = _embedding(
      self, "position_embedding", (self.max_length, self.width), 0.01, (None, "embed")
    )
    x = jnp.take(token_embedding, input_ids, axis=0) + position_embedding[:length]
    x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", None, "embed"))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L]
    if attention_mask is not None:
      mask = mask & padding_mask(attention_mask)  # padded keys are hidden
    x = _tower_transformer(self)(x, mask)
    x = layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    if self.eos_token_id == 2:
      # Configs from before transformers PR #24773 carry eos_token_id=2; the end-of-text token is
      # then found as the largest id, as OpenAI's original code does.
      eos_position = jnp.argmax(input_ids, axis=-1)
    else:
      # The first end-of-text token: padding may reuse the same id after it.
      eos_position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = x[jnp.arange(batch), eos_position]  # [B, D]
    text_embeds = _projection(self)(pooled)
    return text_embeds, {"last_hidden_state": x, "pooled_output": pooled}


class ClipModel(nn.Module):
  """CLIP: an image tower, a text tower and the learned temperature of their cosine similarity.

  Build one with `clip_model("B/16", adapter_dim=64)` or from a checkpoint with
  `fdjax.models.hf_clip.load_hf_clip`. Call `encode_image` / `encode_text` through
  `model.apply(variables, x, method=ClipModel.encode_image)`.
  """

  vision: ClipVisionEncoder  # the image tower
  text: ClipTextEncoder  # the text tower
  logit_scale_init: float = math.log(1 / 0.07)  # initial log temperature (CLIP's 2.6592)

  def setup(self):
    self.logit_scale = self.param(
      "logit_scale",
      nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
      (),
      jnp.float32,
    )

  def encode_image(self, pixel_values: Array, train: bool = False) -> tuple[Array, dict]:
    """pixel_values [B, H, W, 3] normalised -> (image_embeds [B, P], aux)."""
    return self.vision(pixel_values, train)

  def encode_text(
    self, input_ids: Array, attention_mask: Array | None = None, train: bool = False
  ) -> tuple[Array, dict]:
    """input_ids int [B, L], attention_mask [B, L] -> (text_embeds [B, P], aux)."""
    return self.text(input_ids, attention_mask, train)

  def __call__(
    self,
    pixel_values: Array,
    input_ids: Array,
    attention_mask: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """Returns (logits_per_image [B_img, B_txt], aux).

    aux: `image_embeds` [B_img, P] and `text_embeds` [B_txt, P] (projected, not normalised),
    `logit_scale` (the exponentiated temperature), and the towers' own aux under `vision`, `text`.
    """
    image_embeds, vision_aux = self.encode_image(pixel_values, train)
    text_embeds, text_aux = self.encode_text(input_ids, attention_mask, train)
    scale = jnp.exp(self.logit_scale)
    logits_per_image = scale * cosine_similarity(image_embeds, text_embeds)
    aux = {
      "image_embeds": image_embeds,
      "text_embeds": text_embeds,
      "logit_scale": scale,
      "vision": vision_aux,
      "text": text_aux,
    }
    return logits_per_image, aux


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / ||x|| along `axis` in float32 (guards zero vectors)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def cosine_similarity(a: Array, b: Array) -> Array:
  """[N, P] x [M, P] -> [N, M] cosine similarities."""
  return l2_normalize(a) @ l2_normalize(b).T


def clip_model(
  variant: str,
  *,
  peft_text: bool = True,
  vision_overrides: dict[str, Any] | None = None,
  text_overrides: dict[str, Any] | None = None,
  **overrides: Any,
) -> ClipModel:
  """A `ClipModel` of a named variant; `overrides` (PEFT fields, dtype, remat) go to both towers.

  With `peft_text=False` the PEFT fields go to the image tower only. `vision_overrides` and
  `text_overrides` change single-tower fields (e.g. `image_size`).
  """
  config = clip_variant(variant)
  text_shared = {k: v for k, v in overrides.items() if peft_text or k not in PEFT_FIELDS}
  vision = ClipVisionEncoder(**{**config["vision"], **overrides, **(vision_overrides or {})})
  text = ClipTextEncoder(**{**config["text"], **text_shared, **(text_overrides or {})})
  return ClipModel(vision=vision, text=text)
