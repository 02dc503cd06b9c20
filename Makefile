# Two commands do all set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   -> the main job end to end on the embedded offline sample region
#   make test   -> the full test suite (what CI runs)
# Both create/refresh .venv themselves and are safe to rerun.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.geoseg-installed
DEMO   ?= runs/demo
# A NEON TEAK plot of the sample's test split (conifers and clearings; a 0.1 m RGB orthophoto,
# resampled to the model's 0.5 m as the build does); its LiDAR comes from the sample STAC API.
PLOT   := data_catalog/sample/assets/naip/ca_teak_044_010_2017.tif

.PHONY: demo test lint venv clean-demo screenshots

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
	$(BIN)/geoseg train --config configs/ikdnet-demo.yaml --data $(DEMO)/data --out $(DEMO)/run
	$(BIN)/geoseg evaluate --checkpoint $(DEMO)/run/checkpoints/last.ckpt --data $(DEMO)/data \
	  --split test --out $(DEMO)/eval
	$(BIN)/rio warp $(PLOT) $(DEMO)/plot.tif --res 0.5 --resampling average --overwrite
	$(BIN)/geoseg predict --checkpoint $(DEMO)/run/checkpoints/last.ckpt --image $(DEMO)/plot.tif \
	  --catalog sample --out $(DEMO)/pred.tif --vector $(DEMO)/pred.gpkg
	$(BIN)/geoseg train-retrieval --config configs/retrieval-tiny.yaml --data $(DEMO)/data \
	  --out $(DEMO)/retrieval
	$(BIN)/geoseg index --data $(DEMO)/data --model $(DEMO)/retrieval --out $(DEMO)/index --no-progress
	$(BIN)/geoseg search "coniferous forest" --index $(DEMO)/index --k 10 \
	  --out $(DEMO)/hits.geojson
	@echo "demo outputs: $(DEMO)/data/report.md, $(DEMO)/data/preview.png, $(DEMO)/eval/metrics.json, $(DEMO)/pred.tif"
	@echo "tile search: $(DEMO)/hits.geojson, $(DEMO)/hits.png"

# The QGIS plugin tests run in QGIS's own Python (Debian's /usr/bin/python3 + python3-qgis) from a
# light venv without torch; the plugin talks to the .venv engine as a subprocess (docs/qgis.md).
QGIS_VENV  ?= .qgis-venv
QGIS_STAMP := $(QGIS_VENV)/.geoseg-installed
QGIS_APT   := qgis python3-qgis xvfb python3-venv

$(QGIS_STAMP):
	@/usr/bin/python3 -c 'import qgis.core' 2>/dev/null && command -v xvfb-run >/dev/null || \
	  { [ "$$(id -u)" = 0 ] || { echo "QGIS missing: sudo apt-get install -y $(QGIS_APT)"; exit 2; }; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y --no-install-recommends $(QGIS_APT); }
	@test -x $(QGIS_VENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(QGIS_VENV)
	$(QGIS_VENV)/bin/python -m pip install --quiet pytest==9.2.0 pytest-qgis==5.0.2 \
	  pytest-timeout==2.4.0 bandit==1.9.4
	@touch $@

test: venv $(QGIS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15
	$(QGIS_VENV)/bin/bandit -q -r qgis_plugin -lll
	GEOSEG_ENGINE_PYTHON=$(abspath $(BIN))/python xvfb-run -a \
	  $(QGIS_VENV)/bin/python -m pytest qgis_plugin/tests -q -ra -p no:cacheprovider --durations=10

# docs/qgis.md's screenshots, made in real QGIS under Xvfb from the `make demo` outputs in $(DEMO).
screenshots: venv $(QGIS_STAMP)
	GEOSEG_ENGINE_PYTHON=$(abspath $(BIN))/python GEOSEG_QGIS_DEMO=$(DEMO) \
	  GEOSEG_QGIS_SCREENSHOTS=$(abspath docs/img) xvfb-run -a -s '-screen 0 1600x1000x24' \
	  $(QGIS_VENV)/bin/python -m pytest qgis_plugin/tests/test_screenshots.py -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO)
