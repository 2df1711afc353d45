"""Gaussian head avatar (GaussianAvatars style) on NeRSemble, or its synthetic twin.

On the twin (16 cameras at 128 px; written and built on first use):

    fdjax train --config experiments/avatar/nersemble.py --workdir runs/avatar
    fdjax render avatar --workdir runs/avatar --flame PARAMS.npz --camera CAM.json \\
        --out clip.mp4

On a subject exported by VHAP (the layout of data_pipelines/builders/nersemble.py), with the
FLAME model those parameters belong to:

    fdjax train --config experiments/avatar/nersemble.py:size=128 \\
        --config.data.raw_dir=/path/to/UNION10_074_... --config.data.data_dir=/path/to/built \\
        --config.model.flame_model=/path/to/flame2023.pkl --workdir runs/avatar_074

Arguments: runlocal (the tiny twin at 32 px and a few steps, for tests), steps (override
total_steps), size (image side the data has; 128 for the twin). Evaluation reports PSNR and
SSIM on the held-out camera (val) and the held-out sequence (test).
"""

from ml_collections import ConfigDict

from fdjax.config import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, steps=0, size=128)
  c = base_config()
  c.task = "gaussian_avatar"  # fdjax/tasks/gaussian_avatar.py

  c.data.name = "nersemble"  # data_pipelines/builders/nersemble.py
  c.data.synthetic = "tiny" if args.runlocal else "demo"  # Twin to write when no data is found.
  c.data.raw_dir = ""  # VHAP export (or twin) directory; "" = the twin's cache directory.
  c.data.data_dir = ""  # Built directory; "" = the twin's cache directory.
  c.data.skip_invalid = False  # Skip (and count) invalid frames instead of failing the build.
  c.data.image_size = 32 if args.runlocal else args.size  # Image side in pixels (square).
  c.data.background = 1.0  # Grey level behind the head (the twin's images are on white).
  c.data.eval_batch_size = 8  # Views rendered at once in evaluation.

  m = c.model
  m.flame_model = ""  # FLAME .pkl of the tracked parameters; "" = the twin's stand-in model.
  m.capacity = 12288  # Gaussian slots: one per triangle to start, the rest for densification.
  m.sh_degree = 0  # Colour spherical-harmonics degree (0: view-independent colour).
  m.init_opacity = 0.1  # Opacity of the initial Gaussians (GaussianAvatars: 0.1).
  m.init_scale = 0.5  # Initial scale in triangle units.
  m.tile_size = 8  # Rasteriser tile side in pixels.
  m.bucket_capacity = 512  # Gaussians composited per tile at most (overflow is logged).
  m.pair_capacity = 0  # (Gaussian, tile) pairs binned at most per view (0: 4 x capacity).
  m.chunk = 32  # Bucket slots composited at once.

  c.loss = ConfigDict()
  c.loss.ssim_weight = 0.2  # Weight of (1 - SSIM) against L1 (GaussianAvatars: 0.2).
  c.loss.position_weight = 0.01  # Weight of the local-position regulariser.
  c.loss.position_threshold = 1.0  # Local distance (triangle units) before it costs.
  c.loss.scale_weight = 1.0  # Weight of the local-scale regulariser.
  c.loss.scale_threshold = 0.6  # Local scale (triangle units) before it costs.

  c.densify = ConfigDict()
  c.densify.start = 100  # First update that densifies and prunes (1-based, as logged).
  c.densify.stop = 250  # Last such update.
  c.densify.every = 100  # Updates between them.
  c.densify.grad_threshold = 2e-4  # Mean screen-space gradient (NDC units) that densifies.
  c.densify.split_scale = 1.0  # Local scale above which a Gaussian splits (else it is cloned).
  c.densify.prune_opacity = 0.005  # Opacity below which a Gaussian is freed.
  c.densify.opacity_reset_every = 0  # Steps between opacity resets (0: none).

  c.optim.optimizer = "adam"
  c.optim.lr = 5e-3  # Local positions (triangle units), as GaussianAvatars.
  c.optim.schedule = "cosine"
  c.optim.end_lr_factor = 0.05
  groups = {
    "sh": 0.01,  # Colours (GaussianAvatars: 0.0025; fewer steps here).
    "opacity": 0.05,
    "scale": 0.017,
    "rotation": 0.001,
  }
  for name, lr in groups.items():
    c.optim.groups[name] = ConfigDict({"pattern": f"^{name}$", "lr": lr})

  c.total_steps = 300
  c.batch_size = 2  # Views per step.
  c.mesh.data = 1  # Views are batched on one device here; shard them with mesh.data > 1.
  c.mesh.fsdp = 1
  c.mesh.tensor = -1
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint.every = 100
  c.sweep_metric = "val_psnr"
  c.sweep_mode = "max"
  if args.runlocal:
    # 10k Gaussians on 32 px: small tiles with deep buckets.
    c.model.tile_size, c.model.bucket_capacity, c.model.chunk = 4, 1024, 64
    c.total_steps = 40
    c.densify.start, c.densify.stop, c.densify.every = 20, 20, 20
    c.log_every = 10
    c.checkpoint.every = 0
    c.data.eval_batch_size = 16
  if args.steps:
    c.total_steps = args.steps
  return c
