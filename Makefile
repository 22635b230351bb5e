# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deps protos check-protos api-docs buf buf-install contract lock clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# every role's extras on this CPU machine: render + train + the CPU variants (README "Operations")
	$(BIN)/pip install -q -e '.[all,dev]'
	# the client package (clients/python: stubs + typed client, no torch), tested against the server
	$(BIN)/pip install -q -e clients/python
	touch $(STAMP)

# Debian's headless Chromium for the gallery test (tests/test_gallery.py skips, saying why, without it)
# and Node's gRPC packages for examples/node (skipped without node). Needs root; CI runs it in .ci/run.
test-deps:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	command -v node >/dev/null && cd examples/node && npm install --no-audit --no-fund --silent || true

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
	  --grpc_python_out=protos protos/pigment/v1/*.proto
	$(BIN)/python clients/python/generate.py

check-protos: $(STAMP)
	$(BIN)/python -m pigment.services.common.protocheck

# docs/API.md from the protos' comments (tests/test_api_contract.py checks it is current)
api-docs: $(STAMP)
	$(BIN)/python -m pigment.services.common.apidoc

# buf (lint + breaking-change check against the committed v1 contract), installed locally with npm
BUF := $(shell command -v buf 2>/dev/null || echo $(CURDIR)/node_modules/.bin/buf)
buf-install:
	test -x $(BUF) || npm install --no-save --no-fund --no-audit @bufbuild/buf@1.75.0

buf: buf-install
	cd protos && $(BUF) lint
	cd protos && $(BUF) breaking --against contract/pigment-v1.binpb

# Tag the current protos as the contract `make buf` checks against: only when releasing a new contract.
contract: buf-install
	cd protos && $(BUF) build -o contract/pigment-v1.binpb

demo: $(STAMP)
	$(BIN)/pigment demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pigment.services.common.protocheck
	$(BIN)/python -m pytest -q -x -m "not soak" --durations=10

# The pinned environment the images build from (deploy/Dockerfile*): a freeze of this venv.
lock: $(STAMP)
	{ sed -n '1,3p' requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -vE '^(#|-e|pigment)'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) demo-output pigment-data
