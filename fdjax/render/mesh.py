"""Software mesh rendering to MP4: `fdjax render` and the samples the audio2mesh demo writes.

A numpy z-buffer rasteriser (no OpenGL, no display) draws each frame of a vertex sequence with
flat Lambert shading, side by side with the ground truth when given; PyAV encodes the frames as
H.264 (yuv420p) and muxes the speech audio in as AAC, so a clip can be checked by eye and ear.

Camera: orthographic, looking along -z at the face front (FLAME / VOCASET and BIWI meshes have
+y up and +z towards the viewer). The framing (centre and scale) is computed once from the whole
sequence, so the face does not jump between frames, and it is shared by both panels.

Rasterisation is vectorised over triangles: each triangle's pixel bounding box is rounded up to
a power-of-two square, all candidate pixel centres of all triangles with the same square size
are tested at once with barycentric coordinates, and the nearest fragment per pixel wins through
one `np.minimum.at` over packed (depth, triangle) integer keys.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

# Light from the upper right in front of the face; shading is two-sided so inconsistent winding
# in a user's mesh does not turn faces black.
_LIGHT_DIRECTION = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
_AMBIENT = 0.18
_MESH_COLOUR = np.array([0.80, 0.78, 0.74])  # clay grey
_BACKGROUND = np.array([34, 36, 42], dtype=np.uint8)
_DEPTH_BITS = 38  # depth quantisation; the low 24 bits of a key hold the triangle index
_FACE_BITS = 24
# Candidate pixels processed at once, bounding memory for meshes with large triangles.
_MAX_CANDIDATES = 1 << 22


def rasterise(
  screen_xy: ArrayLike, depth: ArrayLike, faces: ArrayLike, height: int, width: int
) -> np.ndarray:
  """Z-buffer rasterisation of triangles: which triangle covers each pixel.

  A pixel (row i, column j) is covered when its centre (j + 0.5, i + 0.5) lies inside the
  triangle (edges included); the triangle with the smallest interpolated depth wins.

  Args:
    screen_xy: [V, 2] vertex positions in pixels (x to the right, y down).
    depth: [V] distance from the camera (smaller is nearer).
    faces: [F, 3] int vertex indices.
    height: H.
    width: W.

  Returns:
    [H, W] int64 triangle index per pixel, -1 where no triangle covers it. Triangles with
    non-finite vertices or zero area are skipped.
  """
  screen_xy = np.asarray(screen_xy, dtype=np.float64)
  depth = np.asarray(depth, dtype=np.float64)
  faces = np.asarray(faces, dtype=np.int64)
  if faces.shape[0] >= 1 << _FACE_BITS:
    raise ValueError(f"at most {1 << _FACE_BITS} triangles can be rasterised, got {len(faces)}")
  x = screen_xy[faces, 0]  # [F, 3]
  y = screen_xy[faces, 1]
  z = depth[faces]
  area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
  finite = np.isfinite(x).all(1) & np.isfinite(y).all(1) & np.isfinite(z).all(1)
  with np.errstate(invalid="ignore"):
    x_first = np.ceil(np.min(x, axis=1) - 0.5)
    x_last = np.floor(np.max(x, axis=1) - 0.5)
    y_first = np.ceil(np.min(y, axis=1) - 0.5)
    y_last = np.floor(np.max(y, axis=1) - 0.5)
    keep = finite & (np.abs(area) > 1e-12) & (x_first <= x_last) & (y_first <= y_last)
    keep &= (x_last >= 0) & (x_first <= width - 1) & (y_last >= 0) & (y_first <= height - 1)
  face_index = np.flatnonzero(keep)
  z_buffer = np.full(height * width, np.iinfo(np.int64).max, dtype=np.int64)
  if face_index.size == 0:
    return np.full((height, width), -1, dtype=np.int64)

  x, y, z, area = x[face_index], y[face_index], z[face_index], area[face_index]
  x_first = np.clip(x_first[face_index], 0, width - 1).astype(np.int64)
  x_last = np.clip(x_last[face_index], 0, width - 1).astype(np.int64)
  y_first = np.clip(y_first[face_index], 0, height - 1).astype(np.int64)
  y_last = np.clip(y_last[face_index], 0, height - 1).astype(np.int64)

  # Barycentric coordinate i as a plane over the screen: (a_i * px + b_i * py + c_i) / area,
  # from the edge opposite vertex i; depth is the same combination of the vertex depths.
  opposite = ((1, 2), (2, 0), (0, 1))
  a = np.stack([-(y[:, k] - y[:, j]) for j, k in opposite], axis=1) / area[:, None]  # [F, 3]
  b = np.stack([x[:, k] - x[:, j] for j, k in opposite], axis=1) / area[:, None]
  c = np.stack([x[:, j] * y[:, k] - x[:, k] * y[:, j] for j, k in opposite], axis=1)
  c = c / area[:, None]
  depth_a, depth_b, depth_c = (np.sum(coef * z, axis=1) for coef in (a, b, c))  # [F]

  depth_low = float(np.min(z))
  depth_scale = ((1 << _DEPTH_BITS) - 1) / max(float(np.max(z)) - depth_low, 1e-12)

  extent = np.maximum(x_last - x_first, y_last - y_first) + 1
  box_size = 1 << np.ceil(np.log2(extent)).astype(np.int64)  # power-of-two square side
  for side in np.unique(box_size):
    members = np.flatnonzero(box_size == side)
    offsets = np.arange(side * side)
    column_offset, row_offset = offsets % side, offsets // side  # [k*k]
    chunk = max(1, _MAX_CANDIDATES // (side * side))
    for start in range(0, members.size, chunk):
      tri = members[start : start + chunk]
      px = x_first[tri, None] + column_offset[None]  # [n, k*k]
      py = y_first[tri, None] + row_offset[None]
      centre_x, centre_y = px + 0.5, py + 0.5
      inside = (px <= x_last[tri, None]) & (py <= y_last[tri, None])
      for i in range(3):
        weight = a[tri, i, None] * centre_x + b[tri, i, None] * centre_y + c[tri, i, None]
        inside &= weight >= -1e-9  # tolerance: no cracks along shared edges
      rows, cols = np.nonzero(inside)
      fragment_tri = tri[rows]
      fragment_x, fragment_y = centre_x[rows, cols], centre_y[rows, cols]
      fragment_depth = (
        depth_a[fragment_tri] * fragment_x + depth_b[fragment_tri] * fragment_y
      ) + depth_c[fragment_tri]
      quantised = np.clip((fragment_depth - depth_low) * depth_scale, 0, (1 << _DEPTH_BITS) - 1)
      keys = (quantised.astype(np.int64) << _FACE_BITS) | face_index[fragment_tri]
      pixel = py[rows, cols] * width + px[rows, cols]
      np.minimum.at(z_buffer, pixel, keys)

  covered = z_buffer != np.iinfo(np.int64).max
  result = np.where(covered, z_buffer & ((1 << _FACE_BITS) - 1), -1)
  return result.reshape(height, width)


def face_shading(vertices: ArrayLike, faces: ArrayLike) -> np.ndarray:
  """Lambert intensity per triangle from its flat normal: [F] in [_AMBIENT, 1].

  Args:
    vertices: [V, 3].
    faces: [F, 3] int.
  """
  vertices = np.asarray(vertices, dtype=np.float64)
  corners = vertices[np.asarray(faces)]  # [F, 3, 3]
  normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  length = np.linalg.norm(normal, axis=-1, keepdims=True)
  normal = normal / np.where(length > 0, length, 1.0)
  lambert = np.abs(normal @ _LIGHT_DIRECTION)
  return _AMBIENT + (1.0 - _AMBIENT) * np.nan_to_num(lambert)


def _framing(reference: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, float]:
  """Centre [2] and pixels per unit that fit the x/y extent of `reference` [N, 3] in the view."""
  points = reference.reshape(-1, 3)
  points = points[np.isfinite(points).all(axis=1)]
  if points.size == 0:
    raise ValueError("cannot frame the camera: no finite vertex")
  low, high = points[:, :2].min(axis=0), points[:, :2].max(axis=0)
  centre = (low + high) / 2
  extent = float(np.max(high - low))
  scale = size * (1.0 - 2.0 * margin) / (extent if extent > 0 else 1.0)
  return centre, scale


def _draw_frame(
  vertices: np.ndarray, faces: np.ndarray, centre: np.ndarray, scale: float, size: int
) -> np.ndarray:
  """One shaded frame [size, size, 3] uint8 of vertices [V, 3]."""
  screen_xy = np.empty((vertices.shape[0], 2))
  screen_xy[:, 0] = (vertices[:, 0] - centre[0]) * scale + size / 2
  screen_xy[:, 1] = size / 2 - (vertices[:, 1] - centre[1]) * scale  # +y up -> rows down
  face_index = rasterise(screen_xy, -vertices[:, 2], faces, size, size)
  colours = np.clip(face_shading(vertices, faces)[:, None] * _MESH_COLOUR * 255, 0, 255)
  colours = np.concatenate([colours.astype(np.uint8), _BACKGROUND[None]])  # index -1: background
  return colours[face_index]


def _annotate(frame: np.ndarray, labels: list[str], panel_width: int, time_text: str | None):
  from PIL import Image, ImageDraw, ImageFont

  image = Image.fromarray(frame)
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=max(10, frame.shape[0] // 20))
  margin = max(3, frame.shape[0] // 64)
  for panel, label in enumerate(labels):
    draw.text((panel * panel_width + margin, margin), label, fill=(230, 230, 230), font=font)
  if time_text is not None:
    draw.text(
      (margin, frame.shape[0] - margin), time_text, fill=(230, 230, 230), font=font, anchor="ld"
    )
  return np.asarray(image)


def render_frames(
  vertices: ArrayLike,
  faces: ArrayLike,
  *,
  truth: ArrayLike | None = None,
  fps: float | None = None,
  size: int = 256,
  template: ArrayLike | None = None,
  labels: bool = True,
  margin: float = 0.08,
) -> Iterator[np.ndarray]:
  """The frames of `render_sequence` as an iterator of [size, size or 2 * size, 3] uint8, drawn
  as they are consumed, so a long clip is encoded without holding every frame in memory. Args
  as `render_sequence`; they are checked when this is called."""
  vertices = np.asarray(vertices, dtype=np.float64)
  faces = np.asarray(faces)
  if vertices.ndim != 3 or vertices.shape[-1] != 3:
    raise ValueError(f"vertices must be [T, V, 3], got shape {vertices.shape}")
  num_vertices = vertices.shape[1]
  _check_faces(faces, num_vertices, "faces")
  panels = [vertices]
  if truth is not None:
    truth = np.asarray(truth, dtype=np.float64)
    if truth.ndim != 3 or truth.shape[1:] != vertices.shape[1:]:
      raise ValueError(f"truth must be [T, {num_vertices}, 3], got shape {truth.shape}")
    num_frames = min(len(vertices), len(truth))
    panels = [vertices[:num_frames], truth[:num_frames]]
  framing_sets = list(panels[1:])
  if template is not None:
    template = np.asarray(template, dtype=np.float64)
    if template.shape != (num_vertices, 3):
      raise ValueError(f"template must be [{num_vertices}, 3], got shape {template.shape}")
    framing_sets.append(template[None])
  if not framing_sets:
    framing_sets = [vertices]
  centre, scale = _framing(np.concatenate([s.reshape(-1, 3) for s in framing_sets]), size, margin)
  panel_labels = ["prediction", "truth"] if labels and truth is not None else []
  # Inputs are checked above, when called; frames are drawn lazily as they are consumed.
  return _draw_frames(panels, faces, centre, scale, size, panel_labels, fps)


def _draw_frames(
  panels: list[np.ndarray],
  faces: np.ndarray,
  centre: np.ndarray,
  scale: float,
  size: int,
  panel_labels: list[str],
  fps: float | None,
) -> Iterator[np.ndarray]:
  for t in range(len(panels[0])):
    frame = np.concatenate([_draw_frame(p[t], faces, centre, scale, size) for p in panels], axis=1)
    time_text = f"{t / fps:.2f} s" if fps else None
    if panel_labels or time_text:
      frame = _annotate(frame, panel_labels, size, time_text)
    yield frame


def render_sequence(
  vertices: ArrayLike,
  faces: ArrayLike,
  *,
  truth: ArrayLike | None = None,
  fps: float | None = None,
  size: int = 256,
  template: ArrayLike | None = None,
  labels: bool = True,
  margin: float = 0.08,
) -> np.ndarray:
  """Renders a vertex sequence, side by side with the truth when given.

  Args:
    vertices: [T, V, 3] predicted (or any) vertices.
    faces: [F, 3] int triangles.
    truth: [T2, V, 3] ground truth, drawn on the right; both are cut to the shorter length.
    fps: frame rate; when given, each frame is stamped with its time in seconds.
    size: height and width of each panel in pixels.
    template: [V, 3] neutral mesh; when given, it (with the truth) sets the framing.
    labels: write "prediction" / "truth" over the panels when the truth is given.
    margin: fraction of the panel left empty on each side of the framed extent.

  The framing is computed once from the truth and template when either is given (so a
  diverging prediction leaves the frame visibly rather than zooming the camera out), else
  from all frames of `vertices`.

  Returns:
    [T, size, size, 3] uint8, or [T, size, 2 * size, 3] with the truth.
  """
  frames = render_frames(
    vertices,
    faces,
    truth=truth,
    fps=fps,
    size=size,
    template=template,
    labels=labels,
    margin=margin,
  )
  return np.stack(list(frames))


def _check_faces(faces: np.ndarray, num_vertices: int, source: str) -> None:
  if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
    raise ValueError(f"{source}: faces must be [F, 3] integers, got {faces.dtype} {faces.shape}")
  if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
    raise ValueError(
      f"{source}: face indices span [{faces.min()}, {faces.max()}] but the mesh has "
      f"{num_vertices} vertices"
    )


def write_video(
  frames: ArrayLike | Iterable[np.ndarray],
  path: str | os.PathLike,
  fps: float,
  audio: ArrayLike | str | os.PathLike | None = None,
  sample_rate: int | None = None,
  *,
  crf: int = 18,
) -> int:
  """Writes frames as an H.264 (yuv420p) MP4, with an AAC audio stream when audio is given.

  Args:
    frames: [T, H, W, 3] uint8 RGB, or an iterable of [H, W, 3] uint8 frames (e.g.
      `render_frames`) encoded as they come. Odd H or W is padded by one repeated edge
      row/column, as yuv420p needs even dimensions.
    path: the .mp4 to write (parent folders are created).
    fps: video frame rate.
    audio: a waveform [S] or [S, C] (float in [-1, 1]) with `sample_rate`, or the path of an
      audio file soundfile reads (its own sample rate is used). Mono and stereo are kept; more
      channels are averaged to mono. Audio past the last video frame (T / fps s) is dropped.
    sample_rate: Hz, required with a waveform.
    crf: x264 constant rate factor (lower is better quality).

  Returns:
    T, the number of frames written.
  """
  import av

  waveform = None
  if audio is not None:
    waveform, sample_rate = _load_audio(audio, sample_rate)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    return _encode(av, frames, path, fps, waveform, sample_rate, crf)
  except BaseException:
    path.unlink(missing_ok=True)  # no truncated clip left behind
    raise


def _encode(av, frames, path: Path, fps: float, waveform, sample_rate, crf: int) -> int:
  num_frames = 0
  with av.open(str(path), mode="w") as container:
    video = sound = None
    for frame in frames:
      frame = np.asarray(frame)
      if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frames must be [H, W, 3] uint8, got {frame.dtype} {frame.shape}")
      if frame.shape[0] % 2 or frame.shape[1] % 2:
        frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), "edge")
      if video is None:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height = frame.shape[1], frame.shape[0]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(crf), "preset": "medium"}
        if waveform is not None and waveform.shape[0] > 0:
          layout = "mono" if waveform.shape[1] == 1 else "stereo"
          sound = container.add_stream("aac", rate=sample_rate, layout=layout)
      elif (frame.shape[1], frame.shape[0]) != (video.width, video.height):
        raise ValueError(f"frame {num_frames} has shape {frame.shape}, unlike the first frame")
      container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
      num_frames += 1
      if sound is not None:
        # The audio of this frame's time span, muxed beside it so the streams interleave.
        first = int(round((num_frames - 1) * sample_rate / fps))
        last = int(round(num_frames * sample_rate / fps))
        _encode_audio(container, sound, waveform[first:last], first, sample_rate)
    if video is None:
      raise ValueError(f"{path}: no frames to write")
    container.mux(video.encode(None))
    if sound is not None:
      container.mux(sound.encode(None))
  return num_frames


def _encode_audio(container, stream, samples: np.ndarray, first_sample: int, sample_rate: int):
  """Encodes samples [S, C] starting at sample `first_sample` (PyAV re-frames them)."""
  import av

  if samples.shape[0] == 0:
    return
  planar = np.ascontiguousarray(samples.T.astype(np.float32))  # [C, S], the encoder's fltp
  audio_frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=stream.layout.name)
  audio_frame.sample_rate = sample_rate
  audio_frame.time_base = Fraction(1, sample_rate)
  audio_frame.pts = first_sample
  container.mux(stream.encode(audio_frame))


def _load_audio(
  audio: ArrayLike | str | os.PathLike, sample_rate: int | None
) -> tuple[np.ndarray, int]:
  """Waveform [S, C] float32 (C = 1 or 2) and its sample rate."""
  if isinstance(audio, str | os.PathLike):
    import soundfile

    try:
      waveform, sample_rate = soundfile.read(str(audio), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
      raise ValueError(f"{audio}: cannot read audio ({error})") from error
  else:
    if sample_rate is None:
      raise ValueError("write_video: sample_rate is required when audio is a waveform")
    waveform = np.asarray(audio, dtype=np.float32)
    if waveform.ndim == 1:
      waveform = waveform[:, None]
    if waveform.ndim != 2:
      raise ValueError(f"audio must be [S] or [S, C], got shape {waveform.shape}")
  if waveform.shape[1] > 2:
    waveform = waveform.mean(axis=1, keepdims=True)
  return waveform, int(sample_rate)


def load_faces(path: str | os.PathLike) -> np.ndarray:
  """Triangles [F, 3] int64 from a .npy of [F, 3] ints, a Wavefront .obj or a .ply.

  In an .obj, `f` lines are read (`v`, `v/vt`, `v/vt/vn`, `v//vn` tokens; 1-based or negative
  relative indices); polygons with more than three corners are split into a fan. Unreadable
  files raise a one-line ValueError naming the file.
  """
  from data_pipelines.ops import mesh as mesh_ops

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"faces file {path} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".npy":
    try:
      faces = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001  a stranger's file: name it, one line
      raise ValueError(f"{path}: cannot read faces ({type(error).__name__}: {error})") from error
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
      raise ValueError(f"{path}: expected [F, 3] integer faces, got {faces.dtype} {faces.shape}")
    return faces.astype(np.int64)
  if suffix == ".ply":
    faces = mesh_ops.read_ply(path)[1]
  elif suffix == ".obj":
    faces = mesh_ops.read_obj(path)[1]
  else:
    raise ValueError(f"{path}: unsupported faces format {suffix!r} (use .npy, .obj or .ply)")
  if not len(faces):
    raise ValueError(f"{path}: no faces found")
  return faces.astype(np.int64)


def _load_vertices(path: str, num_vertices: int | None = None) -> np.ndarray:
  """[T, V, 3] from a .npy of [T, V*3] or [T, V, 3]."""
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as error:  # noqa: BLE001  a stranger's file: name it, one line
    raise ValueError(f"{path}: cannot read vertices ({error})") from error
  if array.ndim == 2 and array.shape[1] % 3 == 0:
    array = array.reshape(array.shape[0], -1, 3)
  if array.ndim != 3 or array.shape[2] != 3:
    raise ValueError(f"{path}: expected vertices [T, V*3] or [T, V, 3], got shape {array.shape}")
  if num_vertices is not None and array.shape[1] != num_vertices:
    raise ValueError(f"{path}: has {array.shape[1]} vertices per frame, expected {num_vertices}")
  if array.shape[0] == 0:
    raise ValueError(f"{path}: has no frames")
  return array.astype(np.float64)


def main(argv: list[str]) -> int:
  """`fdjax render`: vertices (+ truth) + faces (+ audio) -> an MP4. Returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="fdjax render",
    description="Render a vertex sequence (side by side with the truth) to an MP4 with audio.",
  )
  parser.add_argument("--vertices", required=True, help="prediction .npy, [T, V*3] or [T, V, 3]")
  parser.add_argument("--truth", help="ground-truth .npy, drawn on the right")
  parser.add_argument(
    "--faces", required=True, help="triangles: .npy [F, 3] ints, an .obj or a .ply"
  )
  parser.add_argument("--audio", help="audio file (e.g. .wav) muxed in as AAC")
  parser.add_argument("--out", required=True, help="output .mp4")
  parser.add_argument("--fps", type=float, default=30.0, help="frame rate of the vertices")
  parser.add_argument("--size", type=int, default=256, help="panel height and width in pixels")
  parser.add_argument(
    "--template",
    help="neutral mesh (.npy [V, 3] or [V*3], .obj, .ply): frames the camera on the face",
  )
  parser.add_argument(
    "--offsets",
    action="store_true",
    help="the vertex files hold displacements from --template, which is added back",
  )
  args = parser.parse_args(argv)
  if args.offsets and args.template is None:
    parser.error("--offsets needs --template")
  try:
    faces = load_faces(args.faces)
    template = None
    if args.template is not None:
      from data_pipelines.ops import mesh as mesh_ops

      template = mesh_ops.load_template(args.template).astype(np.float64)
    vertices = _load_vertices(args.vertices, None if template is None else len(template))
    truth = None
    if args.truth is not None:
      truth = _load_vertices(args.truth, vertices.shape[1])
    if args.offsets:
      vertices = vertices + template
      truth = None if truth is None else truth + template
    _check_faces(faces, vertices.shape[1], f"{args.faces} (faces of {args.vertices})")
    start = time.perf_counter()
    frames = render_frames(
      vertices, faces, truth=truth, fps=args.fps, size=args.size, template=template
    )
    num_frames = write_video(frames, args.out, args.fps, audio=args.audio)
    seconds = time.perf_counter() - start
  except (ValueError, FileNotFoundError) as error:
    print(f"fdjax render: error: {error}", file=sys.stderr)
    return 1
  print(
    f"wrote {args.out}: {num_frames} frames at {args.fps:g} fps, "
    f"{num_frames / max(seconds, 1e-9):.1f} frames/s rendered and encoded"
  )
  return 0
