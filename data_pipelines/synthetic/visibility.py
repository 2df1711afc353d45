"""How visible the labelled twins' expressions are to a plain learner: linear probes on pixels.

A twin whose expressions a linear classifier on raw pixels cannot read at the resolution the
models see is too faint for any method trained on a few thousand clips. Two measures, each a
logistic regression on standardised pixels of frames rendered by `face_render`:

- `expression_uar`: DFEW's seven emotions, one sample per clip: its apex frame minus its first
  (neutral) frame, identities, scenes and poses all random. Unweighted average recall.
- `au_f1`: BP4D's twelve AUs on random co-occurring AU tracks, each clip a new person in a lab
  session (`face_render.lab_scene`, as the BP4D twin), one sample per frame: the frame minus its
  clip's mean frame (a person-specific neutral, as AU detectors often subtract).
  Mean F1 over the AUs.

`python -m data_pipelines.synthetic.visibility --side 32` prints both.
"""

from __future__ import annotations

import argparse

import numpy as np

from data_pipelines.synthetic import face_render

DFEW_EXPRESSIONS = ("happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear")
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


def apex_differences(
  per_class: int, side: int, rng: np.random.Generator, frames: tuple[int, int] = (24, 72)
) -> tuple[np.ndarray, np.ndarray]:
  """`(x [N, side*side*3], labels [N])`: apex minus first frame of `per_class` clips per emotion.

  The apex is the frame of largest summed activation (blinks and speech aside); a neutral
  clip's is a random frame.
  """
  quiet = [face_render.AU_INDEX[25], face_render.AU_INDEX[43]]
  x, labels = [], []
  for label, name in enumerate(DFEW_EXPRESSIONS):
    for _ in range(per_class):
      length = int(rng.integers(frames[0], frames[1] + 1))
      identity = face_render.random_identity(rng)
      scene = face_render.random_scene(rng, side, side)
      track = face_render.expression_track(name, length, rng)
      poses = face_render.random_pose_track(length, rng, drift=face_render.EXPRESSION_POSE_DRIFT)
      apex = int(np.delete(track, quiet, axis=1).sum(1).argmax())
      if name == "neutral":
        apex = int(rng.integers(length))
      first, peak = (
        face_render.render_frame(identity, scene, track[t], poses[t], rng).astype(np.float32)
        for t in (0, apex)
      )
      x.append(((peak - first) / 255.0).ravel())
      labels.append(label)
  return np.stack(x), np.array(labels)


def au_frames(
  clips: int, side: int, rng: np.random.Generator, num_frames: int = 48, stride: int = 4
) -> tuple[np.ndarray, np.ndarray]:
  """`(x [N, side*side*3], occurrence [N, 12])`: every `stride`-th frame minus its clip's mean."""
  x, y = [], []
  for _ in range(clips):
    identity = face_render.random_identity(rng)
    session = face_render.lab_scene(rng, side, side)  # as the BP4D twin films its subjects
    frames, track = face_render.render_au_clip(num_frames, side, side, rng, identity, session)
    frames = frames.astype(np.float32) / 255.0
    kept = slice(0, num_frames, stride)
    x.append((frames[kept] - frames.mean(0)).reshape(len(frames[kept]), -1))
    y.append(face_render.au_occurrence(track, BP4D_AUS)[kept])
  return np.concatenate(x), np.concatenate(y)


def _probe(x_train: np.ndarray, y_train: np.ndarray, c: float):
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  scaler = StandardScaler().fit(x_train)
  model = LogisticRegression(C=c, max_iter=300).fit(scaler.transform(x_train), y_train)
  return lambda x: model.predict(scaler.transform(x))


def expression_uar(per_class: int, side: int, seed: int = 0, c: float = 0.01) -> float:
  """UAR of a linear probe trained on `per_class` clips per emotion, tested on half as many."""
  from sklearn.metrics import balanced_accuracy_score

  rng = np.random.default_rng(seed)
  x_train, y_train = apex_differences(per_class, side, rng)
  x_test, y_test = apex_differences(max(per_class // 2, 10), side, rng)
  return float(balanced_accuracy_score(y_test, _probe(x_train, y_train, c)(x_test)))


def au_f1(clips: int, side: int, seed: int = 0, c: float = 0.01) -> dict[int, float]:
  """F1 per BP4D AU of linear probes trained on frames of `clips` clips, tested on half as many."""
  from sklearn.metrics import f1_score

  rng = np.random.default_rng(seed)
  x_train, y_train = au_frames(clips, side, rng)
  x_test, y_test = au_frames(max(clips // 2, 4), side, rng)
  return {
    au: float(f1_score(y_test[:, k], _probe(x_train, y_train[:, k], c)(x_test), zero_division=0))
    for k, au in enumerate(BP4D_AUS)
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--side", type=int, default=32, help="frame side in pixels")
  parser.add_argument("--per_class", type=int, default=60, help="DFEW training clips per class")
  parser.add_argument("--au_clips", type=int, default=60, help="BP4D training clips")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  uar = expression_uar(args.per_class, args.side, args.seed)
  print(
    f"DFEW twin, {args.per_class} clips/class, {args.side} px: linear UAR {uar:.3f} (chance 0.143)"
  )
  f1 = au_f1(args.au_clips, args.side, args.seed)
  mean = np.mean(list(f1.values()))
  print(f"BP4D twin, {args.au_clips} clips, {args.side} px: linear mean AU F1 {mean:.3f}")
  print("  per AU:", {a: round(v, 2) for a, v in f1.items()})


if __name__ == "__main__":
  main()
