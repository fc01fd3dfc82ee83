# Inferno: `make run` and `make test` work on a fresh Debian machine with only python3.
# llama-cpp-python compiles from source on first install (~9 minutes on 2 cores); pip caches
# the wheel, so later installs take seconds.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)-$(LLAMA_KEY)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# llama.cpp is built portable, never with -march=native: a native wheel built on one server
# crashes on the next (AMX kernels fault on some Xeon VMs, AVX-512 is missing on others).
# The default instruction set is x86-64-v3 (AVX2, FMA, F16C, BMI2: every x86 server since
# 2013); `inferno doctor` compares it with the host's. The wheel is built once per version and
# flag set into its own folder, so a wheel pip cached from another build is never reused.
# Override for one machine, e.g.  make LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON" test
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS  ?= -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON \
                     -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF \
                     -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
                     -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
                     -DGGML_AMX_BF16=OFF
LLAMA_KEY   := $(shell printf '%s|%s' '$(LLAMA_CPP_VERSION)' '$(strip $(LLAMA_CMAKE_ARGS))' | cksum | cut -d' ' -f1)
WHEELHOUSE  ?= $(HOME)/.cache/inferno/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)
LLAMA_WHEEL  = $(WHEELHOUSE)/.built

.PHONY: run test check lint typecheck format bench clean daemon llama-wheel llama-cmake-args

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(PIP) install --quiet --upgrade pip

# The sdist is downloaded (pip's HTTP cache may serve it) and built with --no-cache-dir, so
# pip's wheel cache, keyed by URL and not by CMAKE_ARGS, can neither serve nor keep the build.
$(LLAMA_WHEEL): | $(VENV)/bin/python
	@echo "Building llama-cpp-python $(LLAMA_CPP_VERSION), portable (~9 min on 2 cores, once per flag set)"
	@echo "  CMAKE_ARGS=$(strip $(LLAMA_CMAKE_ARGS))"
	@rm -rf $(WHEELHOUSE).tmp && mkdir -p $(WHEELHOUSE).tmp/src
	$(PIP) download --quiet --no-deps --no-binary :all: -d $(WHEELHOUSE).tmp/src llama-cpp-python==$(LLAMA_CPP_VERSION)
	CMAKE_ARGS="$(strip $(LLAMA_CMAKE_ARGS))" FORCE_CMAKE=1 $(PIP) wheel --quiet --no-deps --no-cache-dir \
	  -w $(WHEELHOUSE).tmp $(WHEELHOUSE).tmp/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	@rm -rf $(WHEELHOUSE).tmp/src $(WHEELHOUSE) && printf '%s\n' '$(strip $(LLAMA_CMAKE_ARGS))' > $(WHEELHOUSE).tmp/cmake-args.txt
	@touch $(WHEELHOUSE).tmp/.built && mv $(WHEELHOUSE).tmp $(WHEELHOUSE)

llama-wheel: $(LLAMA_WHEEL)

# The flags, for installs without make (docs/operations.md): CMAKE_ARGS="$(make -s llama-cmake-args)"
llama-cmake-args:
	@echo '$(strip $(LLAMA_CMAKE_ARGS))'

$(STAMP): $(VENV)/bin/python pyproject.toml $(LLAMA_WHEEL)
	@echo "Installing Inferno into $(VENV)"
	$(PIP) install --quiet --find-links $(WHEELHOUSE) --only-binary llama-cpp-python \
	  -e ".[default-model,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# Start a user-level daemon unless one is already answering, then open the console.
# The state directory holds prompts and outputs (jobs, the log): 0700, the log 0600.
run: $(STAMP)
	@$(VENV)/bin/inferno status >/dev/null 2>&1 || { \
	  echo "starting infernod (log: $${XDG_STATE_HOME:-$$HOME/.local/state}/inferno/infernod.log)"; \
	  ( umask 077 && mkdir -p "$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno" && \
	    chmod 0700 "$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno" && \
	    touch "$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno/infernod.log" && \
	    chmod 0600 "$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno/infernod.log" ) || exit 1; \
	  nohup $(VENV)/bin/infernod >>"$${XDG_STATE_HOME:-$$HOME/.local/state}/inferno/infernod.log" 2>&1 & \
	  for i in $$(seq 1 100); do $(VENV)/bin/inferno status >/dev/null 2>&1 && break; sleep 0.2; done; }
	@if [ -t 1 ] && $(PY) -c "import inferno_tui.app" 2>/dev/null; then \
	  $(VENV)/bin/inferno-tui; else $(VENV)/bin/inferno status; $(VENV)/bin/inferno models; fi

test: $(STAMP)
	$(PY) -m pytest -q

# What CI runs (.ci/run): lint, types, tests. Keep all three green.
check: lint typecheck test

lint: $(STAMP)
	$(VENV)/bin/ruff check infernod inferno_tui tests bench

# mypy over infernod/ and inferno_tui/ with the settings in pyproject.toml [tool.mypy]:
# protocol/, the client modules, the scheduler, models, generation and runner/ are strict.
typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format infernod inferno_tui tests bench

bench: $(STAMP)
	$(PY) bench/engine_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
