"""Token masks of the masked video autoencoders: exact counts, partitions, tube structure,
face-region priority, and randomness across keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import masking

GRID = (4, 6, 6)  # steps, h, w


def _draw(kind, key, ratio=0.9, grid=GRID, **kwargs):
  fn = jax.jit(lambda k: masking.make_mask(kind, k, grid, ratio, **kwargs))
  visible, masked = fn(key)
  return np.asarray(visible), np.asarray(masked)


def _as_mask(masked, grid=GRID):
  mask = np.zeros(int(np.prod(grid)), bool)
  mask[masked] = True
  return mask.reshape(grid)


@pytest.mark.parametrize(
  "kind, kwargs",
  [
    ("random", {}),
    ("tube", {}),
    ("frame", {}),
    ("part_window", {"window": (3, 3)}),
    ("face_region", {"parts": jnp.zeros((6, 6), jnp.int32)}),
  ],
)
def test_masks_partition_the_tokens_with_the_exact_count(kind, kwargs):
  ratio = 0.5 if kind == "frame" else 0.9  # 0.9 of 4 steps would hide all of them
  expected = {
    "random": round(0.9 * 144),  # 130
    "tube": 4 * round(0.9 * 36),  # 4 steps x 32
    "frame": 2 * 36,  # 2 of 4 steps
    "part_window": 4 * 4 * round(0.9 * 9),  # 4 steps x 4 windows x 8
    "face_region": 4 * round(0.9 * 36),
  }[kind]
  assert masking.num_masked(kind, GRID, ratio, kwargs.get("window", (2, 2))) == expected
  for seed in range(3):
    visible, masked = _draw(kind, jax.random.key(seed), ratio, **kwargs)
    assert masked.shape == (expected,) and visible.shape == (144 - expected,)
    assert visible.dtype == np.int32 and masked.dtype == np.int32
    np.testing.assert_array_equal(np.sort(np.concatenate([visible, masked])), np.arange(144))
    assert (np.diff(visible) > 0).all() and (np.diff(masked) > 0).all()


@pytest.mark.parametrize("kind", ["tube", "part_window", "face_region"])
def test_tube_like_masks_are_constant_over_time(kind):
  kwargs = {"window": (3, 3)} if kind == "part_window" else {}
  if kind == "face_region":
    kwargs["parts"] = jax.random.randint(jax.random.key(9), (6, 6), 0, 7)
  for seed in range(3):
    mask = _as_mask(_draw(kind, jax.random.key(seed), **kwargs)[1])
    assert (mask == mask[:1]).all()


def test_frame_masks_hide_whole_time_steps():
  mask = _as_mask(_draw("frame", jax.random.key(0), 0.5)[1])
  per_step = mask.reshape(4, -1)
  assert set(per_step.all(1) | ~per_step.any(1)) == {True}  # each step all or nothing
  assert per_step.all(1).sum() == 2


def test_part_window_masks_keep_the_same_visible_share_in_every_window():
  mask = _as_mask(_draw("part_window", jax.random.key(3), 0.75, window=(3, 3))[1])
  windows = mask[0].reshape(2, 3, 2, 3).transpose(0, 2, 1, 3).reshape(4, 9)
  assert (windows.sum(1) == round(0.75 * 9)).all()
  # Windows choose independently: not every window hides the same positions.
  assert len({tuple(w) for w in windows}) > 1


def test_random_masks_differ_across_keys_and_repeat_for_one_key():
  for kind in ("random", "tube", "part_window"):
    kwargs = {"window": (3, 3)} if kind == "part_window" else {}
    a = _draw(kind, jax.random.key(0), **kwargs)[1]
    b = _draw(kind, jax.random.key(1), **kwargs)[1]
    np.testing.assert_array_equal(a, _draw(kind, jax.random.key(0), **kwargs)[1])
    assert not np.array_equal(a, b), kind


def test_face_region_masks_eyes_nose_mouth_before_skin_and_background():
  parts = np.full((6, 6), masking.BACKGROUND, np.int32)
  parts[1:5, 1:5] = masking.SKIN
  parts[0, :] = masking.HAIR
  parts[1, 1:5] = masking.BROWS
  parts[2, 1], parts[2, 4] = masking.EYES, masking.EYES
  parts[3, 2:4] = masking.NOSE
  parts[4, 2:4] = masking.MOUTH
  parts = jnp.asarray(parts)
  grid = (2, 6, 6)
  priority = masking.FACE_PART_PRIORITY[np.asarray(parts)]
  for ratio in (0.15, 0.3, 0.6):
    count = masking.num_masked("face_region", grid, ratio) // 2
    for seed in range(4):
      masked = _draw("face_region", jax.random.key(seed), ratio, grid, parts=parts)[1]
      spatial = _as_mask(masked, grid)[0]
      assert spatial.sum() == count
      # Every masked position outranks (or ties) every visible one.
      assert priority[spatial].min() >= priority[~spatial].max()
      if count >= 6:  # room for all 6 eye/nose/mouth positions
        assert spatial[priority == 4].all()
        assert not spatial[np.asarray(parts) == masking.BACKGROUND].any() or count >= 24
  # Within a level the order is random: at 5 of 6 top-level positions, keys pick differently.
  draws = [_draw("face_region", jax.random.key(s), 5 / 36, grid, parts=parts)[1] for s in range(8)]
  picks = {tuple(masked) for masked in draws}
  assert len(picks) > 1


def test_token_face_parts_take_the_majority_part_of_each_patch_over_the_clip():
  face_parts = np.zeros((4, 8, 8), np.uint8)  # T=4, 8x8 pixels, patches of 4 -> 2x2 tokens
  face_parts[:, :4, :4] = masking.MOUTH  # top-left patch: mouth throughout
  face_parts[:2, :4, 4:] = masking.EYES  # top-right: eyes in the first tubelet only
  face_parts[:, 4:, :4] = masking.SKIN
  face_parts[:, 4:, :2] = masking.NOSE  # bottom-left: half nose, half skin -> lower id (skin)
  per_clip = np.asarray(masking.token_face_parts(jnp.asarray(face_parts), 4, 2))
  np.testing.assert_array_equal(
    per_clip, [[masking.MOUTH, masking.BACKGROUND], [masking.SKIN, masking.BACKGROUND]]
  )  # top-right: eyes in 32 pixels over the clip, background in 32 too -> background
  per_token = np.asarray(masking.token_face_parts(jnp.asarray(face_parts), 4, 2, per_clip=False))
  assert per_token.shape == (2, 2, 2)
  assert per_token[0, 0, 1] == masking.EYES and per_token[1, 0, 1] == masking.BACKGROUND


def test_ratios_that_hide_everything_or_nothing_are_refused():
  with pytest.raises(ValueError, match="at least one token visible"):
    masking.num_masked("part_window", (2, 4, 4), 0.9, (2, 2))  # round(3.6) = 4 of 4
  with pytest.raises(ValueError, match="does not tile"):
    masking.num_masked("part_window", (2, 6, 6), 0.5, (4, 4))
  with pytest.raises(ValueError, match="expected one of"):
    masking.num_masked("checkerboard", GRID, 0.5)
