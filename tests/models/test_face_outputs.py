"""Decoder output kinds: FLAME coefficients through the head model, rig controls through a linear
rig; and the separate emotion branch, which changes the upper face but not the lip sync."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.metrics import mesh as mesh_metrics
from fdjax.models import face_outputs, flame
from fdjax.models.motion_decoders import NonAutoregressiveDecoder

FRAMES = 20


@pytest.fixture(scope="module")
def model():
  return flame.synthetic_head_model()


def _decoder(**fields):
  return NonAutoregressiveDecoder(
    num_vertices=5023,
    d_model=16,
    num_heads=2,
    num_layers=1,
    mlp_dim=32,
    period=4,
    num_styles=2,
    num_emotions=8,
    num_intensities=3,
    dropout_rate=0.0,
    **fields,
  )


def test_flame_output_is_the_head_model_of_the_subjects_identity(model):
  rng = np.random.default_rng(0)
  shape = rng.normal(size=(2, 100)).astype(np.float32)
  expression = rng.normal(size=(2, 5, 50)).astype(np.float32)
  jaw = 0.2 * rng.normal(size=(2, 5, 3)).astype(np.float32)
  head = face_outputs.OutputHead(kind="flame", num_expression=50)
  pose = np.zeros((2, 5, 15), np.float32)
  pose[..., 6:9] = jaw

  @jax.jit
  def both(shape, expression, jaw, pose):
    template = flame.blend_shapes(model, shape, jnp.zeros((2, 0)))  # [2, V, 3]
    vertices, named = head.to_vertices(jnp.concatenate([expression, jaw], -1), template)
    return vertices, named, flame.flame_forward(model, shape[:, None], expression, pose).vertices

  vertices, named, expected = both(shape, expression, jaw, pose)
  np.testing.assert_allclose(vertices, expected, atol=1e-6)
  np.testing.assert_array_equal(named["jaw"], jaw)
  assert head.size == 53


def test_rig_output_is_linear_in_the_controls_and_reads_a_users_rig(tmp_path):
  rng = np.random.default_rng(1)
  rig = rng.normal(scale=1e-3, size=(6, 5023, 3)).astype(np.float32)
  np.savez(tmp_path / "rig.npz", rig=rig)
  head = face_outputs.OutputHead(kind="rig", num_controls=6, rig=str(tmp_path / "rig.npz"))
  controls = rng.normal(size=(1, 4, 6)).astype(np.float32)
  template = rng.normal(size=(1, 5023, 3)).astype(np.float32)
  vertices, named = head.to_vertices(controls, template)
  np.testing.assert_allclose(
    vertices, template[:, None] + np.einsum("btc,cvd->btvd", controls, rig), atol=1e-6
  )
  assert named["controls"].shape == (1, 4, 6)
  synthetic = face_outputs.OutputHead(kind="rig").rig_matrix()
  assert synthetic.shape == (174, 5023, 3) and np.abs(synthetic).max() > 1e-4
  np.save(tmp_path / "wrong.npy", rig[:5])
  (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip")
  for name in ("wrong.npy", "garbage.npz", "absent.npy"):
    with pytest.raises(face_outputs.RigFileError) as raised:
      face_outputs.load_rig(str(tmp_path / name), 6, 5023)
    assert str(tmp_path / name) in str(raised.value) and "\n" not in str(raised.value)


def test_separate_emotion_branch_changes_the_upper_face_and_not_the_lip_sync():
  """One decoder (parameters initialised plus noise, so that zero-initialised projections act,
  at a scale giving jaw rotations of tenths of a radian and expressions of a few mm) generates
  audio A as happy, audio A as angry, and audio B as happy. Changing the emotion moves the upper
  face and leaves the jaw and the mouth's opening about its mean (`mesh.mouth_opening`, what
  lip sync times) as they were; changing the audio changes that motion, so the measure sees
  lip sync when it changes."""
  from data_pipelines.synthetic import talking_mesh
  from data_pipelines.synthetic import vocaset as vocaset_twin

  decoder = _decoder(output="flame", emotion_path="separate")
  rig = talking_mesh.make_rig(5023, vocaset_twin._seed(0, 0))
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.normal(size=(2, FRAMES, 8)), jnp.float32)[jnp.array([0, 0, 1])]
  template = jnp.broadcast_to(flame.synthetic_head_model().template, (3, 5023, 3))
  conditions = {"emotion": jnp.array([5, 1, 5]), "intensity": jnp.array([2, 2, 2])}
  style = jnp.array([0, 0, 0])

  @jax.jit
  def generate(key):
    params = decoder.init(key, audio, template, style, num_frames=FRAMES, **conditions)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    params = jax.tree.unflatten(tree, noisy)
    return decoder.apply(params, audio, template, style, num_frames=FRAMES, **conditions)

  vertices, named = generate(jax.random.key(0))
  vertices = 1000.0 * np.asarray(vertices)  # mm
  lips = mesh_metrics.RegionMask.from_array(rig.lips, 5023, "lips")
  opening = [mesh_metrics.mouth_opening(v, 1000.0 * template[0], lips) for v in vertices]
  opening = [o - o.mean() for o in opening]  # the mouth's motion about its mean, [T] each

  def lip_sync_change(i, j):  # RMS change of that motion, relative to its size
    return np.sqrt(np.mean((opening[i] - opening[j]) ** 2) / np.mean(opening[i] ** 2))

  upper = vertices[:, :, rig.upper_face].mean(1)  # [3, U, 3] over the sequence
  emotion_upper_mm = np.linalg.norm(upper[0] - upper[1], axis=-1).mean()
  print(
    f"jaw up to {np.abs(named['jaw']).max():.2f} rad, mouth opening {np.abs(opening[0]).max():.2f} "
    f"mm; emotion change: mouth opening {lip_sync_change(0, 1):.4f} of its motion, upper face "
    f"{emotion_upper_mm:.2f} mm; audio change: mouth opening {lip_sync_change(0, 2):.3f}"
  )
  np.testing.assert_array_equal(named["jaw"][0], named["jaw"][1])  # the jaw is the audio's
  assert lip_sync_change(0, 1) < 0.15 and emotion_upper_mm > 0.5
  assert lip_sync_change(0, 2) > 0.5


def test_rig_output_trains_through_the_vertex_loss():
  decoder = _decoder(output="rig", emotion_path="separate", num_controls=12)
  rng = np.random.default_rng(2)
  audio = jnp.asarray(rng.normal(size=(2, FRAMES, 8)), jnp.float32)
  template = jnp.broadcast_to(flame.synthetic_head_model().template, (2, 5023, 3))
  truth = template[:, None] + 1e-3 * jnp.asarray(rng.normal(size=(2, FRAMES, 1, 3)))
  conditions = {"emotion": jnp.array([1, 2]), "intensity": jnp.array([0, 1]), "vertices": truth}
  style = jnp.array([0, 1])

  @jax.jit
  def gradients(key):
    params = decoder.init(key, audio, template, style, **conditions)

    def loss(params):
      vertices, _ = decoder.apply(params, audio, template, style, **conditions)
      return jnp.mean((vertices - truth) ** 2)

    return jax.grad(loss)(nn.unbox(params))["params"]

  grads = gradients(jax.random.key(0))
  assert np.abs(grads["output_projection"]["kernel"]).max() > 0
  assert np.abs(grads["emotion_projection"]["kernel"]).max() > 0
