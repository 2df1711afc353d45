#!/usr/bin/env bash
# Every GPU step benchmark in one run, bf16, then one MFU line per measurement.
#
#   bash benchmarks/gpu_suite.sh [OUT.jsonl]             # on one H100/H200: under 8 minutes
#   bash benchmarks/gpu_suite.sh --dry-run [OUT.jsonl]   # the same commands, tiny, on any backend
#
# Runs, with random weights and synthetic batches already on the device (see each script's
# docstring for what is timed):
#   1. audio2mesh_step.py: wav2vec2-base + FaceFormer, 32 one-second windows per step;
#   2. audio2mesh_step.py: the reference's configuration, batch 1, whole sequences of 60, 300 and
#      600 frames, teacher-forced and autoregressive;
#   3. video_step.py: CLIP ViT-B/16 + adapters over 16 frames, 32 clips per step;
#   4. mae_step.py: ViT-B VideoMAE pretraining, 16 frames of 224 px at 90% tube masking, 32 clips.
# The JSON lines go to OUT.jsonl (default runs/gpu_suite/<date>.jsonl); the summary prints
# "MFU <benchmark> <what>: <mfu> (<step> s)" per line, "n/a" where the backend has no known peak
# (CPU). --dry-run shrinks every run (tiny encoder and CLIP, one step, short sequences) so that
# CI checks the script end to end on a CPU. PYTHON selects the interpreter (default python3).
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/runs/gpu_suite/$(date -u +%Y%m%dT%H%M%S).jsonl}"
mkdir -p "$(dirname "$out")"
: > "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
bf16="--override=--config.precision.compute_dtype=bfloat16"

run() {
  echo "+ $*" >&2
  "$python" "$@" | grep '^{' >> "$out"
}

if [ "$dry_run" = 1 ]; then
  run "$root/benchmarks/audio2mesh_step.py" --small --frameworks jax --batch_size 2 --steps 1 \
    --warmup 0 "$bf16"
  run "$root/benchmarks/audio2mesh_step.py" --small --frameworks jax --batch_size 1 --frames 8 \
    --steps 1 --warmup 0 --training autoregressive "$bf16"
  run "$root/benchmarks/video_step.py" --sizes tiny --batch 2 --steps 1 --warmup 0 \
    --compute_dtype bfloat16
  run "$root/benchmarks/mae_step.py" --sizes tiny --batch 2 --steps 1 --warmup 0 \
    --compute_dtype bfloat16
else
  run "$root/benchmarks/audio2mesh_step.py" --frameworks jax --batch_size 32 --steps 10 \
    --warmup 2 "$bf16"
  for training in teacher_forcing autoregressive; do
    run "$root/benchmarks/audio2mesh_step.py" --frameworks jax --batch_size 1 \
      --frames 60,300,600 --steps 10 --warmup 2 --training "$training" "$bf16"
  done
  run "$root/benchmarks/video_step.py" --sizes base --batch 32 --steps 10 --warmup 2 \
    --compute_dtype bfloat16
  run "$root/benchmarks/mae_step.py" --sizes B --batch 32 --steps 10 --warmup 2 \
    --compute_dtype bfloat16
fi

"$python" - "$out" <<'PY'
import json, sys

for line in open(sys.argv[1]):
  d = json.loads(line)
  if d["benchmark"] == "audio2mesh_step":
    what = f"{d['encoder']} {d['training']} batch {d['batch_size']} x {d['window_frames']} frames"
  else:
    what = f"{d['model']} batch {d['batch']} x {d['frames']} frames"
  mfu = "n/a" if d.get("mfu") is None else f"{100 * d['mfu']:.1f}%"
  print(f"MFU {d['benchmark']} {what} [{d.get('compute_dtype')}]: {mfu} ({d['step_time_s']:.4f} s)")
PY
echo "results: $out" >&2
