# fedpd: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# Demo knobs (override on the command line: make demo PRETRAINED=/path/resnet_10_23dataset.pth)
PRETRAINED ?=
DEMO_DIR   ?= runs/demo
SEED       ?= 0

.PHONY: setup test demo clean

setup: $(STAMP)

# torch is installed first and alone, pinned, so pip takes the local CPU wheel and never a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m simulation.demo --out $(DEMO_DIR) --seed $(SEED) $(if $(PRETRAINED),--pretrained $(PRETRAINED))

clean:
	rm -rf $(VENV) .pytest_cache
