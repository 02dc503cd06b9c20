# Two commands do all set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   -> the main job end to end on the embedded offline sample region
#   make test   -> the full test suite (what CI runs)
# Both create/refresh .venv themselves and are safe to rerun.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.geoseg-installed
DEMO   ?= runs/demo

.PHONY: demo test lint venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "geoseg needs Python 3.11 (found $$($(PYTHON) --version)); set PYTHON=/path/to/python3.11"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  { echo "python3 -m venv failed: install it with 'apt-get install -y python3-venv'"; exit 2; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/geoseg build-dataset --catalog sample --out $(DEMO)/data
	$(BIN)/geoseg train --config configs/ikdnet-tiny.yaml --data $(DEMO)/data --out $(DEMO)/run \
	  --max-steps 150
	$(BIN)/geoseg evaluate --checkpoint $(DEMO)/run/checkpoints/last.ckpt --data $(DEMO)/data \
	  --split test --out $(DEMO)/eval
	@echo "demo outputs: $(DEMO)/data/report.md, $(DEMO)/data/preview.png, $(DEMO)/eval/metrics.json"

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15

lint: venv
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO)
