"""fdjax/metrics/sync.py and fdjax/models/syncnet.py against syncnet_python (its network and
`calc_pdist`, from the syncnet-python package) and python_speech_features, and LSE on synthetic
embeddings with a known offset."""

import importlib.util
import sys
import types
from unittest import mock

import numpy as np
import pytest
import python_speech_features
import torch

from fdjax.metrics import sync
from fdjax.models import syncnet
from fdjax.models.hf_convert import CheckpointError


def _syncnet_python(name: str) -> types.ModuleType:
  """A module of the syncnet-python package, loaded without its package `__init__` (which pulls
  in its video pipeline: OpenCV, scenedetect). `SyncNetInstance` imports cv2 for reading videos,
  which the function used here (`calc_pdist`) does not touch: a stand-in satisfies it."""
  spec = importlib.util.find_spec("syncnet_python")
  location = f"{spec.submodule_search_locations[0]}/{name}.py"
  module_spec = importlib.util.spec_from_file_location(f"_syncnet_python_{name}", location)
  module = importlib.util.module_from_spec(module_spec)
  with mock.patch.dict(sys.modules, {"cv2": types.ModuleType("cv2")}):
    module_spec.loader.exec_module(module)
  return module


def _embeddings(rng, content, noise=0.3):
  return content + rng.normal(0, noise, content.shape)


@pytest.mark.parametrize("samples", [16000, 399, 12345])
def test_mfcc_equals_python_speech_features(samples):
  rng = np.random.default_rng(samples)
  audio = rng.normal(0, 3000, samples).astype(np.int16)
  expected = python_speech_features.mfcc(audio, 16000)
  np.testing.assert_allclose(sync.mfcc(audio), expected, rtol=1e-9, atol=1e-9)


def test_sync_distances_equal_syncnet_pythons_calc_pdist():
  calc_pdist = _syncnet_python("SyncNetInstance").calc_pdist
  rng = np.random.default_rng(0)
  video, audio = rng.normal(0, 1, (2, 40, 16)).astype(np.float32)
  expected = calc_pdist(torch.from_numpy(video), torch.from_numpy(audio), vshift=15)
  expected = torch.stack(expected).numpy()  # [W, 31]
  ours = sync.sync_distances(video, audio, vshift=15)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
  # Wav2Lip's evaluate(): mean over frames, min, median - min, offset = vshift - argmin
  mean = torch.mean(torch.from_numpy(expected).T, 1)
  minval, minidx = torch.min(mean, 0)
  scores = sync.sync_scores(video, audio, vshift=15)
  assert scores.offset == 15 - int(minidx)
  assert abs(scores.min_distance - float(minval)) < 1e-6
  assert abs(scores.confidence - float(torch.median(mean) - minval)) < 1e-6


@pytest.mark.parametrize("audio_late_by", [0, 3, -5])
def test_lse_recovers_a_known_offset_and_is_confident_only_in_sync(audio_late_by):
  rng = np.random.default_rng(7)
  frames, dim = 400, 16
  content = 2.0 + rng.normal(0, 1, (frames + 40, dim))  # what each frame "says"
  video = _embeddings(rng, content[20 : 20 + frames])
  audio = _embeddings(rng, content[20 - audio_late_by : 20 - audio_late_by + frames])
  scores = sync.sync_scores(video, audio)
  assert scores.offset == -audio_late_by  # positive offset: the audio leads
  assert scores.mean_distances.shape == (31,)
  unrelated = sync.sync_scores(video, _embeddings(rng, 2.0 + rng.normal(0, 1, (frames, dim))))
  assert scores.confidence > 3.0  # LSE-C of a synced pair
  assert unrelated.confidence < 0.1 * scores.confidence  # ~0 for a random pair
  assert scores.min_distance < 0.5 * unrelated.min_distance  # LSE-D lower in sync


@pytest.fixture(scope="module")
def syncnet_checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  network = _syncnet_python("SyncNetModel").S(num_layers_in_fc_layers=1024)
  generator = torch.Generator().manual_seed(1)
  for m in network.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      m.weight.data = 0.5 + torch.rand(m.num_features, generator=generator)
      m.bias.data = 0.1 * torch.randn(m.num_features, generator=generator)
      m.running_mean.data = 0.1 * torch.randn(m.num_features, generator=generator)
      m.running_var.data = 0.5 + torch.rand(m.num_features, generator=generator)
  network.eval()
  path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
  torch.save(network.state_dict(), path)
  return path, network


