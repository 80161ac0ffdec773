# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install clean-data

run: $(VENV)/.installed
	$(BIN)/pacs-annotate serve

test: $(VENV)/.installed
	$(BIN)/python -m pytest

install: $(VENV)/.installed

# pip cannot resolve torch against this machine's local wheel by itself;
# constraints.txt pins what later stages need (see docs/install.md)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

clean-data:
	rm -rf data
