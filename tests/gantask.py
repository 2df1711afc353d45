"""A tiny two-network adversarial task: the pattern for training networks against each other.

A generator maps noise `z` [B, 4] to samples [B, 2]; a discriminator scores samples [B, 1] as
real (the `x` of the batch: a fixed 2-D Gaussian) or generated. Both are submodules of one model
and train in **one step with one combined loss** whose parts stop each other's gradients:

    fake = G(params_G, z)
    generator_loss     = softplus(-D(stop_gradient(params_D), fake))            # sees D frozen
    discriminator_loss = softplus(-D(params_D, x)) + softplus(D(params_D, stop_gradient(fake)))
    loss = generator_loss + discriminator_loss

so d loss / d params_G is the generator loss's gradient alone and d loss / d params_D the
discriminator loss's alone: each network descends its own objective, in the same update, with
one optimizer state (which `optim.groups` may split, e.g. a learning rate per network). This is
what a GAN or an adversarial term (MARLIN, talking-head discriminators) does in fdjax; no
alternating steps or second optimizer are needed.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline

LATENT, SAMPLE = 4, 2


class MLP(nn.Module):
  hidden: int  # Hidden width.
  out: int  # Output width.

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.out, name="out")(h)


class AdversarialPair(nn.Module):
  hidden: int = 16  # Hidden width of both networks.

  def setup(self):
    self.generator = MLP(hidden=self.hidden, out=SAMPLE)
    self.discriminator = MLP(hidden=self.hidden, out=1)

  def generate(self, z):  # [B, LATENT] -> [B, SAMPLE]
    return self.generator(z)

  def discriminate(self, x):  # [B, SAMPLE] -> [B] logits (real > 0)
    return self.discriminator(x)[:, 0]

  def __call__(self, batch, train: bool = False):
    fake = self.generate(jnp.zeros((batch["x"].shape[0], LATENT), batch["x"].dtype))
    return self.discriminate(fake), {"fake": fake}


def build_model(config):
  return AdversarialPair(**config.model)


def dummy_batch(config, batch_size):
  return {"x": np.zeros((batch_size, SAMPLE), np.float32)}


def make_examples(num: int, seed: int) -> list[dict]:
  x = np.random.default_rng(seed).normal(loc=(2.0, -1.0), scale=0.5, size=(num, SAMPLE))
  return [{"x": x[i].astype(np.float32)} for i in range(num)]


def adversarial_losses(model, params, batch, rng):
  """`(generator_loss, discriminator_loss)`, each stopping the other network's gradient."""
  z = jax.random.normal(rng, (batch["x"].shape[0], LATENT), batch["x"].dtype)  # [B, LATENT]
  fake = model.apply({"params": params}, z, method=AdversarialPair.generate)  # [B, SAMPLE]
  frozen_discriminator = {
    **params,
    "discriminator": jax.lax.stop_gradient(params["discriminator"]),
  }
  score = lambda p, x: model.apply({"params": p}, x, method=AdversarialPair.discriminate)
  generator_loss = jnp.mean(jax.nn.softplus(-score(frozen_discriminator, fake)))
  discriminator_loss = jnp.mean(jax.nn.softplus(-score(params, batch["x"]))) + jnp.mean(
    jax.nn.softplus(score(params, jax.lax.stop_gradient(fake)))
  )
  return generator_loss, discriminator_loss


def loss_fn(model, params, batch, rng, train):
  generator_loss, discriminator_loss = adversarial_losses(model, params, batch, rng)
  aux = {"generator_loss": generator_loss, "discriminator_loss": discriminator_loss}
  return generator_loss + discriminator_loss, aux


def train_data(config, *, process_index, process_count):
  return pipeline.train_dataset(
    make_examples(config.data.num_examples, seed=0),
    None,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
  )


def evaluate(config, model, params, *, mesh, rules, workdir, step):
  z = jax.random.normal(jax.random.key(1), (256, LATENT))
  fake = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AdversarialPair.generate))(
    params, z
  )
  real = np.stack([e["x"] for e in make_examples(256, seed=1)])
  return {"mean_error": float(jnp.linalg.norm(jnp.mean(fake, 0) - real.mean(0)))}
