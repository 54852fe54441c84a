# `make demo`, `make test` and `make notebooks` create .venv on first use (pip shows its progress). Where the venv has
# no torch yet, the pinned CPU wheel is installed first, so nothing pulls a multi-GB CUDA build. Users who already have
# a torch in their environment can run `VENV=/path/to/venv make test` and keep it. `make demo` installs the project
# alone; `make test` adds the reference libraries the tests compare against; `make notebooks` adds Jupyter.
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed
NOTEBOOKS_STAMP := $(VENV)/.installed-notebooks
NOTEBOOKS_OUT := out/notebooks

.PHONY: test demo notebooks lint clean

$(BASE): pyproject.toml
	@test -x $(PY) || echo "First use: creating $(VENV) and installing torch and the project into it"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

$(NOTEBOOKS_STAMP): $(BASE)
	$(PY) -m pip install -e ".[notebooks]"
	touch $(NOTEBOOKS_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(BASE)
	$(PY) -m shapes.demo

# Executes the three notebooks (each run from notebooks/, as when opened there) and writes them with their outputs and
# figures to out/notebooks/NAME.ipynb; notebook 3's benchmark files go to out/notebooks/03_dot_product_or_attention/.
notebooks: $(NOTEBOOKS_STAMP)
	mkdir -p $(NOTEBOOKS_OUT)
	@for nb in notebooks/0*.py; do \
		name=$$(basename $$nb .py); \
		echo "executing $$nb -> $(NOTEBOOKS_OUT)/$$name.ipynb"; \
		NOTEBOOK_OUT=$(CURDIR)/$(NOTEBOOKS_OUT) $(PY) -m jupytext --to ipynb --execute \
			--output $(NOTEBOOKS_OUT)/$$name.ipynb $$nb || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
