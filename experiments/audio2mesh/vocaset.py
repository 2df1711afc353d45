"""Speech-driven 3D facial animation on VOCASET (FLAME topology, 5023 vertices, 30 fps).

The demo (`make demo`), on the synthetic twin, with an encoder that trains from scratch:

    fdjax train --config experiments/audio2mesh/vocaset.py:encoder=tiny --workdir runs/demo

FaceFormer-size, with wav2vec2-base weights from a local Hugging Face directory:

    fdjax train --config experiments/audio2mesh/vocaset.py:variant=faceformer \\
        --config.model.encoder.checkpoint=/path/to/wav2vec2-base-960h \\
        --config.data.raw_dir=/path/to/VOCASET --config.data.data_dir=/path/to/tfds \\
        --workdir runs/faceformer_vocaset

The streaming (causal) variant, exported with a `stream_step` beside `predict`:

    fdjax train --config experiments/audio2mesh/vocaset.py:encoder=tiny,causal=True \\
        --workdir runs/causal
    fdjax export --workdir runs/causal --out artifacts/causal

Motion diffusion: `diffspeaker` (transformer denoiser over the whole sequence, DDIM-50),
`diffposetalk` (windows of 100 frames after the 10 previous ones, audio/style guidance, DDPM-500)
and `facediffuser` (GRU denoiser, DDPM-1000); evaluation samples each test sequence
`data.eval_num_samples` times and reports one sample, the mean over samples and the diversity.
Guidance scales and the sampler are config fields, so one checkpoint is evaluated at several:

    fdjax train --config experiments/audio2mesh/vocaset.py:variant=diffspeaker,encoder=tiny \\
        --workdir runs/diffspeaker
    fdjax eval --config experiments/audio2mesh/vocaset.py:variant=diffspeaker,encoder=tiny \\
        --workdir runs/diffspeaker --config.model.decoder.audio_guidance_scale=2

Arguments: variant (faceformer, nonautoregressive, codetalker_vq, codetalker, diffspeaker,
diffposetalk, facediffuser), encoder (base, tiny), runlocal (tiny data and steps, for tests),
steps (override total_steps), causal (streaming variant, faceformer only).
"""

from ml_collections import ConfigDict

from data_pipelines.builders import vocaset
from experiments.audio2mesh.common import audio2mesh_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, variant="faceformer", encoder="base", runlocal=False, steps=0, causal=False)
  dataset = ConfigDict()
  dataset.name = "vocaset"  # TFDS builder data_pipelines/builders/vocaset.py.
  dataset.fps = 30.0  # Mesh frames per second (captured at 60, used at 30).
  dataset.sample_rate = 16000  # Audio samples per second after resampling.
  dataset.window_frames = 30  # Frames per training window (1 s); 0 = whole sentences.
  dataset.train_subjects = vocaset.TRAIN_SUBJECTS  # Speakers with a style embedding.
  dataset.decoder_variant = "vocaset"  # FaceFormer sizes for VOCASET (d_model 64).
  dataset.decoder_period = 30  # Period of the positional encoding, frames.
  dataset.frame_alignment = "interpolate"  # Audio features interpolated to mesh frames.
  dataset.audio_frames_per_frame = 1  # Decoder sees one audio feature per frame.
  return audio2mesh_config(dataset, args)


def get_sweep():
  """An ablation of learning rate and velocity-loss weight (4 points; `fdjax sweep`)."""
  from fdjax import sweep

  return sweep.product(**{"optim.lr": [3e-4, 1e-3], "loss.velocity_weight": [0.0, 1.0]})
