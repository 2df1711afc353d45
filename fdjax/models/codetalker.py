"""CodeTalker-style discrete motion prior (Xing et al. 2023): a VQ-VAE over face motion and a
code predictor that reaches it from speech.

Where this sits: stage 1 (`MotionVQVAE`, task `motion_vq`) learns to reconstruct captured
`vertices [B, T, V, 3]` through a finite codebook; stage 2 (`CodePredictor`, task `audio2mesh`
with `decoder.kind="codetalker"`) maps frame-aligned audio features plus speaking style onto
that codebook and decodes with the frozen stage-1 decoder under `prior/`. What is kept from
CodeTalker and what deviates on purpose is described in docs/design.md section 14.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.models.motion_decoders import (
  TransformerEncoder,
  check_template,
  dense,
  encode_aligned_audio,
  layer_norm,
  periodic_positional_encoding,
)

Array = jax.Array


def _codebook_init(codebook_size: int):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / codebook_size
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantiser with the straight-through estimator.

  Padding-exact: statistics and losses count only the positions that `mask` marks valid.
  """

  codebook_size: int = 256  # K, codebook entries
  code_dim: int = 64  # C, width of one code
  beta: float = 0.25  # commitment loss weight
  ema_decay: float = 0.0  # 0: codebook learnt by the codebook loss; >0: EMA updates (vq_ema)
  ema_epsilon: float = 1e-5  # Laplace smoothing of the EMA cluster sizes

  def setup(self):
    shape = (self.codebook_size, self.code_dim)
    init = nn.with_logical_partitioning(_codebook_init(self.codebook_size), ("codebook", "embed"))
    if self.ema_decay > 0:
      rng = self.make_rng("params") if self.is_initializing() else None
      self.ema_codebook = self.variable("vq_ema", "codebook", init, rng, shape)
      self.ema_cluster_size = self.variable(
        "vq_ema",
        "cluster_size",
        nn.with_logical_partitioning(nn.initializers.ones_init(), ("codebook",)),
        rng,
        (self.codebook_size,),
      )
      self.ema_embed_sum = self.variable(
        "vq_ema",
        "embed_sum",
        lambda: nn.LogicallyPartitioned(self.ema_codebook.value, ("codebook", "embed")),
      )
    else:
      self.codebook_param = self.param("codebook", init, shape)

  @property
  def codebook(self) -> Array:
    """`[K, C]` float32."""
    if self.ema_decay > 0:
      return self.ema_codebook.value
    return self.codebook_param

  def distances(self, latents: Array) -> Array:
    """Squared distances `[..., K]` from latents `[..., C]` to every codebook entry."""
    latents = latents.astype(jnp.float32)
    codebook = self.codebook
    return (
      jnp.sum(latents**2, axis=-1, keepdims=True)
      - 2.0 * jnp.einsum("...c,kc->...k", latents, codebook)
      + jnp.sum(codebook**2, axis=-1)
    )

  def lookup(self, codes: Array) -> Array:
    """Codebook entries `[..., C]` for int codes `[...]`."""
    return jnp.take(self.codebook, codes, axis=0)

  def __call__(
    self, latents: Array, mask: Array | None = None, train: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    """Quantises `latents [..., C]`.

    Args:
      latents: `[..., C]` encoder outputs.
      mask: bool `[...]`, True where the position is real (not padding); default all.
      train: with `ema_decay > 0` and `vq_ema` mutable, updates the codebook.

    Returns:
      straight-through quantised latents `[..., C]` (value of the codebook entry, gradient of
      the latent) and aux: `codes [...]` int32, `quantized [..., C]`, `codebook_loss`,
      `commitment_loss`, `vq_loss` (their sum), `perplexity` and `codebook_usage` (fraction of
      entries used by the valid positions of this batch).
    """
    if latents.shape[-1] != self.code_dim:
      raise ValueError(
        f"latents must end in code_dim={self.code_dim}, got shape {tuple(latents.shape)}"
      )
    if mask is None:
      mask = jnp.ones(latents.shape[:-1], bool)
    latents = jnp.where(mask[..., None], latents.astype(jnp.float32), 0.0)
    codes = jnp.argmin(self.distances(latents), axis=-1).astype(jnp.int32)  # [...]
    quantized = self.lookup(codes)  # [..., C]

    weights = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)

    def masked_mean(squared):  # squared [..., C]
      return jnp.sum(weights * jnp.sum(squared, axis=-1)) / (count * self.code_dim)

    commitment_loss = self.beta * masked_mean((latents - jax.lax.stop_gradient(quantized)) ** 2)
    if self.ema_decay > 0:
      codebook_loss = jnp.zeros((), jnp.float32)
    else:
      codebook_loss = masked_mean((jax.lax.stop_gradient(latents) - quantized) ** 2)

    one_hot = jax.nn.one_hot(codes, self.codebook_size) * weights[..., None]  # [..., K]
    counts = jnp.sum(one_hot.reshape(-1, self.codebook_size), axis=0)  # [K]
    probabilities = counts / count
    perplexity = jnp.exp(-jnp.sum(probabilities * jnp.log(probabilities + 1e-10)))
    codebook_usage = jnp.mean((counts > 0).astype(jnp.float32))

    if self.ema_decay > 0 and train and self.is_mutable_collection("vq_ema"):
      flat_latents = jax.lax.stop_gradient(latents).reshape(-1, self.code_dim)
      embed_sum = jnp.einsum("nk,nc->kc", one_hot.reshape(-1, self.codebook_size), flat_latents)
      decay = self.ema_decay
      cluster_size = decay * self.ema_cluster_size.value + (1 - decay) * counts
      embed_sum = decay * self.ema_embed_sum.value + (1 - decay) * embed_sum
      total = jnp.sum(cluster_size)
      smoothed = (
        (cluster_size + self.ema_epsilon) / (total + self.codebook_size * self.ema_epsilon) * total
      )
      self.ema_cluster_size.value = cluster_size
      self.ema_embed_sum.value = embed_sum
      self.ema_codebook.value = embed_sum / smoothed[:, None]

    straight_through = latents + jax.lax.stop_gradient(quantized - latents)
    aux = {
      "codes": codes,
      "quantized": quantized,
      "codebook_loss": codebook_loss,
      "commitment_loss": commitment_loss,
      "vq_loss": codebook_loss + commitment_loss,
      "perplexity": perplexity,
      "codebook_usage": codebook_usage,
    }
    return straight_through, aux


