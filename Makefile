# dlis_market: one-command setup. Every target installs what it needs, idempotently.
#   make demo   set up, start a local chain, deploy, stake and register a demo node
#   make test   set up, run the whole default test suite (Python + contracts)

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export PATH := $(CURDIR)/node_modules/.bin:$(CURDIR)/$(BIN):$(PATH)

.PHONY: setup solc-shim demo demo-stop test test-python test-contracts test-heavy lint bench-gas clean-chain

setup: $(VENV)/.installed node_modules/.installed build/.compiled /usr/bin/chromium /usr/bin/prometheus

# All Python dependencies in ONE resolver pass: eth-brownie pins ~80 exact versions and a second
# `pip install` can silently break one. `pip check` must stay clean.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip check
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# solcjs behind a native-looking `solc` for brownie/py-solc-x, then compile (cached by brownie).
build/.compiled: $(VENV)/.installed node_modules/.installed contracts/*.sol contracts/interfaces/*.sol brownie-config.yaml scripts/toolchain/solc-shim.js
	$(PY) scripts/toolchain/install_solc_shim.py
	$(BIN)/brownie compile
	mkdir -p build && touch $@

# Browser tests drive Debian's chromium with Playwright (Playwright's own browser download
# cannot work offline).
/usr/bin/chromium:
	apt-get update -q && apt-get install -y -q chromium

# The ops test scrapes a live broker, oracle and worker with Debian's Prometheus and ops/prometheus.yml
# (no recommends: no node exporter; nothing starts it, there is no init system here).
/usr/bin/prometheus:
	apt-get update -q && apt-get install -y -q --no-install-recommends prometheus

# The shim in ~/.solcx is shared by every checkout on the machine and points at the one that wrote
# it last: rewrite it before each run, so that a moved or deleted checkout cannot break this one.
solc-shim: $(VENV)/.installed node_modules/.installed
	@$(PY) scripts/toolchain/install_solc_shim.py

demo: setup solc-shim
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo.sh stop

test: setup solc-shim
	bash scripts/run_tests.sh

test-heavy: setup
	$(PY) -m pytest -m heavy

lint: setup
	$(BIN)/ruff check dlis_market tests bench scripts
	$(BIN)/ruff format --check dlis_market tests bench scripts
	$(BIN)/mypy

bench-gas: setup
	$(PY) bench/gas_report.py

clean-chain:
	-$(BIN)/dlis chain down

# A local PostgreSQL 15 for the broker ledger, so several broker processes can share it (README,
# "Scale"): prints the URL to set as DLIS_BROKER__DATABASE_URL on each broker. Loopback only,
# data in PG_DIR (kept across pg-down/pg-up).
.PHONY: pg-up pg-down
PG_DIR ?= /tmp/dlis-pg

pg-up:
	$(PY) -m tests.integration.broker.pg up $(PG_DIR)

pg-down:
	$(PY) -m tests.integration.broker.pg down $(PG_DIR)