def test_syncnet_converter_and_lse_match_the_reference_pipeline(syncnet_checkpoint):
  path, network = syncnet_checkpoint
  model, variables = syncnet.load(path)
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)  # RGB, 25 fps
  audio = rng.normal(0, 0.1, 8 * 640).astype(np.float32)  # 16 kHz in [-1, 1]
  video_embeddings, audio_embeddings = sync.syncnet_embeddings(model, variables, frames, audio)
  # syncnet_python's evaluate(): BGR frames as floats, MFCC of the int16-scale WAV, windows of 5
  # frames and 20 MFCC steps at each start frame i < min(T, N // 640) - 5.
  imtv = torch.from_numpy(frames[..., ::-1].copy()).float().permute(3, 0, 1, 2)[None]
  cct = torch.from_numpy(python_speech_features.mfcc(audio * 32768.0, 16000).T).float()[None, None]
  lastframe = min(len(frames), len(audio) // 640) - 5
  with torch.no_grad():
    im_in = torch.cat([imtv[:, :, v : v + 5] for v in range(lastframe)], 0)
    cc_in = torch.cat([cct[:, :, :, v * 4 : v * 4 + 20] for v in range(lastframe)], 0)
    expected_video = network.forward_lip(im_in).numpy()
    expected_audio = network.forward_aud(cc_in).numpy()
  assert video_embeddings.shape == audio_embeddings.shape == (3, 1024)
  scale = np.abs(expected_video).max()
  assert np.max(np.abs(video_embeddings - expected_video)) < 1e-5 * scale
  assert np.max(np.abs(audio_embeddings - expected_audio)) < 1e-5 * np.abs(expected_audio).max()
  ours = sync.lse(model, variables, frames, audio, vshift=2)
  expected = sync.sync_scores(expected_video, expected_audio, vshift=2)
  np.testing.assert_allclose(ours.mean_distances, expected.mean_distances, rtol=1e-5)
  assert ours.offset == expected.offset
  assert abs(ours.confidence - expected.confidence) < 1e-5 * expected.min_distance


def test_syncnet_loader_and_windows_refuse_bad_input(tmp_path, syncnet_checkpoint):
  path, _ = syncnet_checkpoint
  state = torch.load(path)
  del state["netfcaud.3.bias"]
  broken = tmp_path / "syncnet_v2.model"
  torch.save(state, broken)
  with pytest.raises(
    CheckpointError, match=f"{broken}: 1 of the .* tensors of SyncNet missing: netfcaud.3.bias"
  ):
    syncnet.load(broken)
  with pytest.raises(FileNotFoundError, match="no such SyncNet checkpoint file"):
    syncnet.load(tmp_path / "absent.model")
  with pytest.raises(ValueError, match="too short for SyncNet"):
    sync.syncnet_windows(np.zeros((5, 224, 224, 3), np.uint8), np.zeros(5 * 640))


def _write_clip(path, frames, audio):
  """An mp4 with H.264 video at 25 fps and AAC audio at 16 kHz, through PyAV."""
  import av

  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    sound = container.add_stream("aac", rate=16000)
    sound.layout = "mono"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
    chunk = av.AudioFrame.from_ndarray(audio[None].astype(np.float32), format="fltp", layout="mono")
    chunk.sample_rate = 16000
    container.mux(sound.encode(chunk))
    container.mux(sound.encode(None))


def test_eval_video_command_scores_a_folder_of_clips(tmp_path, syncnet_checkpoint):
  from data_pipelines.ops.video import decode_audio, decode_video
  from fdjax import cli
  from fdjax.metrics import video

  rng = np.random.default_rng(5)
  (tmp_path / "real").mkdir()
  (tmp_path / "generated").mkdir()
  real = rng.integers(0, 256, (9, 224, 224, 3), dtype=np.uint8)
  generated = np.clip(real.astype(int) + rng.integers(-30, 31, real.shape), 0, 255).astype(np.uint8)
  audio = 0.1 * np.sin(np.arange(9 * 640) * 0.05)
  _write_clip(tmp_path / "real" / "clip0.mp4", real, audio)
  _write_clip(tmp_path / "generated" / "clip0.mp4", generated, audio)
  out = tmp_path / "metrics.json"
  argv = [
    "eval-video",
    "--generated",
    str(tmp_path / "generated"),
    "--real",
    str(tmp_path / "real"),
  ]
  assert cli.main([*argv, "--syncnet", str(syncnet_checkpoint[0]), "--out", str(out)]) == 0
  metrics = __import__("json").loads(out.read_text())
  decoded_real = decode_video(tmp_path / "real" / "clip0.mp4")
  decoded = decode_video(tmp_path / "generated" / "clip0.mp4")
  assert metrics["paired_clips"] == 1
  assert metrics["psnr"] == pytest.approx(float(video.clip_psnr(decoded, decoded_real)), rel=1e-6)
  assert metrics["ssim"] == pytest.approx(float(video.clip_ssim(decoded, decoded_real)), rel=1e-6)
  model, variables = syncnet.load(syncnet_checkpoint[0])
  expected = sync.lse(model, variables, decoded, decode_audio(tmp_path / "generated" / "clip0.mp4"))
  assert metrics["lse_d"] == pytest.approx(expected.min_distance, rel=1e-6)
  assert metrics["lse_c"] == pytest.approx(expected.confidence, rel=1e-6, abs=1e-6)
  assert set(metrics) >= {"real_lse_d", "real_lse_c", "av_offset_frames"}
  assert cli.main(["eval-video", "--generated", str(tmp_path / "absent")]) == 2


def test_state_dict_from_variables_writes_the_reference_layout_back(syncnet_checkpoint):
  from fdjax.models import torch_convert

  path, network = syncnet_checkpoint
  _, variables = syncnet.load(path)
  written = torch_convert.state_dict_from_variables(variables)
  reference = {k: v.numpy() for k, v in network.state_dict().items() if "num_batches" not in k}
  assert set(written) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
