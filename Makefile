# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
OUT    ?= compactor-demo

ECO_VENV  ?= .venv-ecosystem
ECO_PY    := $(ECO_VENV)/bin/python
ECO_TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean test-ecosystem

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/compactor demo --out $(OUT) $(if $(FORCE),--force)

test: install
	$(PY) -m pytest -q

# Third-party round trips (timm, ultralytics, torchvision, transformers) in a venv of their own: torchvision
# does not import beside the pinned CPU torch of `make test`.
$(ECO_VENV)/.installed: pyproject.toml Makefile
	test -x $(ECO_PY) || $(PYTHON) -m venv $(ECO_VENV)
	$(ECO_PY) -m pip install -q --upgrade pip
	$(ECO_PY) -m pip install -q $(ECO_TORCH)
	$(ECO_PY) -m pip install -q timm transformers ultralytics
	$(ECO_PY) -m pip install -q -e ".[test]"
	touch $@

test-ecosystem: $(ECO_VENV)/.installed
	YOLO_OFFLINE=1 $(ECO_PY) -m pytest -q tests/integration/test_ecosystem.py tests/integration/test_hf.py

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(ECO_VENV) $(OUT) .pytest_cache
