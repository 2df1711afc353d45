"""Face stabilisation on pairs synthesised from the head model (task `stabilize`).

Train, then stabilise a mesh sequence to its first frame:

    fdjax train --config experiments/stabilize/head_pairs.py --workdir runs/stabilize
    fdjax stabilize --mesh_seq seq.npy --out stabilised.npy --workdir runs/stabilize

The final evaluation prints rotation, translation and skull vertex errors of the model and of
Procrustes on all vertices and on the rigid region, on held-out pairs. Arguments: size (`base`:
the stabiliser below; `tiny`: one refinement step, narrower, for tests), runlocal (few steps
and held-out pairs, for tests), steps (override total_steps). With a real FLAME model, set
`--config.data.head_model=.../generic_model.pkl --config.data.rigid_region=REGION.txt`.
"""

from fdjax.config import base_config, parse_arg

SIZES = {
  # The `Stabilizer` fields of each size (fdjax/models/stabilizer.py).
  "base": dict(num_points=256, width=64, depth=2, head_width=256, vertex_width=64, iterations=2),
  "tiny": dict(num_points=128, width=32, depth=1, head_width=64, vertex_width=32, iterations=1),
}


def get_config(arg=None):
  args = parse_arg(arg, size="base", runlocal=False, steps=0)
  if args.size not in SIZES:
    raise ValueError(f"size={args.size!r}: expected one of {tuple(SIZES)}")
  c = base_config()
  c.task = "stabilize"

  c.data.head_model = ""  # generic_model.pkl of the head model ("": the synthetic one, seed 0).
  c.data.rigid_region = ""  # Its rigid region's vertex indices ("": the synthetic model's).
  # How pairs are drawn (data_pipelines/head_pairs.py): identity and expression coefficients.
  c.data.num_shape = 100  # Identity coefficients drawn (standard normal).
  c.data.num_expression = 50  # Expression coefficients drawn per mesh.
  c.data.expression_scale = 0.5  # Standard deviation of expression component k: this / (1 + k/10).
  c.data.neutral_probability = 0.1  # Chance that a mesh's expression is neutral.
  c.data.jaw_open_max = 0.3  # Jaw opening, radians, uniform from 0.
  c.data.jaw_side_std = 0.02  # Sideways jaw rotation per axis, radians.
  # Neck rotation per axis, radians (skin motion where the skull is carried by the root joint).
  c.data.neck_std = 0.05
  c.data.eye_std = 0.05  # Eye rotation per axis, radians.
  c.data.pose_rotation_deg = 20.0  # Mesh A's head rotation, degrees, about a random axis.
  c.data.motion_rotation_deg = 30.0  # The skull motion from A to B, degrees.
  c.data.translation_std = 0.02  # Translation of A, and from A to B, metres per axis.
  c.data.noise_mm = 0.2  # Vertex noise, mm per coordinate.
  c.data.partial_probability = 0.3  # Chance that a mesh misses a patch of vertices.
  c.data.partial_radius = (0.01, 0.04)  # Radius of the missing patch, metres (uniform).
  c.data.block_size = 64  # Pairs rendered per head-model call (cached for the reader).
  c.data.eval_pairs = 512  # Held-out pairs evaluated.
  c.data.eval_seed = 0  # Seed of the held-out stream (never shares a pair with training).
  c.data.eval_batch_size = 128  # Held-out pairs per evaluation batch.

  c.model.update(SIZES[args.size])
  c.model.point_seed = 0  # Which vertices the stabiliser reads.

  c.total_steps = 2000
  c.batch_size = 32
  c.optim.optimizer = "adam"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.end_lr_factor = 0.01
  c.optim.clip_norm = 1.0  # The refinement steps start from earlier estimates: keep updates tame.
  c.log_every = 100
  c.eval_every = 0
  c.checkpoint.every = 1000
  if args.runlocal:
    c.total_steps = 20
    c.batch_size = 16
    c.data.block_size = 32
    c.data.eval_pairs = 64
    c.data.eval_batch_size = 64
    c.log_every = 10
    c.checkpoint.every = 0
  if args.steps:
    c.total_steps = args.steps
  return c