class _TemporalStem(nn.Module):
  """Dense -> LeakyReLU -> temporal conv -> LeakyReLU -> LayerNorm -> positional encoding.

  Padded frames are zeroed before the convolution, so valid frames see exactly what they would
  see at the end of an unpadded sequence.
  """

  d_model: int  # output width
  in_names: tuple[str, str]  # logical names of the input Dense kernel
  conv_kernel_size: int  # frames spanned by the temporal convolution
  negative_slope: float  # LeakyReLU slope
  period: int  # period of the positional encoding
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: Array, frame_mask: Array) -> Array:
    """x `[B, T, F]`, frame_mask `[B, T]` -> `[B, T, D]`."""
    x = dense(self.d_model, self.in_names, dtype=self.dtype, name="embedding")(x.astype(self.dtype))
    x = nn.leaky_relu(x, self.negative_slope)
    x = jnp.where(frame_mask[..., None], x, 0.0)
    x = nn.Conv(
      features=self.d_model,
      kernel_size=(self.conv_kernel_size,),
      padding="SAME",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("kernel", "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name="conv",
    )(x)
    x = nn.leaky_relu(x, self.negative_slope)
    x = layer_norm(self.dtype, name="norm")(x)
    encoding = periodic_positional_encoding(jnp.arange(x.shape[1]), self.d_model, self.period)
    return x + encoding.astype(x.dtype)[None]


# CodeTalker's published stage-1 sizes (hidden 1024, 6 layers, 8 heads, MLP 1536, 256 codes;
# VOCASET 16 x 64 codes per frame, BIWI 8 x 128). `tiny` is for tests.
MOTION_VQVAE_VARIANTS: dict[str, dict] = {
  "vocaset": dict(
    num_vertices=5023,
    d_model=1024,
    num_heads=8,
    num_layers=6,
    mlp_dim=1536,
    tokens_per_frame=16,
    code_dim=64,
    codebook_size=256,
    period=30,
  ),
  "biwi": dict(
    num_vertices=23370,
    d_model=1024,
    num_heads=8,
    num_layers=6,
    mlp_dim=1536,
    tokens_per_frame=8,
    code_dim=128,
    codebook_size=256,
    period=25,
  ),
  "tiny": dict(
    num_vertices=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    mlp_dim=32,
    tokens_per_frame=2,
    code_dim=4,
    codebook_size=16,
    period=4,
    dropout_rate=0.0,
  ),
}


class MotionVQVAE(nn.Module):
  """Stage 1: motion -> per-frame codes -> motion.

  Encoder: offsets from the template -> `_TemporalStem` -> transformer encoder (symmetric
  temporal bias, padding mask) -> `tokens_per_frame` latents of `code_dim` per frame.
  Quantiser: `VectorQuantizer`. Decoder: the mirror image back to offsets, plus the template.
  """

  num_vertices: int = 5023  # V, mesh vertices
  d_model: int = 1024  # transformer width of encoder and decoder
  num_heads: int = 8  # attention heads
  num_layers: int = 6  # transformer layers in each of encoder and decoder
  mlp_dim: int = 1536  # transformer MLP hidden width
  tokens_per_frame: int = 16  # codes per frame (CodeTalker's face_quan_num)
  code_dim: int = 64  # width of one code (CodeTalker's zquant_dim)
  codebook_size: int = 256  # K, codebook entries
  beta: float = 0.25  # commitment loss weight
  ema_decay: float = 0.0  # 0: codebook loss; >0: EMA codebook updates in collection vq_ema
  conv_kernel_size: int = 5  # frames spanned by the temporal convolutions
  negative_slope: float = 0.2  # LeakyReLU slope
  period: int = 30  # period of the positional encoding and the temporal bias
  attention_window: int = 0  # frames each side a frame attends to; 0 = the whole sequence
  dropout_rate: float = 0.1  # dropout in the transformers
  pre_norm: bool = False  # False = post-norm layers
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @classmethod
  def from_variant(cls, variant: str, **overrides: Any) -> MotionVQVAE:
    """Builds a named size (`MOTION_VQVAE_VARIANTS`) with fields overridden."""
    if variant not in MOTION_VQVAE_VARIANTS:
      raise ValueError(
        f"unknown MotionVQVAE variant {variant!r}; known: {sorted(MOTION_VQVAE_VARIANTS)}"
      )
    return cls(**{**MOTION_VQVAE_VARIANTS[variant], **overrides})

  def setup(self):
    def transformer():
      return TransformerEncoder(
        d_model=self.d_model,
        num_heads=self.num_heads,
        num_layers=self.num_layers,
        mlp_dim=self.mlp_dim,
        period=self.period,
        attention_window=self.attention_window,
        dropout_rate=self.dropout_rate,
        pre_norm=self.pre_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
      )

    def stem(in_names):
      return _TemporalStem(
        d_model=self.d_model,
        in_names=in_names,
        conv_kernel_size=self.conv_kernel_size,
        negative_slope=self.negative_slope,
        period=self.period,
        dtype=self.dtype,
      )

    self.encoder_stem = stem(("vertices", "embed"))
    self.encoder_transformer = transformer()
    self.latent_projection = dense(
      self.tokens_per_frame * self.code_dim, ("embed", "mlp"), dtype=self.dtype
    )
    self.quantizer = VectorQuantizer(
      codebook_size=self.codebook_size,
      code_dim=self.code_dim,
      beta=self.beta,
      ema_decay=self.ema_decay,
    )
    self.decoder_stem = stem(("mlp", "embed"))
    self.decoder_transformer = transformer()
    self.offset_projection = dense(self.num_vertices * 3, ("embed", "vertices"), dtype=self.dtype)

  def _frame_mask(self, frame_mask: Array | None, batch_size: int, num_frames: int) -> Array:
    if frame_mask is None:
      return jnp.ones((batch_size, num_frames), bool)
    if frame_mask.shape != (batch_size, num_frames):
      raise ValueError(
        f"frame_mask must be [B, T]=({batch_size}, {num_frames}), got {tuple(frame_mask.shape)}"
      )
    return frame_mask

  def encode(
    self, vertices: Array, template: Array, frame_mask: Array | None = None, train: bool = False
  ) -> Array:
    """`vertices [B, T, V, 3]`, `template [B, V, 3]` -> continuous latents `[B, T, N, C]`."""
    batch_size, num_frames = vertices.shape[:2]
    if vertices.shape[2:] != (self.num_vertices, 3):
      raise ValueError(
        f"vertices must be [B, T, V, 3] with V=num_vertices={self.num_vertices}, "
        f"got {tuple(vertices.shape)}"
      )
    check_template(template, self.num_vertices, batch_size)
    frame_mask = self._frame_mask(frame_mask, batch_size, num_frames)
    offsets = (vertices - template[:, None]).reshape(batch_size, num_frames, -1)
    offsets = jnp.where(frame_mask[..., None], offsets, 0.0)
    x = self.encoder_stem(offsets, frame_mask)
    x = self.encoder_transformer(x, frame_mask, train)
    latents = self.latent_projection(x).astype(jnp.float32)
    return latents.reshape(batch_size, num_frames, self.tokens_per_frame, self.code_dim)

  def quantize(
    self, latents: Array, frame_mask: Array | None = None, train: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    """`latents [B, T, N, C]` -> straight-through quantised `[B, T, N, C]` and the VQ aux."""
    batch_size, num_frames = latents.shape[:2]
    frame_mask = self._frame_mask(frame_mask, batch_size, num_frames)
    token_mask = jnp.broadcast_to(frame_mask[..., None], latents.shape[:-1])
    return self.quantizer(latents, token_mask, train)

  def code_distances(self, latents: Array) -> Array:
    """Squared distances `[B, T, N, K]` from latents `[B, T, N, C]` to the codebook."""
    return self.quantizer.distances(latents)

  def decode(
    self,
    quantized: Array,
    template: Array,
    frame_mask: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, Array]:
    """`quantized [B, T, N, C]` -> (`vertices [B, T, V, 3]`, `offsets [B, T, V, 3]`).

    Padded frames predict the template.
    """
    batch_size, num_frames = quantized.shape[:2]
    check_template(template, self.num_vertices, batch_size)
    frame_mask = self._frame_mask(frame_mask, batch_size, num_frames)
    x = self.decoder_stem(quantized.reshape(batch_size, num_frames, -1), frame_mask)
    x = self.decoder_transformer(x, frame_mask, train)
    offsets = self.offset_projection(x).astype(jnp.float32)
    offsets = offsets.reshape(batch_size, num_frames, self.num_vertices, 3)
    offsets = jnp.where(frame_mask[..., None, None], offsets, 0.0)
    offsets = nn.with_logical_constraint(offsets, ("batch", "time", "vertices", None))
    return template[:, None].astype(jnp.float32) + offsets, offsets

  def decode_codes(
    self, codes: Array, template: Array, frame_mask: Array | None = None
  ) -> tuple[Array, Array]:
    """Int `codes [B, T, N]` -> (`vertices [B, T, V, 3]`, `offsets`), no dropout."""
    return self.decode(self.quantizer.lookup(codes), template, frame_mask, train=False)

  def __call__(
    self,
    vertices: Array,
    template: Array,
    frame_mask: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """Reconstructs motion through the codebook.

    Args:
      vertices: `[B, T, V, 3]`.
      template: `[B, V, 3]`.
      frame_mask: `[B, T]` bool; valid frames never see padded ones.
      train: dropout (needs a `dropout` rng) and, with `ema_decay > 0` and `vq_ema` mutable,
        EMA codebook updates.

    Returns:
      `reconstruction [B, T, V, 3]` and aux: `latents` and `quantized [B, T, N, C]`, `codes
      [B, T, N]` int32, `offsets [B, T, V, 3]`, scalars `vq_loss` (add it to the
      reconstruction loss), `codebook_loss`, `commitment_loss`, `perplexity`,
      `codebook_usage`.
    """
    latents = self.encode(vertices, template, frame_mask, train)
    quantized, aux = self.quantize(latents, frame_mask, train)
    reconstruction, offsets = self.decode(quantized, template, frame_mask, train)
    return reconstruction, {**aux, "latents": latents, "offsets": offsets}


# CodeTalker's stage-2 sizes (feature_dim 1024, 6 layers, 4 heads, MLP 2 * 1024).
CODE_PREDICTOR_VARIANTS: dict[str, dict] = {
  "vocaset": dict(
    d_model=1024,
    num_heads=4,
    num_layers=6,
    mlp_dim=2048,
    period=30,
    audio_frames_per_frame=1,
    num_styles=8,
  ),
  "biwi": dict(
    d_model=1024,
    num_heads=4,
    num_layers=6,
    mlp_dim=2048,
    period=25,
    audio_frames_per_frame=2,
    num_styles=6,
  ),
  "tiny": dict(
    d_model=16,
    num_heads=2,
    num_layers=1,
    mlp_dim=32,
    period=4,
    audio_frames_per_frame=1,
    num_styles=3,
    dropout_rate=0.0,
  ),
}


class CodePredictor(nn.Module):
  """Stage 2: audio features + style (+ emotion, intensity) -> codebook latents -> vertices.

  A transformer encoder over the frame-aligned audio predicts `tokens_per_frame` latents per
  frame; they are snapped to the prior's codebook (straight-through, so the vertex loss reaches
  the predictor) and decoded by the prior's decoder (no dropout, no codebook updates).
  """

  prior: MotionVQVAE  # the stage-1 model; its parameters live under "prior/"
  d_model: int = 1024  # transformer width
  num_heads: int = 4  # attention heads
  num_layers: int = 6  # encoder layers
  mlp_dim: int = 2048  # encoder MLP hidden width
  period: int = 30  # period of the positional encoding and the temporal bias
  audio_frames_per_frame: int = 1  # audio features per mesh frame: 1 VOCASET, 2 BIWI
  attention_window: int = 0  # frames each side a frame attends to; 0 = the whole sequence
  num_styles: int = 8  # speaking styles (training subjects); 0 disables
  num_emotions: int = 0  # emotion classes; 0 disables
  num_intensities: int = 0  # emotion intensity levels; 0 disables
  dropout_rate: float = 0.1  # dropout on the encoded input and the residual branches
  pre_norm: bool = False  # False = post-norm layers
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn": `config.precision.attention_impl`
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @classmethod
  def from_variant(
    cls, variant: str, prior: MotionVQVAE | dict | None = None, **overrides: Any
  ) -> CodePredictor:
    """Builds a named size (`CODE_PREDICTOR_VARIANTS`).

    `prior` is a `MotionVQVAE`, or a dict of fields overriding `MotionVQVAE.from_variant(
    variant)`, or None for that variant as is.
    """
    if variant not in CODE_PREDICTOR_VARIANTS:
      raise ValueError(
        f"unknown CodePredictor variant {variant!r}; known: {sorted(CODE_PREDICTOR_VARIANTS)}"
      )
    if not isinstance(prior, MotionVQVAE):
      prior = MotionVQVAE.from_variant(variant, **dict(prior or {}))
    return cls(prior=prior, **{**CODE_PREDICTOR_VARIANTS[variant], **overrides})

  @nn.compact
  def __call__(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    vertices: Array | None = None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    frame_mask: Array | None = None,
    num_frames: int | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """Predicts vertices from audio through the discrete prior.

    Args:
      audio_features: `[B, T_a, D_audio]`.
      template: `[B, V, 3]`.
      style, emotion, intensity: `[B]` int32 (see `ConditionEmbedding`).
      vertices: `[B, T, V, 3]` ground truth, optional. Fixes T and adds the regression targets
        `target_latents` (quantised latents of the truth through the prior, no gradient) and
        `target_codes` to aux.
      frame_mask: `[B, T]` bool.
      num_frames: T when `vertices` is None; default `T_a // audio_frames_per_frame`.
      train: dropout in the predictor (the prior always runs without).

    Returns:
      `vertices [B, T, V, 3]` and aux: `latents [B, T, N, C]` (predicted, before snapping;
      regress them onto `target_latents`), `code_logits [B, T, N, K]` (negative squared
      distances; cross-entropy against `target_codes` is an alternative loss), `codes [B, T, N]`,
      `offsets [B, T, V, 3]`, and the targets when `vertices` is given.
    """
    batch_size = audio_features.shape[0]
    if vertices is not None:
      num_frames = vertices.shape[1]
    elif num_frames is None:
      num_frames = audio_features.shape[1] // self.audio_frames_per_frame
    check_template(template, self.prior.num_vertices, batch_size)
    if frame_mask is None:
      frame_mask = jnp.ones((batch_size, num_frames), bool)
    elif frame_mask.shape != (batch_size, num_frames):
      raise ValueError(
        f"frame_mask must be [B, T]=({batch_size}, {num_frames}), got {tuple(frame_mask.shape)}"
      )
    x = encode_aligned_audio(self, audio_features, style, emotion, intensity, frame_mask, train)
    tokens, code_dim = self.prior.tokens_per_frame, self.prior.code_dim
    latents = dense(
      tokens * code_dim,
      ("embed", "mlp"),
      dtype=self.dtype,
      zero_init=True,
      use_bias=False,
      name="latent_projection",
    )(x)
    latents = latents.astype(jnp.float32).reshape(batch_size, num_frames, tokens, code_dim)
    # Padded frames get zero latents, as the quantiser sees them, so codes and logits agree.
    latents = jnp.where(frame_mask[..., None, None], latents, 0.0)
    quantized, quantizer_aux = self.prior.quantize(latents, frame_mask, train=False)
    predicted, offsets = self.prior.decode(quantized, template, frame_mask, train=False)
    aux = {
      "latents": latents,
      "code_logits": -self.prior.code_distances(latents),
      "codes": quantizer_aux["codes"],
      "offsets": offsets,
    }
    if vertices is not None:
      target_latents = self.prior.encode(vertices, template, frame_mask, train=False)
      _, target_aux = self.prior.quantize(target_latents, frame_mask, train=False)
      aux["target_latents"] = jax.lax.stop_gradient(target_aux["quantized"])
      aux["target_codes"] = target_aux["codes"]
    return predicted, aux

  def generate(
    self,
    audio_features: Array,
    template: Array,
    style: Array | None,
    *,
    emotion: Array | None = None,
    intensity: Array | None = None,
    num_frames: int | None = None,
    frame_mask: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Prediction entry point with `FaceFormerDecoder.generate`'s signature (no dropout)."""
    return self(
      audio_features,
      template,
      style,
      emotion=emotion,
      intensity=intensity,
      frame_mask=frame_mask,
      num_frames=frame_mask.shape[1] if frame_mask is not None else num_frames,
      train=False,
    )


__all__ = (
  "CODE_PREDICTOR_VARIANTS",
  "MOTION_VQVAE_VARIANTS",
  "CodePredictor",
  "MotionVQVAE",
  "VectorQuantizer",
)
