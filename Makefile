# slm-swap: `make demo` runs the workflow once on the local model; `make test` runs the whole suite.
# Both create .venv when it is missing. pip only (the CPU torch wheel is found by pip, not uv).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# llama-cpp-python is pinned and built from source with these flags: the current release built with native flags
# segfaults on the first decode on CPUs like CI's. pip's wheel cache ignores CMAKE_ARGS, so we build the wheel once,
# with no cache, into a directory named after the version and flags, and always install that exact file.
LLAMA_VERSION    := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
LLAMA_WHEEL_DIR  := $(HOME)/.cache/slm-swap/wheels/llama-cpp-python-$(LLAMA_VERSION)-GGML_NATIVE_OFF
TORCH            := torch==2.13.0
BFCL             := bfcl-eval==2026.3.23

QUERY ?= Analyze Q4 sales by region and write a short report

.PHONY: demo test install install-dev llama-wheel bench clean

demo: $(VENV)/.installed
	$(VENV)/bin/slmswap run "$(QUERY)"

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

llama-wheel: $(PY)
	@if ! ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_VERSION) with $(LLAMA_CMAKE_ARGS) (about 4 minutes, once)"; \
		mkdir -p $(LLAMA_WHEEL_DIR); \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel -q --no-binary llama-cpp-python --no-cache-dir --no-deps \
			-w $(LLAMA_WHEEL_DIR) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(PIP) install -q --no-deps $(LLAMA_WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl diskcache

$(VENV)/.installed: pyproject.toml | $(PY)
	$(MAKE) llama-wheel
	$(PIP) install -q -e .
	touch $@

# bfcl-eval pins dozens of unrelated packages (numpy 1.26, vllm extras...); we need only its data and checker.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(MAKE) llama-wheel
	$(PIP) install -q -e ".[dev,train]"
	$(PIP) install -q --no-deps $(BFCL)
	touch $@ $(VENV)/.installed

bench: $(VENV)/.installed-dev
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .slmswap .pytest_cache
