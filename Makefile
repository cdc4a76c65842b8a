# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install ffmpeg test test-slow test-all lint demo bench clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

ffmpeg:
	@command -v ffmpeg >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg >/dev/null; }

install: $(STAMP) ffmpeg

test: install  ## the default suite (slow tests deselected)
	$(BIN)/python -m pytest

test-slow: install  ## only the slow tests (multi-process runs, remote code, benchmarks, loss-drop checks)
	$(BIN)/python -m pytest -m slow

test-all: install  ## everything, slow tests included
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install
	$(BIN)/ruff check fimmia_hf tests scripts

demo: install  ## the whole pipeline on embedded synthetic data, tiny models, no network
	$(BIN)/fimmia-hf demo --out demo_output

bench: install
	$(BIN)/fimmia-hf bench --out bench.json

clean:
	rm -rf $(VENV) demo_output bench.json .pytest_cache
