"""Tests for fdjax.render: the rasteriser, shaded frames of a moving mouth, the MP4 with audio."""

import av
import numpy as np
import pytest
import soundfile

from fdjax import render

FPS = 30
NUM_FRAMES = 12


def _face_grid(num=13):
  """A flat 'face' in the x/y plane facing +z; returns vertices [V, 3], faces [F, 3], mouth [V]."""
  coords = np.linspace(-1.0, 1.0, num)
  xx, yy = np.meshgrid(coords, coords)
  vertices = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).reshape(-1, 3)
  faces = []
  for row in range(num - 1):
    for column in range(num - 1):
      a = row * num + column
      faces += [(a, a + 1, a + num), (a + 1, a + num + 1, a + num)]
  mouth = (np.abs(vertices[:, 0]) < 0.4) & (np.abs(vertices[:, 1] + 0.5) < 0.2)
  return vertices, np.array(faces), mouth


def _talking_sequence():
  """Frames alternate closed / open mouth; an open mouth is pushed back in z (a cavity)."""
  vertices, faces, mouth = _face_grid()
  sequence = np.repeat(vertices[None], NUM_FRAMES, axis=0)
  sequence[1::2, mouth, 2] -= 0.5
  return sequence, faces, mouth


def test_rasterise_covers_pixel_centres_inside_the_triangle():
  screen_xy = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
  coverage = render.rasterise(screen_xy, np.zeros(3), np.array([[0, 1, 2]]), 6, 6)
  rows, columns = np.mgrid[0:6, 0:6]
  # Centre (column + 0.5, row + 0.5) is inside x + y <= 4 exactly when row + column <= 3.
  np.testing.assert_array_equal(coverage == 0, rows + columns <= 3)
  assert set(np.unique(coverage)) == {-1, 0}


def test_rasterise_two_triangles_sharing_an_edge_leave_no_crack():
  screen_xy = np.array([[1.0, 1.0], [7.0, 1.0], [7.0, 7.0], [1.0, 7.0]])
  coverage = render.rasterise(screen_xy, np.zeros(4), np.array([[0, 1, 2], [0, 2, 3]]), 8, 8)
  assert (coverage[1:7, 1:7] >= 0).all()
  assert (coverage[0] == -1).all() and (coverage[:, 7] == -1).all()


@pytest.mark.parametrize("near_first", [True, False])
def test_rasterise_nearest_triangle_wins_whatever_the_order(near_first):
  square = np.array([[0.0, 0.0], [8.0, 0.0], [8.0, 8.0], [0.0, 8.0]])
  screen_xy = np.concatenate([square, square + 2.0])  # the second square is offset
  depth = np.array([5.0] * 4 + [1.0] * 4)  # and nearer
  far, near = np.array([[0, 1, 2], [0, 2, 3]]), np.array([[4, 5, 6], [4, 6, 7]])
  faces = np.concatenate([near, far] if near_first else [far, near])
  coverage = render.rasterise(screen_xy, depth, faces, 12, 12)
  near_ids = {0, 1} if near_first else {2, 3}
  assert set(np.unique(coverage[2:10, 2:10])) <= near_ids  # the overlap shows the near square
  assert set(np.unique(coverage[0:2, 0:2])) <= {0, 1, 2, 3} - near_ids


def test_render_sequence_shows_the_mouth_moving():
  sequence, faces, _ = _talking_sequence()
  frames = render.render_sequence(sequence, faces, size=64)
  assert frames.shape == (NUM_FRAMES, 64, 64, 3) and frames.dtype == np.uint8
  closed, opened = frames[0].astype(int), frames[1].astype(int)
  # The mouth sits around y = -0.5 (below the centre): rows 40-50, columns 22-42 at 64 px.
  mouth_change = np.abs(opened[40:50, 22:42] - closed[40:50, 22:42]).mean()
  forehead_change = np.abs(opened[5:20, 10:54] - closed[5:20, 10:54]).mean()
  assert mouth_change > 10.0
  assert forehead_change == 0.0
  # The framing is fixed over the sequence: equal poses give identical frames.
  np.testing.assert_array_equal(frames[0], frames[2])


def test_render_sequence_side_by_side_with_truth():
  sequence, faces, _ = _talking_sequence()
  frames = render.render_sequence(sequence, faces, truth=sequence[:-2], size=32, fps=FPS)
  assert frames.shape == (NUM_FRAMES - 2, 32, 64, 3)


