# skipdecode: thin targets over the `skipdecode` CLI. Run `make install` once on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SD := $(VENV)/bin/skipdecode
# The embedded default model: OPT architecture, trained by this project (models/tiny-opt-kjv/MODEL_CARD.md).
DEFAULT_MODEL := models/tiny-opt-kjv/skip-tuned
MODEL ?= $(DEFAULT_MODEL)
OUT ?= engines/$(if $(filter $(DEFAULT_MODEL),$(MODEL)),tiny-opt-kjv,$(notdir $(MODEL)))
PROMPT ?= And God said unto Moses,

EXPORT_SPEEDUPS ?= 2,3,5

.PHONY: install install-ray install-peers test test-unit test-integration test-system lint demo export memory clean

# Extras per job. `make install` sets up the main job only: export (torch CPU, transformers, onnx), generate, demo,
# serve. The targets that need more install it on first use, once: a stamp file per set under .venv/, redone when
# pyproject.toml changes. So `make install && make demo` and `make test` still do all the set-up themselves.
MAIN_EXTRAS := export,serve
EXTRAS_test := $(MAIN_EXTRAS),dev,peers,ray,eval
EXTRAS_eval := $(MAIN_EXTRAS),eval
EXTRAS_lint := lint
EXTRAS_peers := $(MAIN_EXTRAS),peers
EXTRAS_ray := serve,ray

# Targets of later features (training, evaluation) live in mk/*.mk.
-include mk/*.mk

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Create .venv/ and install the package with the extras of the main job.
install: $(PY)
	$(PY) -m pip install --quiet -e '.[$(MAIN_EXTRAS)]'

$(VENV)/.extras-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS_$*)]'
	@touch $@

# Ray Serve scale-out (`skipdecode serve --ray`, docs/scale-out.md); CTranslate2 benchmark peers (docs/benchmarks.md).
install-ray: $(VENV)/.extras-ray
install-peers: $(VENV)/.extras-peers

# Run the test suite (tiny OPT models built in-process; no downloads). First run: installs the dev (pytest, the
# openai client, lm-eval, ...), peers and ray extras the tests exercise.
test: $(VENV)/.extras-test
	$(PY) -m pytest -q

# One tier of the suite (tests/conftest.py): unit (~1 min: logic on fakes), integration (exported tiny engines),
# system (servers, subprocesses, Ray, torchrun).
test-unit test-integration test-system: $(VENV)/.extras-test
	$(PY) -m pytest -q -m $(@:test-%=%)

# Static checks (installs ruff on first use).
lint: $(VENV)/.extras-lint
	$(VENV)/bin/ruff check .

# Export MODEL (local dir, hub id or short name like opt-1.3b) to engines/<name>/ with buckets for EXPORT_SPEEDUPS;
# BACKEND=tensorrt also builds TensorRT plans (GPU machines, see docs/GPU.md).
export:
	$(SD) export --model $(MODEL) --out $(OUT) --speedups $(EXPORT_SPEEDUPS) $(if $(BACKEND),--backend $(BACKEND)) --force

# Resident memory of an engine: all bucket graphs vs one copy of the weights.
memory:
	$(SD) memory --engine $(OUT)

# Main job: export the embedded model, then, in one warm process, generate the prompt at full depth, with SkipDecode
# at 2x and 3x and in lossless mode, in interleaved rounds: a table of layers per token (vs the L/S target), decode
# tokens/s and speedup over full depth, then the texts.
demo: export
	$(SD) demo --engine $(OUT) --prompt "$(PROMPT)" --max-new-tokens 64

# Remove build outputs (keeps .venv).
clean:
	rm -rf demo engines/*/ .pytest_cache
