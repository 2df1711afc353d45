"""How learnable is a built BP4D-layout set, and by which model? Per-frame models from scratch.

A diagnostic of the data and the architectures, not a task model: it reads every frame of a
fold's training and test windows (each with its own `frame_aus`), trains one model on single
frames (sigmoid cross-entropy with the positive weights the `au` task uses; Adam, mirrored
frames, nothing else) and prints the held-out mean AU F1 at threshold 0.5 as it trains. Models
(`--model`): `cnn`, six 3x3 convolutions; `conv_vit`, the first `--stem` stages of those
convolutions, then a 2-block transformer over the feature-map cells; `vivit`, the `au` task's
ViViT tiny on the frame repeated; `vit_mae`, the `au` task's MAE-encoder classifier (tiny, with
a `--stem`-stage convolutional stem) on the frame repeated. docs/design.md section 21 compares
them with the video transformers of `experiments/au/bp4d.py` on the same data:

    python -m experiments.au.frame_cnn_probe --data_dir D/tfds --builder_config 64px_16f \\
        --fold 1 --side 48 --steps 1500 [--model conv_vit --stem 2]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from PIL import Image

from fdjax.metrics import classification
from fdjax.models.clip import Transformer
from fdjax.models.video_mae import video_vit_classifier
from fdjax.models.vivit import vivit_model


class FrameCNN(nn.Module):
  """Three stages of two 3x3 convolutions and a 2x2 max-pool, a hidden layer, one logit per AU."""

  num_outputs: int

  @nn.compact
  def __call__(self, frames):  # uint8 [B, S, S, 3]
    x = frames.astype(jnp.float32) / 127.5 - 1.0
    for width in (32, 64, 128):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_outputs)(x)


class FrameConvViT(nn.Module):
  """`stem` stages of FrameCNN, each feature-map cell a token (learned positions), a pre-norm
  transformer, mean-pooled tokens, LayerNorm, one logit per AU ("early convolutions")."""

  num_outputs: int
  stem: int = 2  # convolution stages before the transformer
  width: int = 64
  depth: int = 2

  @nn.compact
  def __call__(self, frames):  # uint8 [B, S, S, 3]
    x = frames.astype(jnp.float32) / 127.5 - 1.0
    for width in (32, 64, 128)[: self.stem]:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Dense(self.width)(x.reshape(x.shape[0], -1, x.shape[-1]))
    x = x + self.param("positions", nn.initializers.normal(0.02), x.shape[1:])
    x = Transformer(depth=self.depth, num_heads=4, mlp_dim=2 * self.width)(x)
    return nn.Dense(self.num_outputs)(nn.LayerNorm()(x.mean(1)))


class FrameViViT(nn.Module):
  """The `au` task's ViViT tiny (`fdjax.models.vivit`) on a frame repeated into one tubelet."""

  num_outputs: int
  image_size: int

  @nn.compact
  def __call__(self, frames):  # uint8 [B, S, S, 3]
    model = vivit_model("tiny", image_size=self.image_size, num_classes=self.num_outputs)
    return model(jnp.repeat(frames[:, None], 2, axis=1))[0]


class FrameViTMAE(nn.Module):
  """The `au` task's `vit_mae` classifier (`fdjax.models.video_mae`, encoder `tiny`, mean-pooled
  tokens) on a frame repeated into one tubelet, with the first `stem` stages of (32, 64, 128)
  as its convolutional stem."""

  num_outputs: int
  image_size: int
  stem: int = 0

  @nn.compact
  def __call__(self, frames):  # uint8 [B, S, S, 3]
    model = video_vit_classifier(
      "tiny",
      image_size=self.image_size,
      num_classes=self.num_outputs,
      stem_widths=(32, 64, 128)[: self.stem],
    )
    return model(jnp.repeat(frames[:, None], 2, axis=1))[0]


MODELS = ("cnn", "conv_vit", "vivit", "vit_mae")


