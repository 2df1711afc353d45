#!/usr/bin/env bash
# The reference FaceFormer's own code and the virtualenv it runs in, for
# benchmarks/audio2mesh_step.py --frameworks reference.
#
#   bash benchmarks/reference/setup_faceformer.sh                 # clone from GitHub
#   FACEFORMER_GIT=/path/to/FaceFormer.git bash benchmarks/reference/setup_faceformer.sh
#
# Makes benchmarks/reference/FaceFormer (the reference's files faceformer.py, wav2vec.py,
# main.py, LICENSE, README.md at the cloned commit; its data files are not needed) and
# benchmarks/reference/.venv-faceformer: the reference pins transformers==4.6.1 (its wav2vec
# subclass follows that version's Wav2Vec2Model), with torch 2.13.0 (CPU) in place of its
# torch 1.9.0, which has no Python 3.11 build. transformers 4.6.1 is installed without its
# declared dependencies, then the ones its Wav2Vec2Model imports: tokenizers 0.10 has no Python
# 3.11 wheel and the speech model does not use it; huggingface_hub is pinned to the 0.0.8 the
# release was made against. Both directories are ignored by git.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/FaceFormer"
venv="$here/.venv-faceformer"
python="${PYTHON:-python3}"

if [ ! -f "$src/faceformer.py" ]; then
  rm -rf "$src"
  git clone -q --no-checkout "${FACEFORMER_GIT:-https://github.com/EvelynFan/FaceFormer}" "$src"
  git -C "$src" checkout -q HEAD -- faceformer.py wav2vec.py main.py LICENSE README.md
fi
echo "reference source: $src at $(git -C "$src" rev-parse HEAD)"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0 numpy
"$venv/bin/python" -m pip install -q --no-deps transformers==4.6.1
"$venv/bin/python" -m pip install -q huggingface_hub==0.0.8 filelock regex packaging tqdm \
  requests sacremoses
"$venv/bin/python" -c "import torch, transformers; print('reference venv:', '$venv', \
'torch', torch.__version__, 'transformers', transformers.__version__)"
