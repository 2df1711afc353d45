"""Tests for the FaceFormer-style and non-autoregressive motion decoders.

Compilation dominates on CPU, so parameters are drawn with numpy on the shapes from
`jax.eval_shape(model.init)` and each model's jitted entry points are shared between tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.models.attention import aligned_attention, dot_product_attention
from fdjax.models.motion_decoders import (
  FaceFormerDecoder,
  NonAutoregressiveDecoder,
  alibi_slopes,
  alignment_mask,
  periodic_alibi_bias,
  periodic_positional_encoding,
)

NUM_VERTICES = 8
AUDIO_DIM = 5
BATCH = 2


def _inputs(frames, audio_frames_per_frame=1, seed=0):
  rng = np.random.default_rng(seed)
  audio = rng.normal(size=(BATCH, frames * audio_frames_per_frame, AUDIO_DIM))
  template = rng.normal(size=(BATCH, NUM_VERTICES, 3))
  vertices = template[:, None] + 0.1 * rng.normal(size=(BATCH, frames, NUM_VERTICES, 3))
  return (
    jnp.asarray(audio, jnp.float32),
    jnp.asarray(template, jnp.float32),
    jnp.array([0, 2], jnp.int32),
    jnp.asarray(vertices, jnp.float32),
  )


def _random_params(model, *args, seed=1, **kwargs):
  """Random parameters of the model's shapes (no compilation): weights N(0, 0.3^2), norm
  scales 1 + N(0, 0.3^2), so zero-initialised output layers no longer hide the network."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    value = 0.3 * rng.normal(size=shape.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = value + 1.0
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@dataclasses.dataclass
class Setup:
  """A model, its random parameters, example inputs and shared jitted entry points."""

  model: Any
  params: Any
  audio: jax.Array
  template: jax.Array
  style: jax.Array
  vertices: jax.Array
  conditions: dict

  def __post_init__(self):
    model, conditions = self.model, self.conditions
    self.forward = jax.jit(
      lambda p, audio, template, style, vertices, frame_mask: model.apply(
        p, audio, template, style, vertices, frame_mask=frame_mask, **conditions
      )[0]
    )
    self.generate = jax.jit(
      lambda p, audio, template, style, conditions: model.apply(
        p, audio, template, style, method="generate", **conditions
      )[0]
    )

  def run(self, audio=None, vertices=None, frame_mask=None):
    """Teacher-forced (or, for the non-autoregressive decoder, plain) forward pass."""
    audio = self.audio if audio is None else audio
    vertices = self.vertices if vertices is None else vertices
    if frame_mask is None:
      frame_mask = jnp.ones(vertices.shape[:2], bool)
    return self.forward(self.params, audio, self.template, self.style, vertices, frame_mask)


def _setup(cls, frames, **fields) -> Setup:
  model = cls.from_variant("tiny", num_vertices=NUM_VERTICES, **fields)
  audio, template, style, vertices = _inputs(frames, model.audio_frames_per_frame)
  conditions = {}
  if model.num_emotions:
    conditions = dict(emotion=jnp.array([2, 0]), intensity=jnp.array([1, 0]))
  params = _random_params(model, audio, template, style, vertices, **conditions)
  return Setup(model, params, audio, template, style, vertices, conditions)


@pytest.fixture(scope="module")
def faceformer():
  return _setup(FaceFormerDecoder, frames=9)


@pytest.fixture(scope="module")
def faceformer_biwi_emotion():
  """Two audio features per frame, two pre-norm layers, four heads, emotion and intensity."""
  return _setup(
    FaceFormerDecoder, frames=9, audio_frames_per_frame=2, num_layers=2, num_heads=4,
    pre_norm=True, num_emotions=4, num_intensities=3,
  )  # fmt: skip


@pytest.fixture(scope="module")
def nonautoregressive():
  return _setup(NonAutoregressiveDecoder, frames=8, num_layers=2, num_emotions=4, num_intensities=3)


@pytest.fixture(scope="module")
def nonautoregressive_biwi_local():
  return _setup(
    NonAutoregressiveDecoder, frames=8, audio_frames_per_frame=2, num_layers=1, attention_window=1
  )


def test_alibi_slopes_follow_alibi_for_powers_of_two_and_others():
  np.testing.assert_allclose(alibi_slopes(4), [2**-2, 2**-4, 2**-6, 2**-8])
  # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence.
  np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_periodic_bias_steps_down_once_per_period():
  bias = periodic_alibi_bias(jnp.arange(5), jnp.arange(5), np.array([1.0]), period=2, causal=True)
  expected_lower = np.array(
    [
      [0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0],
      [-1, 0, 0, 0, 0],
      [-1, -1, 0, 0, 0],
      [-2, -1, -1, 0, 0],
    ],
    np.float32,
  )
  np.testing.assert_array_equal(np.tril(np.asarray(bias[0])), expected_lower)
  symmetric = periodic_alibi_bias(jnp.arange(5), jnp.arange(5), np.array([0.5]), 2, causal=False)
  np.testing.assert_array_equal(np.asarray(symmetric[0]), np.asarray(symmetric[0]).T)
  assert float(symmetric[0, 0, 4]) == -1.0


