# Every target creates .venv and installs the project when missing, so a fresh clone
# needs nothing else than `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME := $(CURDIR)/dagster_home
UI_PORT ?= 3000

.PHONY: demo test test-fast screenshot ui bench lint clean-data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## Run the whole asset graph on the built-in demo catalog (offline, CPU, a few minutes).
demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

## The full test suite (what CI runs).
test: $(STAMP)
	$(BIN)/pytest

## Fast tests only (skips the end-to-end and other slow tests).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

## Refresh docs/ui-asset-graph.png: the browser test materialises the demo graph in the UI and
## saves its screenshot there (needs chromium; several minutes). Tests never write it otherwise.
screenshot: $(STAMP)
	CARMODELS_SCREENSHOT_OUT=$(CURDIR)/docs/ui-asset-graph.png $(BIN)/pytest tests/test_ui_browser.py

## The Dagster UI on http://127.0.0.1:$(UI_PORT)
ui: $(STAMP)
	$(BIN)/dagster dev -h 127.0.0.1 -p $(UI_PORT)

## CPU speed benchmarks (ratios against reference runs in the same script). GPU benchmarks
## (bench/*_gpu.py) need a CUDA machine and are run by hand there; see docs/BENCHMARKS.md.
## bench/device_pack.py is no benchmark: it packs photos and the judge for a GPU machine.
CPU_BENCHES := $(filter-out %_gpu.py bench/device_pack.py,$(wildcard bench/*.py))
bench: $(STAMP)
	@if [ -z "$(CPU_BENCHES)" ]; then echo "no CPU benchmarks yet; smoke-testing bench/train_gpu.py"; \
		$(BIN)/python bench/train_gpu.py --smoke; fi
	@for script in $(CPU_BENCHES); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

## Delete pipeline outputs and Dagster run history (keeps the tracked files in dagster_home/).
clean-data:
	rm -rf data
	find dagster_home -mindepth 1 ! -name dagster.yaml ! -name dagster-postgres.yaml ! -name carmodels.yaml ! -name .gitkeep -exec rm -rf {} +