def load_frames(data_dir: str, builder_config: str, split: str, side: int):
  """Every frame of `split` at `side` px and its AU occurrence: (uint8 [N, S, S, 3], [N, A])."""
  source = tfds.data_source(
    "bp4d", split=split, data_dir=data_dir, builder_kwargs={"config": builder_config}
  )
  frames, labels = [], []
  for i in range(len(source)):
    example = source[i]
    for frame, aus in zip(example["video"], example["frame_aus"]):
      frames.append(np.asarray(Image.fromarray(frame).resize((side, side), Image.BILINEAR)))
      labels.append(aus)
  return np.stack(frames), np.asarray(labels, np.float32)


def mean_f1(labels: np.ndarray, logits: np.ndarray) -> tuple[float, np.ndarray]:
  """Mean and per-AU F1 of logits at probability 0.5 (the `au` task's measure)."""
  per_au = classification.au_f1_per_au(labels, jax.nn.sigmoid(logits))
  return float(per_au.mean()), per_au


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="TFDS directory holding the bp4d build")
  parser.add_argument("--builder_config", default="", help="e.g. 64px_16f")
  parser.add_argument("--fold", type=int, default=1)
  parser.add_argument("--side", type=int, default=48, help="frame side the model sees")
  parser.add_argument(
    "--model",
    choices=MODELS,
    default="cnn",
    help="FrameCNN, FrameConvViT (with --stem stages), FrameViViT or FrameViTMAE (--stem)",
  )
  parser.add_argument("--stem", type=int, default=2, help="conv_vit, vit_mae: convolution stages")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--max_positive_weight", type=float, default=10.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  load = lambda split: load_frames(args.data_dir, args.builder_config, split, args.side)  # noqa: E731
  train_x, train_y = load(f"fold{args.fold}_train")
  test_x, test_y = load(f"fold{args.fold}_test")
  print(f"{len(train_x)} training and {len(test_x)} test frames of {args.side} px", flush=True)

  outputs = train_y.shape[1]
  model = {
    "cnn": lambda: FrameCNN(outputs),
    "conv_vit": lambda: FrameConvViT(outputs, stem=args.stem),
    "vivit": lambda: FrameViViT(outputs, args.side),
    "vit_mae": lambda: FrameViTMAE(outputs, args.side, args.stem),
  }[args.model]()
  params = model.init(jax.random.key(args.seed), train_x[:1])
  rates = train_y.mean(0)
  positive_weight = jnp.asarray(np.minimum((1 - rates) / rates, args.max_positive_weight))
  optimizer = optax.adam(args.lr)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, frames, labels):
    def loss_fn(params):
      logits = model.apply(params, frames)
      positive = optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(labels))
      negative = optax.sigmoid_binary_cross_entropy(logits, jnp.zeros_like(labels))
      return jnp.mean(positive_weight * labels * positive + (1 - labels) * negative)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  logits_fn = jax.jit(model.apply)

  def test_logits(params):
    return np.concatenate(
      [np.asarray(logits_fn(params, test_x[i : i + 256])) for i in range(0, len(test_x), 256)]
    )

  rng = np.random.default_rng(args.seed)
  start = time.time()
  for i in range(args.steps):
    batch = rng.integers(len(train_x), size=args.batch_size)
    frames = train_x[batch]
    if rng.random() < 0.5:
      frames = frames[:, :, ::-1]  # mirror
    params, opt_state, loss = step(params, opt_state, frames, train_y[batch])
    if i % 250 == 0 or i == args.steps - 1:
      f1, _ = mean_f1(test_y, test_logits(params))
      print(
        f"step {i}: loss {float(loss):.4f}, held-out mean AU F1 {f1:.3f}, "
        f"{time.time() - start:.0f} s",
        flush=True,
      )
  f1, per_au = mean_f1(test_y, test_logits(params))
  print(f"mean AU F1 {f1:.4f}; per AU " + " ".join(f"{v:.2f}" for v in per_au))


if __name__ == "__main__":
  main()
