# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create ./.venv with the pinned torch (constraints.txt) on first use. `make test` also
# runs the suite on a second torch, TORCH_ALSO, in ./.venv-torch-$(TORCH_ALSO) (README,
# "Tested versions"); `make test-torch-X.Y.Z` runs it on any torch release X.Y.Z.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# CI's second torch: a CUDA build that lies on the project machines' disk (it runs on the CPU)
TORCH_ALSO := 2.14.1

.PHONY: demo test lint bench install clean
# a venv made on the way to test-torch-X is kept (not an intermediate file to delete)
.PRECIOUS: .venv-torch-%/.installed

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "gradclip needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the demo needs only torch, matplotlib and tqdm: a fresh machine runs it within minutes
$(DEMO_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[demo]'
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-peers.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt -r requirements-peers.txt
	# the report's test opens its HTML in Debian's headless chromium (installable as root only)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "chromium not installed (needs root and apt-get): the report's browser test will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/gradclip demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-torch-$(TORCH_ALSO)

# The same dev install as $(STAMP), with torch pinned to the version in the target's name.
.venv-torch-%/.installed: pyproject.toml requirements-peers.txt
	$(PYTHON) -m venv .venv-torch-$*
	.venv-torch-$*/bin/python -m pip install --quiet --upgrade pip
	echo "torch==$*" > .venv-torch-$*/constraints.txt
	.venv-torch-$*/bin/python -m pip install --quiet -c .venv-torch-$*/constraints.txt -e '.[dev]'
	.venv-torch-$*/bin/python -m pip install --quiet --no-deps -c .venv-torch-$*/constraints.txt \
	  -r requirements-peers.txt
	touch $@

test-torch-%: .venv-torch-%/.installed
	@.venv-torch-$*/bin/python -c 'import torch; print("torch", torch.__version__)'
	.venv-torch-$*/bin/python -m pytest -q

# the development benchmarks (benchmarks/README.md); users run `gradclip bench`
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_clip.py
	$(BIN)/python benchmarks/bench_small.py

clean:
	rm -rf $(VENV) .venv-torch-* .pytest_cache .ruff_cache .hypothesis