def test_positional_encoding_is_periodic_for_any_length():
  encoding = periodic_positional_encoding(jnp.arange(5000), d_model=6, period=7)
  assert encoding.shape == (5000, 6)
  np.testing.assert_allclose(encoding[7:], encoding[:-7], atol=1e-6)
  np.testing.assert_allclose(encoding[0], [0, 1, 0, 1, 0, 1], atol=1e-7)


@pytest.mark.parametrize("audio_frames_per_frame", [1, 2])
def test_aligned_attention_equals_dense_alignment_mask(audio_frames_per_frame):
  rng = np.random.default_rng(0)
  batch, frames, heads, depth = 2, 6, 2, 4
  audio_frames = frames * audio_frames_per_frame + 1  # a trailing feature no frame hears
  query = jnp.asarray(rng.normal(size=(batch, frames, heads, depth)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(batch, audio_frames, heads, depth)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(batch, audio_frames, heads, depth)), jnp.float32)
  grouped = (batch, frames, audio_frames_per_frame, heads, depth)
  used = frames * audio_frames_per_frame

  @jax.jit
  def both(query, key, value):
    mask = alignment_mask(frames, audio_frames, audio_frames_per_frame)
    dense_result = dot_product_attention(query, key, value, mask=mask)
    grouped_result = aligned_attention(
      query, key[:, :used].reshape(grouped), value[:, :used].reshape(grouped)
    )
    return dense_result, grouped_result

  dense_result, grouped_result = both(query, key, value)
  np.testing.assert_allclose(grouped_result, dense_result, atol=1e-6)


@pytest.mark.parametrize("name", ["faceformer", "faceformer_biwi_emotion"])
def test_generate_with_cache_matches_generate_without_cache(name, request):
  setup = request.getfixturevalue(name)
  model = setup.model
  cached = setup.generate(setup.params, setup.audio, setup.template, setup.style, setup.conditions)
  reference, _ = jax.jit(
    lambda p: model.apply(
      p, setup.audio, setup.template, setup.style, method="generate_without_cache",
      **setup.conditions,
    )
  )(setup.params)  # fmt: skip
  assert cached.shape == setup.vertices.shape
  assert float(jnp.max(jnp.abs(cached - setup.template[:, None]))) > 1e-2  # it really moves
  np.testing.assert_allclose(cached, reference, atol=1e-5, rtol=0)


def test_generate_exports_with_a_symbolic_length(faceformer_biwi_emotion):
  """The predict function is exported with symbolic time (docs/design.md section 11); T = T_a // 2
  here."""
  s = faceformer_biwi_emotion
  (audio_frames,) = jax.export.symbolic_shape("t_a")
  audio_spec = jax.ShapeDtypeStruct((BATCH, audio_frames, AUDIO_DIM), jnp.float32)
  exported = jax.export.export(jax.jit(s.generate))(
    s.params, audio_spec, s.template, s.style, s.conditions
  )
  assert str(exported.out_avals[0].shape[1]) == "floordiv(t_a, 2)"
  expected = s.generate(s.params, s.audio, s.template, s.style, s.conditions)
  np.testing.assert_allclose(
    exported.call(s.params, s.audio, s.template, s.style, s.conditions), expected, atol=1e-6
  )


def test_teacher_forcing_on_generated_motion_reproduces_generation(faceformer):
  """Training and generation see the same inputs: start token, embedding, encoding, bias."""
  s = faceformer
  generated = s.generate(s.params, s.audio, s.template, s.style, s.conditions)
  np.testing.assert_allclose(s.run(vertices=generated), generated, atol=1e-5, rtol=0)


def test_generate_decodes_sixty_seconds_of_audio():
  frames = 1800  # 60 s at 30 fps; FaceFormer's own buffers stop at 600 frames
  model = FaceFormerDecoder.from_variant("tiny", num_vertices=4, d_model=16)
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.normal(size=(1, frames, AUDIO_DIM)), jnp.float32)
  template = jnp.asarray(rng.normal(size=(1, 4, 3)), jnp.float32)
  style = jnp.array([1], jnp.int32)
  params = _random_params(model, audio[:, :2], template, style, jnp.zeros((1, 2, 4, 3)))
  predicted, aux = jax.jit(lambda p: model.apply(p, audio, template, style, method="generate"))(
    params
  )
  assert predicted.shape == (1, frames, 4, 3)
  assert aux["offsets"].shape == (1, frames, 4, 3)
  assert bool(jnp.all(jnp.isfinite(predicted)))


