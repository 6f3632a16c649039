# skipdecode: thin targets over the `skipdecode` CLI. Run `make install` once on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SD := $(VENV)/bin/skipdecode
MODEL ?= demo/tiny-opt
OUT ?= engines/$(notdir $(MODEL))
PROMPT_IDS ?= 2 10 20 30

EXPORT_SPEEDUPS ?= 2,3,5

.PHONY: install test lint demo-model demo export memory clean

# Targets of later features (training, evaluation) live in mk/*.mk.
-include mk/*.mk

# Create .venv/ and install the package with the export (torch CPU, transformers, onnx) and dev extras.
install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,dev]'

# Run the test suite (tiny OPT models built in-process; no downloads).
test:
	$(PY) -m pytest -q

# Static checks.
lint:
	$(VENV)/bin/ruff check .

# Build a small random-weight OPT checkpoint in demo/tiny-opt (stand-in until the embedded model lands).
demo-model:
	mkdir -p demo
	$(PY) -c "from skipdecode.export.random_models import save_random_opt; save_random_opt('tiny-preln', '$(MODEL)', init_std=0.15)"

# Export MODEL (local dir, hub id or short name like opt-1.3b) to engines/<name>/ with buckets for EXPORT_SPEEDUPS.
export:
	$(SD) export --model $(MODEL) --out $(OUT) --speedups $(EXPORT_SPEEDUPS) --force

# Resident memory of an engine: all bucket graphs vs one copy of the weights.
memory:
	$(SD) memory --engine $(OUT)

# Main job: build the demo model, export it, generate with onnxruntime at full depth and at 2x.
demo: demo-model export
	$(SD) generate --engine $(OUT) --prompt-ids "$(PROMPT_IDS)" --max-new-tokens 24
	$(SD) generate --engine $(OUT) --prompt-ids "$(PROMPT_IDS)" --max-new-tokens 24 --speedup 2

# Remove build outputs (keeps .venv).
clean:
	rm -rf demo engines/*/ .pytest_cache
