# Newcomers need two commands: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup test demo benchmark lint format clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-torch.txt constraints.txt tools/install_detectron2.py tools/write_pth.py \
		tools/install_imagenet_weights.py
	$(PYTHON) -m venv $(VENV)
	@# No pip cache: torch's CUDA wheels are about 3 GB (6 GB installed), a CI machine once ran
	@# out of disk in this step, and a second copy in ~/.cache would only bring that closer.
	$(PY) -m pip install -q --disable-pip-version-check --no-cache-dir -r requirements-torch.txt -c constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-cache-dir -r requirements.txt -c constraints.txt
	$(PY) tools/install_detectron2.py
	@# torchvision's MobileNetV2 ImageNet file into its cache, sha256-checked (configs/bccd).
	$(PY) tools/install_imagenet_weights.py
	@# Put projects/ on the path and load kd.compat's import hook for every interpreter of .venv
	@# (by file, so that interpreter start does not import torch), so that a plain
	@# `import detectron2` works without the compiled extension.
	$(PY) tools/write_pth.py "$(CURDIR)/projects"
	$(PY) -c "import detectron2.layers, kd; print('environment ready')"
	touch $@

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

# Every method against its baseline over 3 seeds (hours on a CPU; resumable).
benchmark: setup
	$(PY) tools/benchmark_table.py $(BENCHMARK_ARGS)

lint: setup
	$(PY) -m flake8 projects tools tests train_net.py datasets
	$(PY) -m isort --check-only projects tools tests train_net.py datasets
	$(PY) -m black --check projects tools tests train_net.py datasets

format: setup
	$(PY) -m isort projects tools tests train_net.py datasets
	$(PY) -m black projects tools tests train_net.py datasets

clean:
	rm -rf $(VENV) output
