# Detectron2-PKD. `make demo` and `make test` set everything up on first use (.venv/).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.pkd-installed
METHODS ?= PKD
SEEDS ?= 0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-demo

$(STAMP): requirements.txt setup.cfg pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

# Teacher (cached in output/demo/teacher) -> student without KD and with each of METHODS, once per
# seed of SEEDS (e.g. SEEDS=0,1,2: mean ± std and the paired gain) -> table and reports.
demo: $(STAMP)
	$(PYTHON) tools/demo.py --methods $(METHODS) --seeds $(SEEDS) $(if $(RETRAIN),--retrain-teacher)

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PYTHON) benchmarks/step_time.py

clean-demo:
	rm -rf output/demo
