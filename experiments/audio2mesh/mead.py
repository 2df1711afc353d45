"""Emotional speech animation in FLAME space on MEAD (EMOTE style; FLAME topology, 25 fps).

The decoder predicts per frame 50 expression coefficients and the jaw pose, decoded through the
differentiable head model (`model.decoder.output="flame"`; the synthetic head model unless
`model.decoder.head_model` names a `generic_model.pkl`), conditioned on the speaker and,
through a branch of their own that cannot move the lips' sync, the emotion (8) and its
intensity (3). The loss is EMOTE's split: lip-region vertex and velocity
error per frame (content) plus the whole face's error per sequence (emotion,
`loss.emotion_weight`). Evaluation adds LVE per emotion and the emotion accuracy of the
generated expression (`fdjax/tasks/_emotion.py`). On the synthetic twin, from scratch:

    fdjax train --config experiments/audio2mesh/mead.py --workdir runs/mead

On MEAD with reconstructed parameters (`data_pipelines/builders/mead.py` describes the layout),
decoding through the FLAME model they belong to:

    fdjax train --config experiments/audio2mesh/mead.py \\
        --config.data.raw_dir=/path/to/MEAD --config.data.data_dir=/path/to/tfds \\
        --config.model.decoder.head_model=/path/to/MEAD/head_model/generic_model.pkl \\
        --workdir runs/mead_real

Rig controls instead of FLAME coefficients (EmoFace's 174 MetaHuman controls through a linear
rig; `model.decoder.rig` names a `[174, V, 3]` .npy/.npz, "" the synthetic rig):

    fdjax train --config experiments/audio2mesh/mead.py:output=rig --workdir runs/mead_rig

Arguments: output (flame, rig, vertices), emotion_path (separate, input), encoder (tiny, base),
runlocal (tiny data and steps, for tests), steps (override total_steps).
"""

from ml_collections import ConfigDict

from data_pipelines.builders import mead
from experiments.audio2mesh.common import audio2mesh_config
from fdjax.config import parse_arg


def get_config(arg=None):
  args = parse_arg(
    arg, output="flame", emotion_path="separate", encoder="tiny", runlocal=False, steps=0
  )
  args.variant, args.causal = "nonautoregressive", False  # EMOTE's decoder is not autoregressive
  dataset = ConfigDict()
  dataset.name = "mead"  # TFDS builder data_pipelines/builders/mead.py.
  dataset.fps = 25.0  # Frames per second of the reconstructed FLAME parameters.
  dataset.sample_rate = 16000  # Audio samples per second.
  dataset.window_frames = 25  # Frames per training window (1 s); 0 = whole clips.
  dataset.train_subjects = mead.TRAIN_SUBJECTS  # Actors with a style embedding (EMOTE's 32).
  dataset.decoder_variant = "vocaset"  # FLAME-topology sizes (d_model 64, two layers).
  dataset.decoder_period = 25  # Period of the positional encoding and temporal bias, frames.
  dataset.frame_alignment = "interpolate"  # Audio features interpolated to the mesh frames.
  dataset.audio_frames_per_frame = 1  # The decoder reads one audio feature per frame.
  c = audio2mesh_config(dataset, args)
  c.data.emotions = mead.EMOTIONS  # Emotion class names (`emotion` indexes them).
  d = c.model.decoder
  d.num_emotions = len(mead.EMOTIONS)  # Emotion conditioning (EMOTE: one-hot of 8).
  d.num_intensities = len(mead.LEVELS)  # Intensity conditioning (levels 1-3).
  # What the decoder predicts (fdjax/models/face_outputs.py): "flame" (expression + jaw through
  # the head model), "rig" (controller values through a linear rig) or "vertices" (offsets).
  d.output = args.output
  d.num_expression = 50  # "flame": expression coefficients predicted (EMOTE: 50).
  d.head_model = ""  # "flame": generic_model.pkl of the data's FLAME; "" = the synthetic one.
  d.num_controls = 174  # "rig": controller values per frame (EmoFace: 174).
  d.rig = ""  # "rig": [C, V, 3] linear rig (.npy/.npz); "" = the synthetic rig.
  # Emotion and intensity drive a branch of their own whose outputs do not depend on the audio
  # (not the jaw): lip sync is the audio's alone; "input" adds them to the input instead.
  d.emotion_path = args.emotion_path
  # EMOTE's split of the loss: lip-region vertex + velocity error per frame (content, weight
  # below) plus the whole face's time-averaged error per sequence (emotion); 0 = plain loss.
  c.loss.content_weight = 1.0
  c.loss.emotion_weight = 1.0
  c.eval_every = 0  # Evaluate at the end (per-emotion LVE and emotion accuracy).
  if not args.runlocal and not args.steps:
    c.total_steps = 1500 if args.encoder == "tiny" else 20000
  return c
