# One entry point for set-up and the everyday jobs. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test release lab bench clean

setup: $(VENV)/.installed

# torch first, from its exact pin (the CPU build); then the project with every pin from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup        ## the main job: run every solution at ci budget, grade the sample class
	$(BIN)/brewslm demo

test: setup        ## the test suite (what .ci/run calls)
	$(BIN)/python -m pytest

release: setup     ## regenerate notebooks/ from solutions/
	$(BIN)/brewslm release

lab: setup         ## open the student notebooks in JupyterLab
	$(BIN)/brewslm lab

bench: setup       ## run every lesson at full budget and print what each measured
	$(BIN)/brewslm bench

clean:
	rm -rf $(VENV) *.egg-info
