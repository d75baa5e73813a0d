VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/restuning demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
