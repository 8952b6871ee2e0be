# Fresh machine: `make test` (install + test suite), `make demo` (the whole pipeline on synthetic data).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned together: timm needs torchvision, and these two are built for each other.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --timeout 600 tests

demo: install
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
