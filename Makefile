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
	$(BIN)/geoseg build-dataset --catalog sample --out $(DEMO)
	@echo "demo outputs: $(DEMO)/report.md, $(DEMO)/preview.png, $(DEMO)/collection.json"

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15

lint: venv
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO)
