# otp-gateway: every set-up step and check, the same locally and in CI.
# `make run` and `make test` work on a fresh Debian 12 machine, as root.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PBX := asterisk-config/dev/pbx.sh
FAREND := $(PYTHON) tests/farend.py

.PHONY: help deps venv pbx-up pbx-down farend-up farend-down test unit lint run clean

help:
	@echo "make run      the gateway with the dev PBX and the far-end simulator"
	@echo "make test     set everything up and run the whole suite"
	@echo "make lint     ruff and mypy"
	@echo "make pbx-up | pbx-down | farend-up | farend-down"

# System packages: debootstrap builds the dev PBX root, sip-tester is SIPp.
deps:
	@if ! command -v debootstrap >/dev/null || ! command -v sipp >/dev/null; then \
		[ "$$(id -u)" -eq 0 ] || { echo "deps: run as root to apt-get install debootstrap sip-tester"; exit 1; }; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap sip-tester; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

pbx-up: deps
	bash $(PBX) up

pbx-down:
	bash $(PBX) down

farend-up: deps
	$(FAREND) up

farend-down:
	$(FAREND) down

# The fixtures start the dev PBX and the far end (and stop what they started);
# provisioning first keeps the one-minute debootstrap out of the first test.
test: deps venv
	bash $(PBX) provision
	$(BIN)/pytest -ra

unit: venv
	$(BIN)/pytest -ra -m "not integration"

lint: venv
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy

# The gateway on the dev PBX and the far end, with a dev config and API key (var/).
run: deps venv pbx-up farend-up
	bash asterisk-config/dev/run-gateway.sh

clean: pbx-down farend-down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
