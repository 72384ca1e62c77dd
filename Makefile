# The whole set-up on a fresh machine is `make test` or `make demo`: each creates .venv when missing
# and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0
export NO_MKDOCS_2_WARNING := 1

.PHONY: install test lint docs demo compare-demo bench benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e ".[test,docs,demo,timm,lora,hf,wilds]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check lightning_robustft tests benchmarks scripts
	$(BIN)/ruff format --check lightning_robustft tests benchmarks scripts

docs: install
	$(BIN)/mkdocs build --strict --site-dir site

test: install lint docs
	$(BIN)/pytest -q

demo: install
	$(BIN)/robustft validate --config configs/demo.yaml   # the zero-shot model
	$(BIN)/robustft fit --config configs/demo.yaml        # fine-tuning it

compare-demo: install  # methods on the ID-OOD plane: WiSE-FT curves, frontier gains (docs/compare.md)
	$(BIN)/robustft compare --config configs/compare_demo.yaml --methods ft gmixout wiseft gmixout+wiseft \
		--seeds 0 --lrs 3e-4 --alphas 0 0.25 0.5 0.75 1 --out robustft_logs/compare-demo

bench: install
	$(BIN)/python benchmarks/gmixout.py

benchmark: install  # the results page (docs/results.md): robustft compare grids, 3 seeds, ~30 min on 2 cores
	$(BIN)/python benchmarks/frontier.py --docs docs/results

clean:
	rm -rf $(VENV) site lightning_logs robustft_logs .pytest_cache
