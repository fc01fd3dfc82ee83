# Inferno: `make run` and `make test` work on a fresh Debian machine with only python3.
# llama-cpp-python compiles from source on first install (~9 minutes on 2 cores); pip caches
# the wheel, so later installs take seconds.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run test check lint format bench clean daemon

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml
	@echo "Installing Inferno into $(VENV) (first time: llama-cpp-python compiles, ~9 min on 2 cores)"
	$(PIP) install --quiet -e ".[default-model,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# Start a user-level daemon unless one is already answering, then open the console.
run: $(STAMP)
	@$(VENV)/bin/inferno status >/dev/null 2>&1 || { \
	  echo "starting infernod (log: $${XDG_STATE_HOME:-$$HOME/.local/state}/inferno/infernod.log)"; \
	  mkdir -p "$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno"; \
	  nohup $(VENV)/bin/infernod >>"$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno/infernod.log" 2>&1 & \
	  for i in $$(seq 1 100); do $(VENV)/bin/inferno status >/dev/null 2>&1 && break; sleep 0.2; done; }
	@if [ -t 1 ] && $(PY) -c "import inferno_tui.app" 2>/dev/null; then \
	  $(VENV)/bin/inferno-tui; else $(VENV)/bin/inferno status; $(VENV)/bin/inferno models; fi

test: $(STAMP)
	$(PY) -m pytest -q

check: lint test

lint: $(STAMP)
	$(VENV)/bin/ruff check infernod inferno_tui tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format infernod inferno_tui tests bench

bench: $(STAMP)
	$(PY) bench/engine_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
