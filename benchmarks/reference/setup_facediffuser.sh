#!/usr/bin/env bash
# The reference FaceDiffuser's own code and the virtualenv it runs in, for
# benchmarks/diffusion_sampling.py --frameworks reference.
#
#   bash benchmarks/reference/setup_facediffuser.sh                  # clone from GitHub
#   FACEDIFFUSER_GIT=/path/to/FaceDiffuser.git bash benchmarks/reference/setup_facediffuser.sh
#   VENV=/work/venvs/facediffuser bash benchmarks/reference/setup_facediffuser.sh
#
# Makes benchmarks/reference/FaceDiffuser (the reference's files at commit FACEDIFFUSER_COMMIT:
# models.py, its vendored HuBERT (hubert/), its diffusion package (diffusion/), LICENSE,
# README.md; its data and demo files are not needed) and the virtualenv VENV (default
# benchmarks/reference/.venv-facediffuser). The reference pins transformers==4.7.0 (its vendored
# HuBERT imports transformers.deepspeed and transformers.utils.versions from that release) with
# torch 1.10.1, which has no Python 3.11 build: torch 2.13.0 (CPU) runs it instead. transformers
# 4.7.0 is installed without its declared dependencies (tokenizers 0.10 has no Python 3.11 wheel
# and the speech model does not use it), then those the vendored HuBERT imports, with
# huggingface_hub at the 0.0.8 its requirements.txt pins. Both directories are ignored by git.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="${FACEDIFFUSER_SOURCE:-$here/FaceDiffuser}"
venv="${VENV:-$here/.venv-facediffuser}"
commit="${FACEDIFFUSER_COMMIT:-e15f3500fdae0eda962f5d018488dfa0a1a9d552}"
python="${PYTHON:-python3}"

if [ ! -f "$src/models.py" ]; then
  rm -rf "$src"
  git clone -q --no-checkout "${FACEDIFFUSER_GIT:-https://github.com/uuembodiedsocialai/FaceDiffuser}" "$src"
  git -C "$src" checkout -q "$commit" -- models.py diffusion hubert LICENSE README.md
fi
echo "reference source: $src at $(git -C "$src" rev-parse HEAD)"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q torch==2.13.0 numpy
"$venv/bin/python" -m pip install -q --no-deps transformers==4.7.0
"$venv/bin/python" -m pip install -q huggingface_hub==0.0.8 filelock regex packaging tqdm \
  requests sacremoses
"$venv/bin/python" -c "import torch, transformers; print('reference venv:', '$venv', \
'torch', torch.__version__, 'transformers', transformers.__version__)"
