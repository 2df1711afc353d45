# fdjax: the two Quickstart commands and a few conveniences.
#   make demo   create .venv if needed, install fdjax, run the main job
#   make test   create .venv if needed, install the test extra (and the system packages some
#               tests need, e.g. SLURM, when run as root or with sudo), run the test suite

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_WORKDIR ?= runs/demo
# Test processes (pytest-xdist; one test file per process at a time): most tests are bound by
# XLA compilation, which is single-threaded, so two workers use a 2-core machine.
TEST_WORKERS ?= 2

.PHONY: demo test lint system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# torch is pinned to the CPU build the test machines carry; the test extra pins the same.
$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# PyTorch references of the video and sync metrics (tests/metrics). Their declared torchvision
	# cannot load beside the CPU-only torch, and the parts the tests run need only torch, so they
	# are installed without their dependencies.
	$(BIN)/python -m pip install -q --no-deps pytorch-fid==0.3.0 torch-fidelity==0.4.0 cd-fvd==0.1.1 syncnet-python==0.2.3
	touch $@ $(VENV)/.installed

system-deps:
	@if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	  bash .ci/install_slurm.sh; \
	else \
	  echo "make: cannot install SLURM here (no apt-get or root); its test will skip"; \
	fi

# The main job: train the VOCASET-layout FaceFormer (tiny encoder) on the synthetic twin (built
# on first use), evaluate on its test split (the table: model vs both baselines), export the
# predict function, and render one test sequence with its audio.
DEMO_CONFIG ?= experiments/audio2mesh/vocaset.py:variant=faceformer,encoder=tiny
demo: $(VENV)/.installed
	$(BIN)/fdjax train --config $(DEMO_CONFIG) --workdir $(DEMO_WORKDIR)
	$(BIN)/fdjax export --workdir $(DEMO_WORKDIR) --out $(DEMO_WORKDIR)/export
	$(BIN)/fdjax render --vertices $(DEMO_WORKDIR)/samples/sample_pred.npy \
	  --truth $(DEMO_WORKDIR)/samples/sample_truth.npy --faces $(DEMO_WORKDIR)/samples/faces.ply \
	  --audio $(DEMO_WORKDIR)/samples/sample.wav --out $(DEMO_WORKDIR)/samples/sample.mp4

test: $(VENV)/.installed-test system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

lint: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check fdjax data_pipelines launch experiments tests benchmarks

clean:
	rm -rf $(VENV) runs
