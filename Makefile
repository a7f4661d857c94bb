# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[deepspeed,faiss,conch,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clipit demo --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything, slow end-to-end runs included.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf runs .pytest_cache
