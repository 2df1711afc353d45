"""Audio ops: reading, mono, polyphase resampling, wav2vec2 normalisation, frame-aligned windows."""

import math

import numpy as np
import pytest
import soundfile

from data_pipelines.ops import audio


def _tone(frequency, sample_rate, seconds=1.0, amplitude=0.5):
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _amplitude_at(signal, sample_rate, frequency):
  spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal)))) / (len(signal) / 4)
  frequencies = np.fft.rfftfreq(len(signal), 1 / sample_rate)
  return spectrum[np.argmin(np.abs(frequencies - frequency))]


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_read_audio_averages_channels_to_float_mono(tmp_path, suffix):
  left, right = _tone(440, 16000), _tone(880, 16000)
  path = tmp_path / f"stereo.{suffix}"
  soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_16")
  samples, sample_rate = audio.read_audio(path)
  assert sample_rate == 16000
  assert samples.dtype == np.float32 and samples.shape == (16000,)
  np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-4)


def test_to_mono_scales_integer_pcm_to_unit_range():
  pcm = np.array([-32768, 0, 16384, 32767], np.int16)
  np.testing.assert_allclose(audio.to_mono(pcm), [-1.0, 0.0, 0.5, 32767 / 32768])
  with pytest.raises(ValueError, match="shape"):
    audio.to_mono(np.zeros((2, 3, 4)))


def test_resample_44k1_to_16k_keeps_speech_band_and_removes_what_would_alias():
  tone = _tone(1000, 44100) + _tone(11000, 44100)  # 11 kHz is above 16 kHz's Nyquist
  out = audio.resample(tone, 44100, 16000)
  assert out.dtype == np.float32
  assert out.shape == (math.ceil(44100 * 160 / 441),)
  assert _amplitude_at(out, 16000, 1000) == pytest.approx(0.5, rel=0.02)
  # Without the anti-aliasing filter, 11 kHz would fold to 5 kHz at full amplitude.
  assert _amplitude_at(out, 16000, 5000) < 0.005


def test_resample_22k_to_16k_preserves_duration_and_same_rate_is_identity():
  tone = _tone(300, 22000, seconds=2.0)
  assert audio.resample(tone, 22000, 16000).shape == (32000,)
  np.testing.assert_array_equal(audio.resample(tone, 22000, 22000), tone)
  with pytest.raises(ValueError, match="positive"):
    audio.resample(tone, 0, 16000)


def test_normalize_matches_wav2vec2_feature_extractor():
  from transformers.models.wav2vec2.feature_extraction_wav2vec2 import Wav2Vec2FeatureExtractor

  rng = np.random.default_rng(0)
  samples = (0.1 * rng.normal(size=5000) + 0.02).astype(np.float32)
  extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
  expected = extractor(samples, sampling_rate=16000, return_tensors="np").input_values[0]
  np.testing.assert_allclose(audio.normalize(samples), expected, atol=1e-5)
  out = audio.normalize(samples)
  assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, abs=1e-4)


def test_normalize_keeps_silence_finite():
  out = audio.normalize(np.zeros(100, np.float32))
  assert np.all(out == 0.0)
  assert audio.normalize(np.zeros(0, np.float32)).shape == (0,)


def test_frame_start_sample_is_exact_at_fractional_samples_per_frame():
  # 16 kHz at 30 fps: 533 1/3 samples per frame; frame t starts at ceil(t * 1600 / 3).
  assert [audio.frame_start_sample(t, 16000, 30) for t in range(4)] == [0, 534, 1067, 1600]
  assert audio.frame_start_sample(300000, 16000, 30) == 160_000_000  # no drift after ~3 h
  assert audio.frame_start_sample(5, 16000, 25) == 3200
  assert audio.window_samples(30, 16000, 30) == 16000
  assert audio.window_samples(25, 16000, 30) == 13334


def test_crop_or_pad_takes_the_samples_under_the_frames():
  ramp = np.arange(16000, dtype=np.float32)  # each sample holds its own index
  window, mask = audio.crop_or_pad(ramp, start_frame=4, num_frames=6, sample_rate=16000, fps=30)
  start = math.ceil(4 * 16000 / 30)
  assert window.shape == mask.shape == (audio.window_samples(6, 16000, 30),)
  np.testing.assert_array_equal(window, np.arange(start, start + window.shape[0]))
  assert mask.all()


def test_crop_or_pad_pads_past_the_end_with_masked_zeros():
  ramp = np.arange(1, 1001, dtype=np.float32)
  window, mask = audio.crop_or_pad(ramp, start_frame=1, num_frames=3, sample_rate=16000, fps=25)
  assert window.shape == (1920,)
  assert mask.sum() == 1000 - 640
  np.testing.assert_array_equal(window[: mask.sum()], np.arange(641, 1001))
  assert np.all(window[~mask] == 0) and not mask[mask.sum() :].any()
  with pytest.raises(ValueError):
    audio.crop_or_pad(ramp, -1, 3, 16000, 25)
