"""The FID and FVD networks read from PyTorch checkpoints (fdjax/models/fid_inception.py,
i3d.py, torch_convert.py) against the reference networks with random weights: torch-fidelity's
FID Inception-v3 (pytorch-fid's network and tensor names) and cd-fvd's PyTorch I3D."""

import importlib
import importlib.util
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdjax.metrics import video
from fdjax.models import fid_inception, i3d
from fdjax.models.hf_convert import CheckpointError


def _torch_fidelity_inception_module():
  """torch-fidelity's `feature_extractor_inceptionv3` without its package `__init__` (which
  imports torchvision-based extractors); the module itself needs only torch."""
  spec = importlib.util.find_spec("torch_fidelity")
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  with mock.patch.dict(sys.modules, {"torch_fidelity": package}):
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def _randomise_batch_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
  for m in module.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      n = m.num_features
      m.weight.data = 0.5 + torch.rand(n, generator=generator)
      m.bias.data = 0.1 * torch.randn(n, generator=generator)
      m.running_mean.data = 0.1 * torch.randn(n, generator=generator)
      m.running_var.data = 0.5 + torch.rand(n, generator=generator)


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def inception_checkpoint(tmp_path_factory):
  """A random-weight FID Inception state dict written as pytorch-fid's file would be, and the
  torch-fidelity network that loaded it."""
  reference = _torch_fidelity_inception_module()
  generator = torch.Generator().manual_seed(0)
  with (
    mock.patch.object(reference.FeatureExtractorInceptionV3, "load_state_dict"),
    mock.patch.object(reference, "load_state_dict_from_url", return_value={}),
  ):
    network = reference.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
  _randomise_batch_norms(network, generator)
  path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
  torch.save(network.state_dict(), path)
  # the file loads back into the reference the ordinary way, strictly
  network = reference.FeatureExtractorInceptionV3(
    "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
  )
  return path, network


def test_fid_inception_converter_matches_the_reference_network(inception_checkpoint):
  path, network = inception_checkpoint
  model, variables = fid_inception.load(path)
  rng = np.random.default_rng(3)
  frames = rng.uniform(0, 1, (2, 40, 48, 3)).astype(np.float32)
  ours = video.inception_features(model, variables, frames)
  # pytorch-fid's InceptionV3 forward: resize to 299 (bilinear), 2x - 1, the blocks, pool3.
  x = torch.from_numpy(frames).permute(0, 3, 1, 2)
  x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
  with torch.no_grad():
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1"):
      x = getattr(network, name)(x)
    for name in ("Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"):
      x = getattr(network, name)(x)
    for name in (
      "Mixed_6b",
      "Mixed_6c",
      "Mixed_6d",
      "Mixed_6e",
      "Mixed_7a",
      "Mixed_7b",
      "Mixed_7c",
    ):
      x = getattr(network, name)(x)
    expected = network.AvgPool(x).flatten(1).numpy()
  assert ours.shape == (2, 2048)
  assert _relative_error(ours, expected) < 1e-5
  assert np.std(expected) > 0  # random weights give features that differ across inputs


def test_i3d_converter_matches_the_pytorch_i3d_of_fvd(tmp_path):
  from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

  torch.manual_seed(0)
  network = InceptionI3d(400, in_channels=3)
  _randomise_batch_norms(network, torch.Generator().manual_seed(1))
  network.eval()
  path = tmp_path / "i3d_pretrained_400.pt"
  torch.save(network.state_dict(), path)
  model, variables = i3d.load(path)
  rng = np.random.default_rng(4)
  clips = rng.integers(0, 256, (1, 9, 24, 32, 3), dtype=np.uint8)  # [N, T, H, W, C]
  ours = video.i3d_features(model, variables, clips, size=193)
  # cd-fvd's preprocess_i3d (at 193 px, the smallest the network takes) and the network.
  x = torch.from_numpy(clips).float().flatten(0, 1).permute(0, 3, 1, 2)
  x = F.interpolate(x, size=(193, 193), mode="bilinear", align_corners=False)
  x = 2.0 * x.view(1, 9, 3, 193, 193).transpose(1, 2) / 255.0 - 1
  pooled = []  # the reference's pooled Mixed_5c output, seen in the same forward pass
  network.avg_pool.register_forward_hook(lambda module, inputs, output: pooled.append(output))
  with torch.no_grad():
    expected = network(x).numpy()
  expected_pre_logits = pooled[0].mean(dim=(2, 3, 4)).numpy()
  assert ours.shape == (1, 400)
  assert _relative_error(ours, expected) < 1e-5
  assert np.std(expected) > 0
  pre_logits = video.i3d_features(model, variables, clips, size=193, pre_logits=True)
  assert pre_logits.shape == (1, 1024)
  assert _relative_error(pre_logits, expected_pre_logits) < 1e-5


def test_checkpoint_loaders_name_the_file_and_what_is_wrong(tmp_path, inception_checkpoint):
  missing = tmp_path / "absent.pth"
  with pytest.raises(FileNotFoundError, match=f"{missing}: no such FID Inception-v3 checkpoint"):
    fid_inception.load(missing)
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(b"this is not a checkpoint")
  with pytest.raises(ValueError, match=f"{garbage}: not a readable PyTorch I3D checkpoint"):
    i3d.load(garbage)
  torch.save({"epoch": 3, "optimizer": {}}, garbage)
  with pytest.raises(
    ValueError, match=r"not a state dict of the I3D weights \(entries \['epoch', 'optimizer'\]"
  ):
    i3d.load(garbage)
  path, _ = inception_checkpoint
  with pytest.raises(
    CheckpointError,
    match=r"\d+ of the \d+ tensors of InceptionI3d missing: Conv3d_1a_7x7",
  ):
    i3d.load(path)  # an Inception-v3 file given to the I3D loader
  state = torch.load(path)
  del state["Mixed_6b.branch7x7_2.bn.running_var"]
  state["extra.weight"] = torch.zeros(1)
  partial = tmp_path / "partial.pth"
  torch.save(state, partial)
  with pytest.raises(
    CheckpointError,
    match="1 of the .* tensors of FIDInceptionV3 missing: Mixed_6b.branch7x7_2.bn.running_var",
  ):
    fid_inception.load(partial)
  state = torch.load(path)
  state["extra.weight"] = torch.zeros(1)
  state["fc.bias"] = torch.zeros(1000)
  torch.save(state, partial)
  with pytest.raises(
    CheckpointError, match=r"'fc.bias' has shape \(1000,\), the model expects \(1008,\)"
  ):
    fid_inception.load(partial)
  state["fc.bias"] = torch.zeros(1008)
  torch.save({"state_dict": state}, partial)  # a wrapped state dict is unwrapped
  with pytest.raises(
    CheckpointError, match="unexpected tensors the model has no place for: 'extra.weight'"
  ):
    fid_inception.load(partial)
