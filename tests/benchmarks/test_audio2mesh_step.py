"""The audio2mesh step benchmark's FLOP accounting: the HLO counter, and the task's analytic
count (`fdjax.tasks.audio2mesh.flops_per_example`) against the lowered training step."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from fdjax import config as config_lib
from fdjax.tasks import audio2mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
  "audio2mesh_step", os.path.join(ROOT, "benchmarks", "audio2mesh_step.py")
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_hlo_counter_counts_matmuls_and_strided_conv_gradients():
  def matmul(a, b):
    return a @ b

  text = jax.jit(matmul).lower(jnp.ones((4, 8)), jnp.ones((8, 16))).as_text()
  assert bench.hlo_matmul_flops(text) == 2 * 4 * 8 * 16

  def conv(x, w):  # [1, 100, 3] with a [4, 3, 5] kernel, stride 2: 49 outputs
    return jax.lax.conv_general_dilated(
      x, w, (2,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
    )

  x, w = jnp.ones((1, 100, 3)), jnp.ones((4, 3, 5))
  forward = 2 * 49 * 5 * 4 * 3
  assert bench.hlo_matmul_flops(jax.jit(conv).lower(x, w).as_text()) == forward
  # Gradients for input and kernel cost a forward each (the input gradient's dilation zeros
  # are not counted, up to the edge frame).
  both = jax.jit(jax.value_and_grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1)))
  assert bench.hlo_matmul_flops(both.lower(x, w).as_text()) == pytest.approx(3 * forward, rel=0.03)


@pytest.mark.parametrize(
  "arg, overrides, decoder_fields",
  [
    ("variant=faceformer,encoder=tiny", [], {}),
    # The conv stack frozen, as for wav2vec2-base: its backward disappears from the step.
    (
      "variant=faceformer,encoder=tiny",
      ["--config.optim.freeze=('^encoder/feature_extractor/',)"],
      {},
    ),
    ("variant=nonautoregressive,encoder=tiny", [], {}),
    # Causal (streaming) variant: the transformer runs on the conv features resampled to 30 fps.
    ("variant=faceformer,encoder=tiny,causal=True", [], {}),
    # Diffusion decoders: one denoiser call per example. Loop bodies count once in the HLO, so
    # the GRU's scan over the frames is unrolled.
    ("variant=diffspeaker,encoder=tiny", [], {}),
    ("variant=facediffuser,encoder=tiny", [], {"unroll": True}),
    # DiffPoseTalk: the denoiser reads 4 previous frames and predicts the 8 after them.
    ("variant=diffposetalk,encoder=tiny", [], {"previous_frames": 4}),
  ],
)
def test_analytic_flops_match_the_lowered_training_step(arg, overrides, decoder_fields):
  config = config_lib.load_config(
    os.path.join(ROOT, f"experiments/audio2mesh/vocaset.py:{arg}"),
    ["--config.batch_size=8", "--config.data.window_frames=12", *overrides],
  )
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.decoder.variant = "tiny"
  config.model.decoder.update(decoder_fields)
  analytic = audio2mesh.flops_per_example(config)
  counted = bench.hlo_flops_per_example(config)
  # The rest: the loss's reductions (dots over vertices) and the extra frame of the even-sized
  # positional conv.
  assert analytic == pytest.approx(counted, rel=0.01)
  assert analytic < counted