def test_teacher_forced_forward_is_causal(faceformer_biwi_emotion):
  s = faceformer_biwi_emotion
  baseline = s.run()
  cut = 5
  # Frame t sees the true vertices of frames < t and the audio of frames <= t.
  after = s.run(
    audio=s.audio.at[:, 2 * (cut + 1) :].add(1.0), vertices=s.vertices.at[:, cut:].add(1.0)
  )
  np.testing.assert_array_equal(after[:, : cut + 1], baseline[:, : cut + 1])
  assert float(jnp.max(jnp.abs(after[:, cut + 1] - baseline[:, cut + 1]))) > 1e-3


def test_padded_frames_predict_the_template_and_leave_valid_frames_alone(faceformer):
  s = faceformer
  frame_mask = jnp.array([[True] * 9, [True] * 6 + [False] * 3])
  masked = s.run(frame_mask=frame_mask, vertices=s.vertices.at[1, 6:].set(100.0))
  np.testing.assert_array_equal(
    masked[1, 6:], jnp.broadcast_to(s.template[1], (3, NUM_VERTICES, 3))
  )
  np.testing.assert_allclose(masked[1, :6], s.run()[1, :6], atol=1e-6)


@pytest.mark.parametrize("cls", [FaceFormerDecoder, NonAutoregressiveDecoder])
def test_untrained_model_predicts_the_template_and_names_every_parameter(cls):
  model = cls.from_variant("tiny", num_vertices=NUM_VERTICES)
  audio, template, style, vertices = _inputs(frames=4)
  init = jax.jit(lambda key: model.init(key, audio, template, style, vertices))
  variables = init(jax.random.key(0, impl="unsafe_rbg"))
  leaves = jax.tree.leaves(
    variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(x.value.dtype == jnp.float32 and len(x.names) == x.value.ndim for x in leaves)
  assert variables["params"]["offset_projection"]["kernel"].names == ("embed", "vertices")
  generated, _ = jax.jit(lambda v: model.apply(v, audio, template, style, method="generate"))(
    variables
  )
  np.testing.assert_array_equal(generated, jnp.broadcast_to(template[:, None], vertices.shape))


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  model = FaceFormerDecoder.from_variant("tiny", num_vertices=NUM_VERTICES, dtype=jnp.bfloat16)
  audio, template, style, vertices = _inputs(frames=4)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), audio, template, style, vertices))
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(
    lambda v: model.apply(v, audio, template, style, method="generate"), nn.meta.unbox(shapes)
  )
  assert out[0].dtype == jnp.float32 and out[0].shape == vertices.shape


@pytest.mark.parametrize("name", ["faceformer_biwi_emotion", "nonautoregressive"])
def test_emotion_and_intensity_conditioning_change_the_motion(name, request):
  s = request.getfixturevalue(name)
  neutral = s.generate(s.params, s.audio, s.template, s.style, s.conditions)
  angry = s.generate(
    s.params, s.audio, s.template, s.style, {**s.conditions, "emotion": jnp.array([3, 3])}
  )
  intense = s.generate(
    s.params, s.audio, s.template, s.style, {**s.conditions, "intensity": jnp.array([2, 2])}
  )
  assert float(jnp.max(jnp.abs(angry - neutral))) > 1e-3
  assert float(jnp.max(jnp.abs(intense - neutral))) > 1e-3
  with pytest.raises(ValueError, match="emotion is required.*num_emotions=4"):
    jax.eval_shape(
      lambda: s.model.apply(
        s.params, s.audio, s.template, s.style, s.vertices, intensity=s.conditions["intensity"]
      )
    )


@pytest.mark.parametrize("name", ["nonautoregressive", "nonautoregressive_biwi_local"])
def test_nonautoregressive_shapes_and_agreement_with_generate(name, request):
  s = request.getfixturevalue(name)
  predicted = s.run()
  generated = s.generate(s.params, s.audio, s.template, s.style, s.conditions)
  assert predicted.shape == s.vertices.shape
  np.testing.assert_allclose(generated, predicted, atol=1e-6)


def test_nonautoregressive_output_depends_on_audio_everywhere(nonautoregressive):
  s = nonautoregressive
  # One pass over the whole sequence: a change of audio at frame 3 reaches every frame.
  moved = jnp.max(jnp.abs(s.run(audio=s.audio.at[:, 3].add(1.0)) - s.run()), axis=(0, 2, 3))
  assert bool(jnp.all(moved > 1e-5))


