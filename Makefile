# `make test` and `make demo` create .venv on first use. Where the venv has no torch yet, the pinned CPU wheel is
# installed first (pip takes it from this machine's disk), so nothing pulls a multi-GB CUDA build. Users who already
# have a torch in their environment can run `VENV=/path/to/venv make test` and keep it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	$(PY) -m shapes.demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
