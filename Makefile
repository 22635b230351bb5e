# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test protos check-protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
	  --grpc_python_out=protos protos/pigment/v1/*.proto

check-protos: $(STAMP)
	$(BIN)/python -m pigment.services.common.protocheck

demo: $(STAMP)
	$(BIN)/pigment demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pigment.services.common.protocheck
	$(BIN)/python -m pytest -q -x --durations=10

clean:
	rm -rf $(VENV) demo-output pigment-data