def test_nonautoregressive_local_window_limits_the_receptive_field(nonautoregressive_biwi_local):
  s = nonautoregressive_biwi_local
  changed = s.run(audio=s.audio.at[:, 0].add(1.0))  # the first audio feature of frame 0
  difference = np.asarray(jnp.max(jnp.abs(changed - s.run()), axis=(0, 2, 3)))
  assert difference[0] > 1e-4 and difference[1] > 1e-4
  np.testing.assert_array_equal(difference[2:], 0.0)


def test_nonautoregressive_valid_frames_do_not_depend_on_padding(nonautoregressive):
  s = nonautoregressive
  length = 5
  frame_mask = jnp.array([[True] * 8, [True] * length + [False] * 3])
  padded = s.run(audio=s.audio.at[1, length:].set(100.0), frame_mask=frame_mask)
  alone, _ = jax.jit(
    lambda p: s.model.apply(
      p, s.audio[1:, :length], s.template[1:], s.style[1:],
      **{k: v[1:] for k, v in s.conditions.items()},
    )
  )(s.params)  # fmt: skip
  np.testing.assert_allclose(padded[1, :length], alone[0], atol=1e-5)
  np.testing.assert_array_equal(
    padded[1, length:], jnp.broadcast_to(s.template[1], (3, NUM_VERTICES, 3))
  )


def test_bad_inputs_raise_clear_errors(faceformer):
  s = faceformer

  def apply(*args, **kwargs):
    return jax.eval_shape(lambda: s.model.apply(s.params, *args, **kwargs))

  with pytest.raises(ValueError, match="template must have shape"):
    apply(s.audio, s.template[:, :3], s.style, s.vertices)
  with pytest.raises(ValueError, match="audio_features has 3 frames"):
    apply(s.audio[:, :3], s.template, s.style, s.vertices)
  with pytest.raises(ValueError, match="needs vertices"):
    apply(s.audio, s.template, s.style)
  with pytest.raises(ValueError, match="style must have shape"):
    apply(s.audio, s.template, s.style[:1], s.vertices)
  with pytest.raises(ValueError, match="unknown FaceFormerDecoder variant"):
    FaceFormerDecoder.from_variant("huge")


def test_published_variants_have_the_paper_sizes():
  vocaset = FaceFormerDecoder.from_variant("vocaset")
  biwi = FaceFormerDecoder.from_variant("biwi")
  assert (vocaset.d_model, vocaset.period, vocaset.audio_frames_per_frame) == (64, 30, 1)
  assert (biwi.d_model, biwi.period, biwi.audio_frames_per_frame) == (128, 25, 2)
  assert (vocaset.num_vertices, biwi.num_vertices) == (5023, 23370)
  assert FaceFormerDecoder.from_variant("vocaset", num_styles=2).num_styles == 2


def test_speech_to_mesh_generate_keeps_padded_frames_out_of_valid_ones():
  """`SpeechToMesh.generate` hands the frame mask to the decoder: in a padded batch the valid
  frames of a shorter example equal its unpadded generation (a non-autoregressive decoder
  attends to every frame, so without the mask they would read the padding)."""
  from fdjax.models.audio2mesh import SpeechToMesh
  from fdjax.models.wav2vec2 import Wav2Vec2Encoder
  from fdjax.state import strip_boxes

  # "layer" conv norms: wav2vec2-base's "group" norm spans the padding by design (HF's too).
  encoder = Wav2Vec2Encoder.from_variant("tiny", feat_extract_norm="layer", attention_impl="xla")
  decoder = NonAutoregressiveDecoder.from_variant("tiny", attention_impl="xla")
  model = SpeechToMesh(encoder=encoder, decoder=decoder)
  rng = np.random.default_rng(0)
  frames, length = 24, 15
  samples, short = 16000 * frames // 30, 16000 * length // 30
  audio = rng.normal(size=(BATCH, samples)).astype(np.float32)
  template = rng.normal(size=(BATCH, NUM_VERTICES, 3)).astype(np.float32)
  style = np.array([0, 1], np.int32)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), audio, template, style, method="generate")
  )
  params = jax.tree.map(
    lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), strip_boxes(shapes["params"])
  )
  audio_mask = np.arange(samples)[None] < np.array([[samples], [short]])
  frame_mask = np.arange(frames)[None] < np.array([[frames], [length]])
  generate = jax.jit(functools.partial(model.apply, method="generate"))
  padded = generate(
    {"params": params},
    np.where(audio_mask, audio, 0.0),
    template,
    style,
    audio_mask=audio_mask,
    frame_mask=frame_mask,
  )[0]
  alone = generate({"params": params}, audio[1:, :short], template[1:], style[1:])[0]
  assert alone.shape == (1, length, NUM_VERTICES, 3)
  np.testing.assert_allclose(padded[1, :length], alone[0], atol=1e-5)  # 9e-3 before the fix
  np.testing.assert_array_equal(
    padded[1, length:], np.broadcast_to(template[1], (frames - length, NUM_VERTICES, 3))
  )
