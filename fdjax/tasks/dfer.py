"""Dynamic facial expression recognition (DFER): a face video clip in, one expression class out.

The task family of DFER-CLIP, FineCLIPER and the CLIP-based recognisers, on DFEW-, MAFW- and
FERV39k-layout data. It follows the task contract of `fdjax/tasks/__init__.py`:

- model (`config.model.kind`): `clip`, a `fdjax.models.temporal.VideoClassifier` (CLIP image
  encoder per frame, optionally with adapters or LoRA, then a temporal transformer head with a
  linear or a text-prompt classifier), `vivit`, a `fdjax.models.vivit.VideoVisionTransformer`
  trained from scratch, or `vit_mae`, a `fdjax.models.video_mae.VideoViTClassifier` (variant
  tiny/S/B/L, encoder fields overridable) whose encoder comes from a `mae_video` pretraining
  run named by `config.model.init_from` (checked against the run's encoder: `load_pretrained`),
  linear-probed (`stop_backbone_gradient` and the encoder frozen) or fine-tuned (with
  `config.optim.layer_decay`). The other keys of `config.model` are that module's fields;
  `clip_checkpoint` names a local Hugging Face CLIP directory to start from, `clip_workdir` a
  finished fdjax run of the same CLIP size whose towers to start from (`load_pretrained`);
- loss: softmax cross-entropy, optionally class-balanced (weights from the training split's
  class counts by the effective number of samples of Cui et al., CVPR 2019) and label-smoothed;
- evaluation: every clip of the evaluation split once (uniform frames, centre crop): UAR, WAR,
  recall per class, and the confusion matrix, both as numbers (`confusion_matrix`, rows true
  classes) and as a PNG (`<workdir>/confusion_matrix.png`, and one per step in
  `<workdir>/confusion/`);
- predict: `(params, video uint8 [b, T, H, W, 3]) -> {"probabilities", "logits"} [b, C]`.

Class descriptions for the text classifier come from `config.model.prompts` (one tuple of
prompts per class name). They are tokenised with `transformers.CLIPTokenizer` from
`config.model.clip_checkpoint` when one is given; otherwise with `builtin_tokenize`, a small
deterministic word-hashing tokenizer, so that runs on a randomly initialised CLIP need no
download. Its ids mean nothing to a pretrained text tower: with a checkpoint, its own tokenizer
is always used.

The action-unit task (`fdjax.tasks.au`) builds its model, batches and evaluation loop with the
functions here (`build_video_model`, `video_dummy_batch`, `eval_batches`, ...).

Config keys read (beyond the base config): `data.name`, `data.class_names`, `data.fold`,
`data.train_split`, `data.eval_split` (formatted with `fold`), `data.num_frames`,
`data.crop_fraction`, `data.augment.*`, `data.eval_batch_size`, `data.builder_config`,
`data.{raw_dir,data_dir,synthetic,skip_invalid}`, `data.train_examples_per_class` (up to
that many training clips per class, the same for every seed: `train_subset`), `model.*`,
`loss.label_smoothing`, `loss.class_balanced`, `loss.class_balance_beta`.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import pipeline, prepare, video
from fdjax import pretrained
from fdjax import sharding as sharding_lib
from fdjax import step as step_lib
from fdjax.metrics import classification
from fdjax.models import clip as clip_lib
from fdjax.models.temporal import VideoClassifier
from fdjax.models.video_mae import ENCODER_VARIANTS, VideoViTClassifier, video_vit_classifier
from fdjax.models.vivit import VIVIT_VARIANTS, VideoVisionTransformer, stem_flops, vivit_model
from fdjax.tasks import BATCH_DIM, ExportDim

MODEL_KINDS = ("clip", "vivit", "vit_mae")
# Encoder fields that must agree between a `mae_video` run and the `vit_mae` model it loads into.
MAE_ENCODER_CHECKED = (
  "image_size",
  "patch_size",
  "tubelet_size",
  "width",
  "depth",
  "num_heads",
  "mlp_dim",
  "subtract_mean_frame",
  "stem_widths",
)
# Keys of `config.model` that configure the task rather than the module's fields.
TASK_MODEL_KEYS = (
  "kind",
  "clip_checkpoint",
  "clip_workdir",
  "init_from",
  "prompts",
  "prompt_length",
)
# CLIP's special token ids (the built-in tokenizer keeps them, so the text tower pools alike).
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407


# ----------------------------------------------------------------------------------------------
# Model.


def _module_fields(config_model: Any) -> dict[str, Any]:
  fields = {k: v for k, v in dict(config_model).items() if k not in TASK_MODEL_KEYS}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def builtin_tokenize(
  texts: Sequence[str],
  length: int,
  *,
  vocab_size: int = CLIP_VOCAB_SIZE,
  bos: int = CLIP_BOS,
  eos: int = CLIP_EOS,
) -> np.ndarray:
  """Token ids [N, length] of `texts` by hashing lower-cased words (no vocabulary file).

  Each word, number or punctuation mark becomes `crc32(word) % bos` (ids below CLIP's special
  tokens); a sequence is `[bos, *words, eos]`, cut to `length` and padded with `eos`, as CLIP
  pads. Deterministic across processes and machines. Only for text towers trained from their
  random initialisation: a pretrained tower needs its own tokenizer.
  """
  if length < 2:
    raise ValueError(f"prompt length {length} cannot hold the start and end tokens")
  if vocab_size <= eos or bos >= eos:
    raise ValueError(f"special ids bos={bos}, eos={eos} must lie inside vocab_size={vocab_size}")
  ids = np.full((len(texts), length), eos, np.int32)
  for row, text in enumerate(texts):
    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())
    tokens = [bos, *(zlib.crc32(w.encode()) % bos for w in words)][: length - 1] + [eos]
    ids[row, : len(tokens)] = tokens
  return ids


@functools.lru_cache(maxsize=16)
def _tokenize(texts: tuple[str, ...], checkpoint: str, length: int) -> np.ndarray:
  if not checkpoint:
    return builtin_tokenize(texts, length)
  import transformers

  try:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(checkpoint, local_files_only=True)
  except OSError as e:
    raise FileNotFoundError(
      f"config.model.clip_checkpoint={checkpoint!r}: no CLIP tokenizer files there "
      f"(vocab.json, merges.txt): {e}"
    ) from None
  encoded = tokenizer(
    list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
  )
  return np.asarray(encoded["input_ids"], np.int32)


def class_token_ids(config: Any, names: Sequence[str]) -> tuple:
  """Token ids [C, K, L] (nested tuples) of the prompts of each class in `names`.

  Every class needs the same number K of prompts in `config.model.prompts`.
  """
  prompts = config.model.prompts
  missing = [n for n in names if n not in prompts]
  if missing:
    raise ValueError(f"config.model.prompts has no prompts for {missing}")
  counts = {len(prompts[n]) for n in names}
  if len(counts) != 1 or 0 in counts:
    raise ValueError(
      "config.model.prompts must give every class the same (non-zero) number of prompts; got "
      + ", ".join(f"{n}: {len(prompts[n])}" for n in names)
    )
  texts = tuple(p for n in names for p in prompts[n])
  ids = _tokenize(texts, config.model.clip_checkpoint, config.model.prompt_length)
  ids = ids.reshape(len(names), counts.pop(), -1)
  return tuple(tuple(tuple(int(t) for t in prompt) for prompt in cls) for cls in ids)


def build_video_model(config: Any, num_outputs: int, output_names: Sequence[str]) -> nn.Module:
  """The video model of `config.model` with `num_outputs` logits (classes or action units)."""
  kind = config.model.kind
  if kind not in MODEL_KINDS:
    raise ValueError(f"config.model.kind={kind!r}: expected one of {MODEL_KINDS}")
  dtype = step_lib.resolve_compute_dtype(config.precision.compute_dtype)
  fields = _module_fields(config.model)
  fields["attention_impl"] = config.precision.attention_impl
  if kind == "vivit":
    variant = fields.pop("variant")
    if variant not in VIVIT_VARIANTS:
      raise ValueError(
        f"config.model.variant={variant!r}: expected one of {sorted(VIVIT_VARIANTS)}"
      )
    return vivit_model(variant, num_classes=num_outputs, dtype=dtype, **fields)
  if kind == "vit_mae":
    variant = fields.pop("variant")
    if variant not in ENCODER_VARIANTS:
      raise ValueError(
        f"config.model.variant={variant!r}: expected one of {sorted(ENCODER_VARIANTS)}"
      )
    return video_vit_classifier(variant, num_classes=num_outputs, dtype=dtype, **fields)
  clip_lib.clip_variant(fields["variant"])  # a clear error for an unknown name
  if fields.get("classifier") == "text":
    fields["class_token_ids"] = class_token_ids(config, output_names)
  return VideoClassifier(num_classes=num_outputs, dtype=dtype, **fields)


def image_size(model: nn.Module) -> int:
  """The frame side in pixels that `model` takes."""
  if isinstance(model, (VideoVisionTransformer, VideoViTClassifier)):
    return model.image_size
  return clip_lib.clip_variant(model.variant)["vision"]["image_size"]


def build_model(config: Any) -> nn.Module:
  names = tuple(config.data.class_names)
  return build_video_model(config, len(names), names)


def init_fn(model: nn.Module, rngs: dict, batch: dict) -> dict:
  """The video models take the `video` array, not the batch dict."""
  return model.init(rngs, batch["video"])


def video_dummy_batch(config: Any, batch_size: int, model: nn.Module) -> dict[str, np.ndarray]:
  size = image_size(model)
  frames = config.data.num_frames
  return {"video": np.zeros((batch_size, frames, size, size, 3), np.uint8)}  # [B, T, H, W, 3]


def dummy_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  batch = video_dummy_batch(config, batch_size, build_model(config))
  batch["label"] = np.zeros((batch_size,), np.int32)  # [B]
  return batch


# Parameters that keep their fresh initialisation when CLIP towers are loaded under them.
PEFT_PARAMS = "lora|adapter"


def pretrained_specs(config: Any) -> list[pretrained.InitFrom]:
  """The CLIP towers `config.model.clip_checkpoint` or `config.model.clip_workdir` load, as
  `fdjax.pretrained` specs: the image tower always, the text tower when the classifier uses it.
  """
  if config.model.kind != "clip":
    return []
  checkpoint, workdir = config.model.clip_checkpoint, config.model.clip_workdir
  if checkpoint and workdir:
    raise ValueError("set config.model.clip_checkpoint or config.model.clip_workdir, not both")
  if workdir:
    _check_clip_run(workdir)
  source = checkpoint or workdir
  if not source:
    return []
  towers = ("vision", "text") if config.model.classifier == "text" else ("vision",)
  return [pretrained.InitFrom(source, tower, tower) for tower in towers]


def _check_clip_run(workdir: str) -> None:
  """A clear error for a `clip_workdir` that is not a run of a CLIP video model."""
  from fdjax import config as config_lib

  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path) and config_lib.load_json_config(path).model.get("kind") != "clip":
    raise ValueError(f"config.model.clip_workdir={workdir!r} is not a run of a CLIP video model")


def load_pretrained(config: Any, params: dict) -> dict:
  """CLIP towers from `config.model.clip_checkpoint` (a local Hugging Face directory) or from
  the latest checkpoint of the run in `config.model.clip_workdir` (`fdjax.pretrained`).

  The image tower always, the text tower when the classifier uses it; LoRA, adapters and the
  temporal head keep their fresh initialisation (the source's own LoRA and adapters are not
  taken). Shapes must agree: is config.model.variant the checkpoint's size?

  For `vit_mae` nothing is loaded here: `config.model.init_from` (merged by the trainer next)
  names the pretraining run, and this checks that run's encoder first (`check_mae_sources`).
  """
  if config.model.kind == "vit_mae":
    check_mae_sources(config)
    return params
  key = "clip_checkpoint" if config.model.get("clip_checkpoint") else "clip_workdir"
  return pretrained.merge_specs(
    params, pretrained_specs(config), where=f"config.model.{key}", keep_fresh=PEFT_PARAMS
  )


def check_mae_sources(config: Any) -> None:
  """A clear error for a `config.model.init_from` run of task `mae_video` whose encoder is not
  the `vit_mae` model's: the field (image size, patch, tubelet, width, depth, heads, MLP,
  `subtract_mean_frame`) that differs, with both values. An image size, a patch or an input
  (raw or mean-subtracted frames) that differs but keeps the shapes would otherwise load
  silently into a model that tokenises the frames differently."""
  from fdjax.tasks import load_task, mae_video

  model = load_task(config.task).build_model(config)  # dfer's or au's: the outputs differ
  for spec in pretrained.parse_spec(config.model.get("init_from", "")):
    source = pretrained.run_config(spec.source)
    if source is None or source.get("task") != "mae_video":
      continue
    encoder = mae_video.build_model(source).encoder
    for field in MAE_ENCODER_CHECKED:
      theirs, ours = getattr(encoder, field), getattr(model.encoder, field)
      if theirs != ours:
        raise ValueError(
          f"config.model.init_from={spec.source!r}: the mae_video run's encoder has "
          f"{field}={theirs} but config.model (variant {config.model.variant!r}) has "
          f"{field}={ours}; set config.model.variant or config.model.{field} to match the run"
        )


def parameter_counts(config: Any) -> tuple[int, int]:
  """(trainable, total) parameters of `config`'s model under `config.optim.freeze`.

  Shapes only (`jax.eval_shape`): nothing is allocated, so B/16 counts on any machine.
  """
  from fdjax import optim as optim_lib
  from fdjax.tasks import load_task

  task = load_task(config.task)
  model = task.build_model(config)
  batch = task.dummy_batch(config, 1)
  variables = jax.eval_shape(lambda b: task.init_fn(model, {"params": jax.random.key(0)}, b), batch)
  return optim_lib.count_params(variables["params"], config.optim.freeze)


# ----------------------------------------------------------------------------------------------
# FLOPs.


def _transformer_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> float:
  """Forward FLOPs of `depth` pre-norm blocks over `tokens` tokens (matmuls, 2 per multiply-add):
  q/k/v/out projections, attention scores and mixing, the two MLP layers."""
  per_block = 2 * tokens * 4 * width * width + 4 * tokens * tokens * width
  per_block += 4 * tokens * width * mlp_dim
  return float(depth * per_block)


def forward_flops(config: Any, model: nn.Module) -> tuple[float, float]:
  """(backbone, head) forward FLOPs of one clip of `config.data.num_frames` frames."""
  frames = config.data.num_frames
  if isinstance(model, VideoVisionTransformer):
    steps = frames // model.tubelet_size
    patches = (model.image_size // model.patch_size) ** 2
    reduction = 2 ** len(model.stem_widths)
    cells = model.patch_size // reduction  # feature-map cells per token side
    channels = model.stem_widths[-1] if model.stem_widths else 3
    embed = 2 * steps * patches * model.width * channels * model.tubelet_size * cells**2
    embed += stem_flops(model.stem_widths, model.image_size, frames)
    spatial = steps * _transformer_flops(
      patches + 1, model.width, model.mlp_dim, model.spatial_depth
    )
    temporal = _transformer_flops(steps + 1, model.width, model.mlp_dim, model.temporal_depth)
    return float(embed + spatial + temporal), 2.0 * model.width * model.num_classes
  if isinstance(model, VideoViTClassifier):
    enc = model.encoder
    steps, side, _ = enc.grid(frames)
    tokens = steps * side * side
    cells = enc.patch_size // 2 ** len(enc.stem_widths)  # feature-map cells per token side
    channels = enc.stem_widths[-1] if enc.stem_widths else 3
    embed = 2 * tokens * enc.width * channels * enc.tubelet_size * cells**2
    embed += stem_flops(enc.stem_widths, enc.image_size, frames)
    encoder = embed + _transformer_flops(tokens, enc.width, enc.mlp_dim, enc.depth)
    return float(encoder), 2.0 * enc.width * model.num_classes
  towers = clip_lib.clip_variant(model.variant)
  vision = towers["vision"]
  patches = (vision["image_size"] // vision["patch_size"]) ** 2
  width = vision["width"]
  per_frame = 2 * patches * width * 3 * vision["patch_size"] ** 2
  per_frame += _transformer_flops(patches + 1, width, vision["mlp_dim"], vision["depth"])
  per_frame += 2 * width * vision["projection_dim"]
  if model.adapter_dim:
    per_frame += vision["depth"] * 2 * (patches + 1) * 2 * 2 * width * model.adapter_dim
  if model.lora_rank:
    targets = [t for t in model.lora_targets if t in ("q_proj", "k_proj", "v_proj", "out_proj")]
    per_frame += vision["depth"] * len(targets) * 2 * (patches + 1) * 2 * width * model.lora_rank
  head_tokens = frames + (1 if model.pooling == "cls" else 0)
  head = 2 * frames * vision["projection_dim"] * model.head_width
  head += _transformer_flops(head_tokens, model.head_width, model.head_mlp_dim, model.head_depth)
  head += 2 * model.head_width * model.num_classes
  return float(frames * per_frame), float(head)


def flops_per_example(config: Any) -> float:
  """Training FLOPs of one clip, counted analytically (documented for MFU).

  Forward FLOPs count the multiply-adds (2 FLOPs each) of the patch embedding, every
  transformer block (q/k/v/out projections, attention scores and mixing, MLP), adapters and
  LoRA updates, the projection, and the temporal head; norms, activations and softmax are left
  out, as usual for MFU. Training counts 3x forward (the backward pass costs about twice the
  forward) for every part the gradient flows through; with `stop_backbone_gradient` the image
  tower runs forward only (1x). The text tower of the text classifier runs once per step on
  the C x K prompts, a cost shared by the batch, and is left out.
  """
  model = build_model(config)
  backbone, head = forward_flops(config, model)
  backbone_factor = 1.0 if getattr(model, "stop_backbone_gradient", False) else 3.0
  return backbone_factor * backbone + 3.0 * head


# ----------------------------------------------------------------------------------------------
# Data.


def split_name(config: Any, which: str) -> str:
  """The TFDS split of `which` ("train" or "eval"), with `data.fold` filled in."""
  template = config.data.train_split if which == "train" else config.data.eval_split
  return template.format(fold=config.data.fold)


def open_split(config: Any, split: str):
  """A random-access source over `split`, after building the dataset if it is not built yet."""
  _, data_dir = prepare.ensure_dataset(config.data)
  # Importing the builder registers it with TFDS, which `tfds.data_source` looks names up in.
  importlib.import_module(f"data_pipelines.builders.{config.data.name}")
  name = config.data.name
  if config.data.builder_config:
    name = f"{name}/{config.data.builder_config}"
  return pipeline.tfds_source(name, data_dir, split)


def video_train_data(
  config: Any, model: nn.Module, *, process_index: int, process_count: int, source=None
):
  """The endless stream of training clips (random segments, crops, flips and colour jitter)
  of `source` (default: the whole training split)."""
  if source is None:
    source = open_split(config, split_name(config, "train"))
  augment = dict(config.data.augment)
  for key in ("scale", "ratio"):
    augment[key] = tuple(augment[key])
  transform = video.make_train_transform(
    num_frames=config.data.num_frames, image_size=image_size(model), **augment
  )
  return pipeline.train_dataset(
    source,
    transform,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    shuffle=config.data.shuffle,
  )


# Seed of the fixed order in which `train_subset` takes each class's clips: the same clips for
# every `config.seed`, so runs that differ in seed or initialisation see the same labels.
SUBSET_SEED = 0


class IndexedSource(Sequence):
  """The examples `indices` of a random-access `source`, in that order."""

  def __init__(self, source: Sequence, indices: Sequence[int]):
    self._source = source
    self._indices = [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i]]


def subset_size(config: Any, key: str, meaning: str) -> int:
  """`config.data.<key>` (absent: 0), checked: a whole number >= 0; `meaning` says what it
  counts in the error."""
  k = config.data.get(key, 0)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"data.{key}={k!r}: expected a whole number >= 0 ({meaning})")
  return int(k)


def examples_per_class(config: Any) -> int:
  """`config.data.train_examples_per_class`, checked: a whole number >= 0 (0: every clip)."""
  return subset_size(
    config,
    "train_examples_per_class",
    "clips kept per class from the training split; 0 keeps every clip",
  )


def train_subset(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
  """Ascending indices of up to `per_class` clips of each class of `labels` [N]: the first ones
  of the class in a fixed random order (`SUBSET_SEED`); a class with fewer keeps all of its
  clips. Each class's kept clips are a prefix of that order, so a smaller subset lies inside a
  larger one."""
  labels = np.asarray(labels, np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
  order = np.random.default_rng(SUBSET_SEED).permutation(len(labels))
  kept = []
  for c in range(num_classes):
    kept.extend(order[labels[order] == c][:per_class].tolist())
  return np.sort(np.asarray(kept, np.int64))


def _read_labels(config: Any, split: str) -> np.ndarray:
  """Labels [N] of every clip of `split`, in its order (reads the split)."""
  source = open_split(config, split)
  return np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)


def train_labels(config: Any) -> np.ndarray:
  """Labels [N] of the whole training split, in its order (cached in the workdir)."""
  split = split_name(config, "train")

  def compute() -> dict:
    return {"labels": _read_labels(config, split).tolist()}

  stats = cached_label_stats(config, f"{split}_labels", compute)
  return np.asarray(stats["labels"], np.int64)


def train_indices(config: Any) -> np.ndarray | None:
  """Indices of the training clips kept by `data.train_examples_per_class`; None: all."""
  per_class = examples_per_class(config)
  if not per_class:
    return None
  return train_subset(train_labels(config), per_class, len(config.data.class_names))


def train_source(config: Any):
  """The training split, restricted to `data.train_examples_per_class` clips per class."""
  source = open_split(config, split_name(config, "train"))
  indices = train_indices(config)
  if indices is None:
    return source
  if jax.process_index() == 0:
    print(
      f"data.train_examples_per_class={examples_per_class(config)}: training on "
      f"{len(indices)} of the {len(source)} clips of {split_name(config, 'train')}",
      flush=True,
    )
  return IndexedSource(source, indices)


def train_data(config: Any, *, process_index: int, process_count: int):
  return video_train_data(
    config,
    build_model(config),
    process_index=process_index,
    process_count=process_count,
    source=train_source(config),
  )


def eval_batches(
  config: Any, model: nn.Module, split: str, multiple_of: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `split` once (uniform frames, centre crop), in batches of one fixed size.

  The last batch is padded with zeros up to the size (a multiple of `multiple_of`, the
  data-parallel size), and `mask` [B] marks the real examples, so one compiled program serves
  every batch.
  """
  source = open_split(config, split)
  size = -(-config.data.eval_batch_size // multiple_of) * multiple_of
  transform = video.make_eval_transform(
    num_frames=config.data.num_frames,
    image_size=image_size(model),
    crop_fraction=config.data.crop_fraction,
  )
  for batch in pipeline.eval_dataset(source, transform, batch_size=size):
    count = len(batch["video"])
    padded = {
      k: np.concatenate([v, np.zeros((size - count, *v.shape[1:]), v.dtype)])
      for k, v in batch.items()
    }
    padded["mask"] = np.arange(size) < count
    yield padded


@functools.lru_cache(maxsize=8)
def _logits_fn(model: nn.Module, mesh: jax.sharding.Mesh):
  """Jitted `(params, video) -> logits` with the logits replicated on every device."""

  def logits(params, video):
    return model.apply({"params": params}, video)[0]

  return jax.jit(logits, out_shardings=NamedSharding(mesh, PartitionSpec()))


def predict_logits(model, params, batch_video: np.ndarray, mesh, rules) -> np.ndarray:
  """Logits [B, C] of a host batch that every process holds whole, computed batch-sharded."""
  sharding = sharding_lib.batch_sharding(mesh, rules)
  video = jax.make_array_from_callback(batch_video.shape, sharding, lambda i: batch_video[i])
  return np.asarray(jax.device_get(_logits_fn(model, mesh)(params, video)), np.float32)


# ----------------------------------------------------------------------------------------------
# Loss.


def _label_stats_path(config: Any, split: str) -> str | None:
  if not config.workdir:
    return None
  return os.path.join(config.workdir, f"label_stats_{split}.json")


def cached_label_stats(config: Any, split: str, compute) -> dict:
  """`compute()` (a JSON-able dict of label statistics of `split`), cached in the workdir.

  Reading a split's labels reads every example once; the cache keeps resumed runs and
  re-evaluations from doing it again.
  """
  path = _label_stats_path(config, split)
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  stats = compute()
  if path and jax.process_index() == 0:
    os.makedirs(config.workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(stats, f)
  return stats


def class_counts(config: Any) -> np.ndarray:
  """Training clips per class [C] (cached in the workdir), of the clips trained on."""
  split = split_name(config, "train")
  num_classes = len(config.data.class_names)

  indices = train_indices(config)
  if indices is not None:  # the clips of train_examples_per_class
    return np.bincount(train_labels(config)[indices], minlength=num_classes).astype(np.int64)

  def compute() -> dict:
    labels = _read_labels(config, split)
    return {"class_counts": np.bincount(labels, minlength=num_classes).tolist()}

  return np.asarray(cached_label_stats(config, split, compute)["class_counts"], np.int64)


def class_balanced_weights(counts: np.ndarray, beta: float) -> np.ndarray:
  """Per-class loss weights [C] by the effective number of samples (Cui et al., CVPR 2019).

  `w_c = (1 - beta) / (1 - beta^n_c)`, normalised to mean 1 over classes; beta -> 1 tends to
  inverse frequency, beta = 0 gives equal weights. Classes with no example get weight 0.
  """
  counts = np.asarray(counts, np.float64)
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"config.loss.class_balance_beta={beta}: expected 0 <= beta < 1")
  with np.errstate(divide="ignore"):
    weights = np.where(counts > 0, (1.0 - beta) / (1.0 - beta**counts), 0.0)
  present = counts > 0
  weights[present] *= present.sum() / weights[present].sum()
  return weights.astype(np.float32)


def make_loss_fn(config: Any):
  """Cross-entropy with `config.loss.label_smoothing`, class-balanced if configured."""
  weights = None
  if config.loss.class_balanced:
    weights = jnp.asarray(
      class_balanced_weights(class_counts(config), config.loss.class_balance_beta)
    )
  return functools.partial(
    _loss,
    num_classes=len(config.data.class_names),
    label_smoothing=config.loss.label_smoothing,
    class_weights=weights,
  )


def _loss(model, params, batch, rng, train, *, num_classes, label_smoothing, class_weights):
  logits, _ = model.apply({"params": params}, batch["video"], train=train, rngs={"dropout": rng})
  labels = batch["label"]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  per_clip = optax.softmax_cross_entropy(logits, targets)  # [B]
  if class_weights is not None:
    per_clip = per_clip * class_weights[labels]
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return jnp.mean(per_clip), {"accuracy": accuracy}


# ----------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(config, model, params, *, mesh, rules, workdir: str, step: int) -> dict:
  """UAR, WAR, recall per class and the confusion matrix over `config.data.eval_split`.

  Every process evaluates the whole split (each batch sharded over the devices), so all report
  the same numbers.
  """
  names = list(config.data.class_names)
  accumulator = classification.ClassificationAccumulator(len(names), classes=range(len(names)))
  split = split_name(config, "eval")
  for batch in eval_batches(config, model, split, sharding_lib.data_parallel_size(mesh, rules)):
    logits = predict_logits(model, params, batch["video"], mesh, rules)
    accumulator.add(batch["label"], logits.argmax(-1), mask=batch["mask"])
  metrics: dict[str, Any] = dict(accumulator.compute())
  matrix = accumulator.confusion_matrix
  recall = classification.per_class_recall(matrix)
  metrics.update({f"recall/{name}": float(r) for name, r in zip(names, recall)})
  metrics["confusion_matrix"] = matrix.tolist()
  if jax.process_index() == 0 and workdir:
    path = os.path.join(workdir, "confusion", f"{split}_step{step:07d}.png")
    title = f"{config.data.name} {split}, step {step}: UAR {metrics['uar']:.3f}"
    classification.save_confusion_png(matrix, names, path, title=title)
    shutil.copyfile(path, os.path.join(workdir, "confusion_matrix.png"))
    _print_confusion(matrix, names, split, step, metrics)
  return metrics


def _print_confusion(matrix: np.ndarray, names: list[str], split: str, step: int, metrics) -> None:
  width = max(6, *(len(n) for n in names))
  print(
    f"\n{split} split, step {step}: {metrics['num_examples']} clips, UAR {metrics['uar']:.4f}, "
    f"WAR {metrics['war']:.4f} (rows: true class, columns: predicted)"
  )
  print(" " * (width + 1) + " ".join(f"{n[:width]:>{width}}" for n in names))
  for name, row in zip(names, matrix):
    print(f"{name:>{width}} " + " ".join(f"{int(v):>{width}d}" for v in row))
  print(flush=True)


# ----------------------------------------------------------------------------------------------
# Export.


def predict_fn(config: Any, model: nn.Module):
  """`predict(params, video uint8 [b, T, H, W, 3]) -> {"probabilities", "logits"}` [b, C].

  T is the trained `config.data.num_frames`: the temporal positions were learned for it.
  """
  size = image_size(model)

  def predict(params, video):
    logits = model.apply({"params": params}, video)[0]
    return {"probabilities": jax.nn.softmax(logits, axis=-1), "logits": logits}

  return predict, {"video": (f"b, {config.data.num_frames}, {size}, {size}, 3", "uint8")}


def export_dims(config: Any) -> list[ExportDim]:
  """`b` by `--batch`; the frames and the image size are the trained ones."""
  return [BATCH_DIM]


def export_metadata(config: Any) -> dict:
  model = build_model(config)
  return {
    "dataset": config.data.name,
    "class_names": list(config.data.class_names),
    "num_frames": config.data.num_frames,
    "image_size": image_size(model),
    "video": (
      "RGB uint8 frames [b, num_frames, image_size, image_size, 3]: num_frames uniformly spaced "
      "frames of the clip, each the centred face crop resized to image_size"
    ),
  }


# ----------------------------------------------------------------------------------------------
# Explain (`fdjax explain`); the AU task shares these with its own scores.


def explain_clip(config: Any, model: nn.Module, params: Any, split: str, index: int) -> dict:
  """Clip `index` of `split` ("test"/"eval", "train" or a TFDS split name) through the
  evaluation transform, and the model's logits on it: `{"split", "frames" [T, H, W, 3] uint8,
  "example" (the transformed example), "logits" [K]}`."""
  which = {"test": "eval", "eval": "eval", "train": "train"}.get(split)
  split = split_name(config, which) if which else split
  source = open_split(config, split)
  if not 0 <= index < len(source):
    raise IndexError(f"--index {index}: split {split!r} has {len(source)} examples")
  example = video.eval_transform(
    source[index],
    num_frames=config.data.num_frames,
    image_size=image_size(model),
    crop_fraction=config.data.crop_fraction,
  )
  clip = example["video"]  # [T, H, W, 3] uint8
  logits = jax.jit(lambda p, v: model.apply({"params": p}, v)[0])(params, clip[None])
  return {"split": split, "frames": clip, "example": example, "logits": np.asarray(logits)[0]}


def explain_example(config: Any, model: nn.Module, params: Any, *, split: str, index: int) -> dict:
  """The clip with its class probabilities (softmax) and its labelled expression."""
  found = explain_clip(config, model, params, split, index)
  logits, names = found["logits"], list(config.data.class_names)
  probabilities = np.exp(logits - logits.max())
  probabilities /= probabilities.sum()
  return {
    **found,
    "class_names": names,
    "probabilities": probabilities,
    "predicted": int(np.argmax(logits)),
    "truth": names[int(found["example"]["label"])],
  }


def saliency_fn(
  config: Any, model: nn.Module, params: Any, example: dict, *, method: str, target: int
) -> dict:
  """`gradxinput` (of logit `target`) or `rollout` (of the embedding) over the clip's frames;
  see `fdjax.explain`."""
  from fdjax import explain

  if method == "gradxinput":
    return {
      "saliency": explain.gradient_x_input(model, params, example["frames"], target),
      "what": f"gradient x input of {example['class_names'][target]}",
      "target": target,
    }
  if method == "rollout":
    if isinstance(model, VideoViTClassifier):
      raise ValueError(
        "--method rollout needs a class token to roll attention out from, and the vit_mae "
        "model mean-pools its tokens; use --method gradxinput"
      )
    saliency = explain.attention_rollout(model, params, example["frames"])
    return {"saliency": saliency, "what": "attention rollout", "target": None}
  raise ValueError(f"--method {method!r}: expected one of {explain.METHODS}")
