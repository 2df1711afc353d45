"""Speech-driven 3D facial animation on BIWI (23370 vertices, 25 fps).

    fdjax train --config experiments/audio2mesh/biwi.py:variant=faceformer \\
        --config.model.encoder.checkpoint=/path/to/wav2vec2-base-960h \\
        --config.data.raw_dir=/path/to/BIWI --config.data.data_dir=/path/to/tfds \\
        --workdir runs/faceformer_biwi

Motion diffusion, as on VOCASET (the denoisers read BIWI's two audio features per mesh frame):

    fdjax train --config experiments/audio2mesh/biwi.py:variant=facediffuser,encoder=tiny \\
        --workdir runs/facediffuser_biwi

with `variant=diffspeaker` (DDIM-50), `diffposetalk` (windows of 100 frames = 4 s after 10
previous ones, DDPM-500) or `facediffuser` (FaceDiffuser's BIWI setting: 500 cosine steps,
DDPM over all of them).

Arguments as in vocaset.py. Evaluation defaults to test-A (`test`); `test_b` holds the 8 other
speakers (`--config.data.eval_split=test_b`).
"""

from ml_collections import ConfigDict

from data_pipelines.builders import biwi
from experiments.audio2mesh.common import audio2mesh_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, variant="faceformer", encoder="base", runlocal=False, steps=0, causal=False)
  dataset = ConfigDict()
  dataset.name = "biwi"  # TFDS builder data_pipelines/builders/biwi.py.
  dataset.fps = 25.0  # Mesh frames per second.
  dataset.sample_rate = 16000  # Audio samples per second.
  dataset.window_frames = 25  # Frames per training window (1 s); 0 = whole sentences.
  dataset.train_subjects = biwi.TRAIN_SUBJECTS  # Speakers with a style embedding.
  dataset.decoder_variant = "biwi"  # FaceFormer sizes for BIWI (d_model 128).
  dataset.decoder_period = 25  # Period of the positional encoding, frames.
  dataset.frame_alignment = "pairs"  # Two 50 Hz audio features per mesh frame.
  dataset.audio_frames_per_frame = 2  # Decoder attends to both.
  return audio2mesh_config(dataset, args)
