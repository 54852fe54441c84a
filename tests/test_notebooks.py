"""The teaching notebooks run top to bottom, and their committed `.ipynb` files are the reviewed `.py` sources.

Each notebook lives twice in `notebooks/`: a jupytext percent-format `.py` (what is reviewed) and a paired `.ipynb`
without outputs (what Jupyter opens). The `.py` is executed here with nbclient on the `python3` kernel, which
jupyter_client starts with this interpreter (its kernel spec says `python`, replaced by `sys.executable`); the
notebook's first cell prints the interpreter it runs on, and that is checked. The working directory is `notebooks/`,
as when a user opens them, and torch uses one thread (`OMP_NUM_THREADS=1`). A notebook stops at its first failing
check (its `check(...)` asserts), so a wrong number fails here. Notebook 3 writes its benchmark files under a
temporary folder (`NOTEBOOK_OUT`).

Notebooks 2 and 3 use the built-in shapes model shipped in `shapes/weights/`; the model used is printed.
"""

import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run on)
import jupytext
import matplotlib  # noqa: F401  (the notebooks plot)
import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_flux_from_scratch", "02_concept_attention_step_by_step", "03_dot_product_or_attention")
CELL_TIMEOUT = 600  # seconds per cell; the slowest cell (notebook 3's benchmark) takes about a minute here


def stream_text(notebook) -> str:
    return "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_the_py_source_without_outputs(name):
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells = [(c.cell_type, c.source) for c in source.cells]
    assert [(c.cell_type, c.source) for c in paired.cells] == cells, (
        f"{name}.ipynb differs from {name}.py: regenerate it with `jupytext --to ipynb notebooks/{name}.py`"
    )
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}.ipynb has outputs: strip them"
    assert paired.metadata["jupytext"]["formats"] == "ipynb,py:percent"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path))
    # one thread: the models are tiny, and on a shared 2-core machine two OpenMP threads wait on each other (5-10x
    # slower measured here while another process kept one core busy)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("NOTEBOOK_FULL", raising=False)
    monkeypatch.delenv("NOTEBOOK_MODEL", raising=False)
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    seconds = time.perf_counter() - start
    text = stream_text(notebook)
    print(f"{name}: executed in {seconds:.1f} s")
    assert f"python: {sys.executable}\n" in text, "the kernel is not this interpreter (the project's venv)"
