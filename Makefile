# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build from the registry.
TORCH := torch==2.13.0
DATA ?=
MODEL ?= poyo-mp-small

.PHONY: venv demo test lint bench clean pretrain packages

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[train,dev]"
	$(BIN)/pip install -q --no-deps nlb-tools==0.0.4  # test-only; see pyproject dev
	# falcon-challenge's evaluator, without dandi and its ~70 packages (pyproject dev)
	$(BIN)/pip install -q --no-deps falcon-challenge==1.0.2
	# the page's browser test drives Debian's Chromium (no playwright browser download)
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -q && \
	  apt-get install -y -q chromium; } || echo "no chromium: tests/test_page.py will skip"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/bci-decoder demo --model $(MODEL) $(if $(DATA),--data $(DATA)) --out out/demo

test: $(STAMP)
	$(BIN)/ruff check bci_decoder tests benchmarks
	$(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check bci_decoder tests benchmarks
	$(BIN)/ruff format --check bci_decoder tests benchmarks

# The shipped model: see models/poyo-mp-small/README.md
pretrain: $(STAMP)
	$(BIN)/bci-decoder train --config configs/poyo-mp-small.yaml

# The packages the daemon serves (ONNX graphs, tables, package.json) of every model in
# models/: rerun after a model's weights change (the daemon refuses a stale package).
packages: $(STAMP)
	for m in models/*/; do $(BIN)/bci-decoder export --model $$m || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache
