PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= The capital of France is
# bench/long_prefill.py's shape: bench/run.py's default layer count
LONG_PREFILL_LAYERS ?= 6

.PHONY: run test install kernels official browser bench parity clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel, so that nothing pulls a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The native CPU kernels (gemma4/native/csrc) are compiled once per source version (a minute or two,
# cached under ~/.cache/torch_extensions); built here so that no command or test pays it, and so that a
# failed build stops here with the compiler's error.
kernels: $(STAMP)
	$(BIN)/python -m gemma4.native

run: kernels
	$(BIN)/gemma4 run --max-tokens 48 "$(PROMPT)"

# The real Gemma 4 vocabulary and the official chat template, which the chat-format tests use: taken once from
# the llama-cpp-python sdist on PyPI into ~/.cache/gemma4-test (tests/official.py), never committed. Offline,
# the tests that need them skip and say why.
official: $(STAMP)
	-$(BIN)/python tests/official.py

# Debian's chromium and its driver, for the chat page's browser test (tests/server/test_webui.py): installed
# where apt-get is there and we are root; elsewhere nothing happens and that test skips, saying why.
browser:
	-@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null; then \
		apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; \
	fi

test: kernels official browser
	$(BIN)/python -m pytest -q -x

# Prepares once (llama-cpp-python, the random 26B-A4B-shape model: ~20 minutes for 6 layers), caches it
# under $GEMMA4_BENCH_CACHE (default ~/.cache/gemma4-bench), then measures; BENCH_ARGS="--layers 1" etc.
# bench/speculative.py: prompt lookup on the embedded model, a verify step's cost on the 26B-A4B shape, the E2B
# shape drafting for it (prepared once: a 9 GB HF folder and a 3 GB Q4_K_M GGUF, ~12 minutes)
# bench/long_context.py: KV bytes and peak memory at 8K-128K, time to first token on a cached document
# bench/soak.py: the server under mixed load for 90 s, greedy probes before and after, RSS (bench/SOAK.md)
# bench/speculative_exact.py: greedy speculation token-identical to plain greedy (exits 1 if not)
# bench/api_prefix_reuse.py: the Python API's second question on a long document against the first
# bench/long_prefill.py: prefill rate of 512 to 16K-token prompts against llama.cpp (the shape run.py prepared)
# bench/memory.py: anonymous / file-backed / peak memory against llama.cpp, decode under cgroup memory limits
# bench/start_serve.py: cold start and --help, one client through the server against in-process decode, and
# 8 clients' aggregate against llama-server -np 8 (built once from the llama-cpp-python sdist's llama.cpp)
bench: kernels
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)
	$(BIN)/python bench/speculative.py $(SPEC_BENCH_ARGS)
	$(BIN)/python -m bench.long_context $(LONG_BENCH_ARGS)
	$(BIN)/python bench/speculative_exact.py
	$(BIN)/python -m bench.api_prefix_reuse
	$(BIN)/python bench/long_prefill.py --layers $(LONG_PREFILL_LAYERS) --format Q4_K_M --lengths 512,4096,16384 --rounds 1
	$(BIN)/python bench/memory.py --layers $(LONG_PREFILL_LAYERS) --format Q4_K_M
	$(BIN)/python bench/start_serve.py

# llama.cpp is built from source by pip (about 10 minutes on 2 cores), once.
parity: $(STAMP)
	$(BIN)/python -c "import sys; sys.path.insert(0, 'bench'); import prepare; prepare.ensure_llama_cpp()"
	$(BIN)/python bench/parity_llamacpp.py
	$(BIN)/python -m pytest -q -m llamacpp tests/test_llamacpp_parity.py tests/test_tokenizer.py

clean:
	rm -rf $(VENV) build *.egg-info
