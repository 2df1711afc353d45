"""Temporal heads over per-frame features, and the CLIP-based video classifier built on them.

Where it sits: the expression (`fdjax.tasks.dfer`) and action-unit (`fdjax.tasks.au`) tasks build a
`VideoClassifier`: every frame of a `video` batch `[B, T, H, W, 3]` goes through a CLIP image
encoder (frozen by `config.optim.freeze`, optionally with LoRA or adapters), a `TemporalHead`
turns the frame embeddings `[B, T, P]` into one clip embedding, and a classifier gives logits
`[B, C]` (expression classes, or action units for multi-label training).

Two classifiers: a linear layer, or, as CLIP-based dynamic expression recognisers (DFER-CLIP) do,
the cosine similarity between the clip embedding and text embeddings of class descriptions
("a face showing happiness", ...) scaled by a learned temperature. The class descriptions are
token ids given as a model field (tokenised once from the prompt lists of the config); several
prompts per class are averaged after normalisation (CLIP's prompt ensembling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models import hf_clip
from fdjax.models.attention import padding_mask
from fdjax.models.clip import (
  CLIP_MEAN,
  CLIP_STD,
  ClipTextEncoder,
  ClipVisionEncoder,
  Transformer,
  clip_variant,
  cosine_similarity,
  l2_normalize,
  layer_norm,
)

Array = jax.Array
Dtype = Any

# Temperatures above 100 make CLIP's contrastive training unstable; CLIP clips there too.
MAX_LOGIT_SCALE = math.log(100.0)


def normalize_video(video: Array, mean: Sequence[float], std: Sequence[float], dtype) -> Array:
  """uint8 (or float in [0, 255]) RGB frames -> (x / 255 - mean) / std in `dtype`."""
  x = video.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


class TemporalHead(nn.Module):
  """Frame features -> temporal transformer -> clip embedding -> class logits."""

  num_classes: int = 7  # expression classes, or action units for multi-label logits
  classifier: str = "linear"  # "linear", or "text": cosine similarity with class embeddings
  width: int = 512  # transformer width; features of another size are projected to it
  depth: int = 1  # temporal transformer blocks
  num_heads: int = 8  # attention heads
  mlp_dim: int = 2048  # MLP hidden width
  max_frames: int = 64  # learned temporal positions: the longest clip it accepts
  pooling: str = "cls"  # "cls": a learned class token; "mean": the mean over valid frames
  dropout: float = 0.0  # dropout on the clip embedding before the classifier (training only)
  logit_scale_init: float = math.log(1 / 0.07)  # initial log temperature of the text classifier
  hidden_act: str = "gelu"  # MLP activation
  remat: bool = False  # recompute block activations in the backward pass
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)

  @nn.compact
  def __call__(
    self,
    features: Array,
    frame_mask: Array | None = None,
    class_embeds: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """features [B, T, D]; frame_mask bool [B, T] (True = real frame); class_embeds [C, P]
    (required by the text classifier). Returns (logits [B, C], aux with `clip_embedding`
    [B, width] and, for the text classifier, `video_embeds` [B, P])."""
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
    if self.classifier not in ("linear", "text"):
      raise ValueError(f"classifier must be 'linear' or 'text', got {self.classifier!r}")
    if self.pooling == "cls" and self.depth < 1:
      raise ValueError("pooling='cls' needs depth >= 1: the class token must attend to frames")
    batch, frames, feature_dim = features.shape
    if frames > self.max_frames:
      raise ValueError(f"features have {frames} frames; the head has max_frames={self.max_frames}")
    if frame_mask is None:
      frame_mask = jnp.ones((batch, frames), bool)
    frame_mask = frame_mask.astype(bool)

    x = features.astype(self.dtype)
    if feature_dim != self.width:
      x = nn.Dense(
        features=self.width,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="input_projection",
      )(x)
    positions = self.param(
      "temporal_position_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
      (self.max_frames, self.width),
      jnp.float32,
    )
    x = x + positions[:frames].astype(self.dtype)
    valid = frame_mask
    if self.pooling == "cls":
      cls_token = self.param(
        "cls_token",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
        (self.width,),
        jnp.float32,
      )
      cls_tokens = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.width))
      x = jnp.concatenate([cls_tokens, x], axis=1)  # [B, 1 + T, D]
      valid = jnp.concatenate([jnp.ones((batch, 1), bool), frame_mask], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "frames", "embed"))
    x = Transformer(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      hidden_act=self.hidden_act,
      remat=self.remat,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      name="temporal_encoder",
    )(x, padding_mask(valid))
    x = layer_norm(1e-5, self.dtype, "final_norm")(x)
    if self.pooling == "cls":
      embedding = x[:, 0]
    else:
      weights = frame_mask.astype(x.dtype)[..., None]
      embedding = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    aux = {"clip_embedding": embedding}  # [B, width]
    embedding = nn.Dropout(rate=self.dropout, deterministic=not train)(embedding)

    if self.classifier == "linear":
      logits = nn.Dense(
        features=self.num_classes,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "classes")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
        name="classifier",
      )(embedding)
      return logits.astype(jnp.float32), aux

    if class_embeds is None or class_embeds.ndim != 2:
      raise ValueError("classifier='text' needs class_embeds [C, P] (text embeddings per class)")
    if class_embeds.shape[0] != self.num_classes:
      raise ValueError(
        f"class_embeds has {class_embeds.shape[0]} classes, num_classes is {self.num_classes}"
      )
    video_embeds = nn.Dense(
      features=class_embeds.shape[-1],
      use_bias=False,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
      name="text_projection",
    )(embedding)  # [B, P]
    logit_scale = self.param(
      "logit_scale",
      nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
      (),
      jnp.float32,
    )
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    aux["video_embeds"] = video_embeds
    return scale * cosine_similarity(video_embeds, class_embeds), aux


class VideoClassifier(nn.Module):
  """Video [B, T, H, W, 3] -> CLIP image encoder per frame -> `TemporalHead` -> logits [B, C].

  Parameters: `vision/...` (CLIP image tower, with `lora`/`adapter` leaves when enabled),
  `text/...` (CLIP text tower, text classifier only) and `temporal_head/...`, so that
  `clip.peft_freeze_patterns()` trains only PEFT leaves and the head. Pretrained towers come from
  `hf_clip.load_hf_clip` and go in with `hf_clip.init_missing_params`.
  """

  variant: str = "B/16"  # CLIP towers, a name in `clip.CLIP_VARIANTS`
  num_classes: int = 7  # expression classes, or action units
  classifier: str = "linear"  # "linear", or "text": cosine similarity with class descriptions
  class_token_ids: tuple | None = None  # [C, L] or [C, K, L] CLIP token ids of K prompts per class
  lora_rank: int = 0  # LoRA rank in the image tower (0 = none)
  lora_alpha: float = 16.0  # LoRA scale numerator
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # projections with LoRA
  adapter_dim: int = 0  # adapter bottleneck in the image tower (0 = none)
  peft_text: bool = False  # put the same LoRA / adapters into the text tower too
  stop_backbone_gradient: bool = False  # no backward pass through towers that have no PEFT
  head_width: int = 512  # temporal transformer width
  head_depth: int = 1  # temporal transformer blocks
  head_num_heads: int = 8  # temporal attention heads
  head_mlp_dim: int = 2048  # temporal MLP hidden width
  max_frames: int = 64  # longest clip in frames
  pooling: str = "cls"  # temporal pooling: "cls" or "mean"
  dropout: float = 0.0  # dropout before the classifier
  pixel_mean: tuple[float, float, float] = CLIP_MEAN  # RGB mean of the encoder's training data
  pixel_std: tuple[float, float, float] = CLIP_STD  # RGB std of the encoder's training data
  remat: bool = False  # recompute activations of the towers in the backward pass
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)

  def _peft(self) -> dict[str, Any]:
    return dict(
      lora_rank=self.lora_rank,
      lora_alpha=self.lora_alpha,
      lora_targets=tuple(self.lora_targets),
      adapter_dim=self.adapter_dim,
    )

  def _class_embeds(self) -> Array:
    """Normalised text embeddings per class [C, P], prompts averaged."""
    if self.class_token_ids is None:
      raise ValueError("classifier='text' needs class_token_ids ([C, L] or [C, K, L] token ids)")
    token_ids = jnp.asarray(self.class_token_ids, jnp.int32)
    if token_ids.ndim == 2:
      token_ids = token_ids[:, None]
    if token_ids.ndim != 3 or token_ids.shape[0] != self.num_classes:
      raise ValueError(
        f"class_token_ids must be [num_classes={self.num_classes}, L] or [num_classes, K, L], "
        f"got shape {token_ids.shape}"
      )
    classes, prompts, length = token_ids.shape
    peft = self._peft() if self.peft_text else {}
    text = ClipTextEncoder(
      **clip_variant(self.variant)["text"],
      **peft,
      remat=self.remat,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      name="text",
    )
    text_embeds, _ = text(token_ids.reshape(classes * prompts, length))
    if self.stop_backbone_gradient and not self.peft_text:
      text_embeds = jax.lax.stop_gradient(text_embeds)
    per_prompt = l2_normalize(text_embeds).reshape(classes, prompts, -1)
    return l2_normalize(per_prompt.mean(axis=1))

  @nn.compact
  def __call__(
    self, video: Array, train: bool = False, frame_mask: Array | None = None
  ) -> tuple[Array, dict[str, Array]]:
    """video uint8 (or float in [0, 255]) [B, T, H, W, 3]; frame_mask bool [B, T].

    Returns (logits [B, C], aux): `frame_embeds` [B, T, P], `clip_embedding` [B, width] and, for
    the text classifier, `class_embeds` [C, P] and `video_embeds` [B, P].
    """
    vision_config = clip_variant(self.variant)["vision"]
    size = vision_config["image_size"]
    if video.ndim != 5 or video.shape[2:] != (size, size, 3):
      raise ValueError(
        f"video must be [B, T, {size}, {size}, 3] for CLIP {self.variant}, got {video.shape}"
      )
    has_vision_peft = self.lora_rank > 0 or self.adapter_dim > 0
    if self.stop_backbone_gradient and has_vision_peft:
      raise ValueError("stop_backbone_gradient would cut the gradients of the image tower's PEFT")
    batch, frames = video.shape[:2]
    pixels = normalize_video(video, self.pixel_mean, self.pixel_std, self.dtype)
    pixels = pixels.reshape(batch * frames, size, size, 3)  # frames share the image encoder
    vision = ClipVisionEncoder(
      **vision_config,
      **self._peft(),
      remat=self.remat,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      name="vision",
    )
    frame_embeds, _ = vision(pixels, train)
    frame_embeds = frame_embeds.reshape(batch, frames, -1)  # [B, T, P]
    frame_embeds = nn.with_logical_constraint(frame_embeds, ("batch", "frames", "embed"))
    if self.stop_backbone_gradient:
      frame_embeds = jax.lax.stop_gradient(frame_embeds)

    class_embeds = self._class_embeds() if self.classifier == "text" else None
    head = TemporalHead(
      num_classes=self.num_classes,
      classifier=self.classifier,
      width=self.head_width,
      depth=self.head_depth,
      num_heads=self.head_num_heads,
      mlp_dim=self.head_mlp_dim,
      max_frames=self.max_frames,
      pooling=self.pooling,
      dropout=self.dropout,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      name="temporal_head",
    )
    logits, head_aux = head(frame_embeds, frame_mask, class_embeds, train)
    aux = {"frame_embeds": frame_embeds, **head_aux}
    if class_embeds is not None:
      aux["class_embeds"] = class_embeds
    return logits, aux


def init_from_clip(
  model: VideoClassifier, clip_params: dict[str, Any], rng: jax.Array, frames: int = 1
) -> dict[str, Any]:
  """`model`'s params with the CLIP towers taken from `clip_params` (e.g. from
  `hf_clip.load_hf_clip`); PEFT leaves and the temporal head are freshly initialised from `rng`.

  The text tower is taken only when the model uses it (classifier="text"). A checkpoint of
  another size than `model.variant` fails with Flax's error naming the mis-shaped parameter.
  """
  towers = ("vision", "text") if model.classifier == "text" else ("vision",)
  pretrained = {tower: clip_params[tower] for tower in towers}
  size = clip_variant(model.variant)["vision"]["image_size"]
  video = jnp.zeros((1, frames, size, size, 3), jnp.uint8)
  return hf_clip.init_missing_params(model, pretrained, rng, video)