def _write_inputs(tmp_path):
  sequence, faces, _ = _talking_sequence()
  np.save(tmp_path / "pred.npy", sequence.reshape(NUM_FRAMES, -1).astype(np.float32))  # [T, V*3]
  np.save(tmp_path / "truth.npy", sequence[:, :, :].astype(np.float32))  # [T, V, 3]
  with open(tmp_path / "face.obj", "w") as obj:
    obj.write("# grid face\n")
    obj.writelines(f"v {x} {y} {z}\n" for x, y, z in sequence[0])
    obj.writelines(f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}\n" for a, b, c in faces)
  sample_rate = 16000
  time = np.arange(int(sample_rate * (NUM_FRAMES / FPS + 0.1))) / sample_rate  # a bit longer
  soundfile.write(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 200 * time), sample_rate)
  return faces


def test_cli_writes_mp4_with_video_and_audio(tmp_path, capsys):
  faces = _write_inputs(tmp_path)
  np.testing.assert_array_equal(render.load_faces(tmp_path / "face.obj"), faces)
  out = tmp_path / "samples" / "clip.mp4"
  status = render.main(
    [
      "--vertices", str(tmp_path / "pred.npy"),
      "--truth", str(tmp_path / "truth.npy"),
      "--faces", str(tmp_path / "face.obj"),
      "--audio", str(tmp_path / "speech.wav"),
      "--out", str(out),
      "--fps", str(FPS),
      "--size", "48",
    ]
  )  # fmt: skip
  assert status == 0
  assert "clip.mp4" in capsys.readouterr().out
  with av.open(str(out)) as container:
    video_streams = [s for s in container.streams if s.type == "video"]
    audio_streams = [s for s in container.streams if s.type == "audio"]
    assert len(video_streams) == 1 and len(audio_streams) == 1
    video, audio = video_streams[0], audio_streams[0]
    assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
    assert (video.codec_context.width, video.codec_context.height) == (96, 48)
    assert audio.codec_context.sample_rate == 16000
    assert container.duration / 1e6 == pytest.approx(NUM_FRAMES / FPS, abs=0.05)
    decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
  assert len(decoded) == NUM_FRAMES
  # After H.264 compression the open and closed mouths still differ in the prediction panel.
  assert np.abs(decoded[1][30:38, 16:32].astype(int) - decoded[0][30:38, 16:32]).mean() > 5.0


def test_write_video_pads_odd_sizes_and_takes_a_waveform(tmp_path):
  frames = np.zeros((3, 15, 17, 3), np.uint8)
  render.write_video(frames, tmp_path / "odd.mp4", 25, audio=np.zeros(8000), sample_rate=16000)
  with av.open(str(tmp_path / "odd.mp4")) as container:
    video = container.streams.video[0]
    assert (video.codec_context.width, video.codec_context.height) == (18, 16)
    assert len(container.streams.audio) == 1
  with pytest.raises(ValueError, match="uint8"):
    render.write_video(iter([frames[0], frames[1].astype(float)]), tmp_path / "bad.mp4", 25)
  assert not (tmp_path / "bad.mp4").exists()  # no truncated clip left behind


def test_cli_reports_bad_faces_by_file(tmp_path, capsys):
  _write_inputs(tmp_path)
  np.save(tmp_path / "bad_faces.npy", np.array([[0, 1, 100000]]))
  status = render.main(
    [
      "--vertices", str(tmp_path / "pred.npy"),
      "--faces", str(tmp_path / "bad_faces.npy"),
      "--out", str(tmp_path / "x.mp4"),
    ]
  )  # fmt: skip
  assert status == 1
  error = capsys.readouterr().err
  assert "bad_faces.npy" in error and "169 vertices" in error


def _decoded_frames(path):
  with av.open(str(path)) as container:
    return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_cli_offsets_from_template_render_like_absolute_vertices(tmp_path):
  _write_inputs(tmp_path)
  sequence, faces, _ = _talking_sequence()
  template = sequence[0]
  np.save(tmp_path / "template.npy", template.reshape(-1))  # [V*3]
  np.save(tmp_path / "offsets.npy", sequence - template)
  common = ["--faces", str(tmp_path / "face.obj"), "--template", str(tmp_path / "template.npy")]
  common += ["--size", "32"]
  absolute = ["--vertices", str(tmp_path / "pred.npy"), "--out", str(tmp_path / "a.mp4")]
  offsets = ["--vertices", str(tmp_path / "offsets.npy"), "--out", str(tmp_path / "o.mp4")]
  assert render.main(absolute + common) == 0
  assert render.main(offsets + common + ["--offsets"]) == 0
  np.testing.assert_array_equal(
    _decoded_frames(tmp_path / "a.mp4"), _decoded_frames(tmp_path / "o.mp4")
  )
