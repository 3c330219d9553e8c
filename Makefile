# One entry point for set-up and the everyday jobs. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama.cpp is built from source on every machine. A -march=native build compiles in the AMX kernels on a
# CPU that advertises AMX, and they die with SIGILL inside VMs that do not really let AMX run; a build on
# one machine can also crash on another. So: no native tuning, the x86-64-v3 set (AVX2, FMA, F16C, BMI2)
# that every x86-64 CPU of the last decade has, never AVX-512 or AMX. environment.yml repeats these flags
# (tests/test_env_sync.py checks); `brewslm doctor` proves the build runs.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_PIN        := $(shell sed -n 's/^ *"\(llama-cpp-python[^"]*\)",/\1/p' pyproject.toml)

.PHONY: setup demo test release lab bench clean rebuild-llama doctor

setup: $(VENV)/.installed

# torch first, from its exact pin (the CPU build); llama-cpp-python from source with the portable flags,
# never from pip's wheel cache (it keys wheels by version, not by build flags); then the project with
# every pin from pyproject.toml; last, the self-check that the course can run on this machine.
$(VENV)/.installed: pyproject.toml
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq bubblewrap || (apt-get update -qq && apt-get install -y -qq bubblewrap)); } || echo "warning: bubblewrap not installed: brewslm grade isolates less (README)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(BIN)/pip install --quiet --no-cache-dir \
	    --no-binary llama-cpp-python "$(LLAMA_PIN)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/brewslm doctor
	touch $@

demo: setup        ## the main job: execute and grade the sample class of every lesson at ci budget
	$(BIN)/brewslm demo

test: setup        ## the test suite (what .ci/run calls)
	$(BIN)/python -m pytest

release: setup     ## regenerate notebooks/ from solutions/
	$(BIN)/brewslm release

lab: setup         ## open the student notebooks in JupyterLab
	$(BIN)/brewslm lab

bench: setup       ## run every lesson at full budget and print what each measured
	$(BIN)/brewslm bench

doctor: setup      ## can the course run on this machine? (llama.cpp build, model, transformers)
	$(BIN)/brewslm doctor

# the fix `brewslm doctor` names when llama.cpp crashes (SIGILL) or is not portable
rebuild-llama:
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(BIN)/pip install --quiet --no-cache-dir \
	    --force-reinstall --no-deps --no-binary llama-cpp-python "$(LLAMA_PIN)"
	$(BIN)/brewslm doctor

clean:
	rm -rf $(VENV) *.egg-info
