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

.PHONY: install test lint demo export memory clean

# Targets of later features (training, evaluation) live in mk/*.mk.
-include mk/*.mk

# Create .venv/ and install the package with the export (torch CPU, transformers, onnx), dev, serve, peers and ray
# (Ray Serve scale-out) extras.
install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,dev,serve,peers,ray]'

# Run the test suite (tiny OPT models built in-process; no downloads).
test:
	$(PY) -m pytest -q

# Static checks.
lint:
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
