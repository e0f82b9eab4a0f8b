"""The primer notebooks of examples/notebooks: valid nbformat v4 with outputs cleared, what
build.py writes, and each executed top to bottom (nbclient, on this venv's Python) on the tiny
settings (DUBOKO_NOTEBOOK_TINY=1); any cell that raises fails the test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
KERNEL = "duboko-tests"


def _builder():
    spec = importlib.util.spec_from_file_location("duboko_notebook_build", FOLDER / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_five_primer_notebooks_are_there_and_clean():
    assert [p.name for p in NOTEBOOKS] == [
        "01_mlp_and_activations.ipynb", "02_my_net_parameters.ipynb", "03_lstm_vs_rnn_gradient_flow.ipynb",
        "04_attention_from_parts.ipynb", "05_diffusion_noising_and_sampling.ipynb",
    ]
    built = _builder().build()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: outputs not cleared"
        assert "DUBOKO_NOTEBOOK_TINY" in code[0].source, f"{path.name}: the first code cell is the parameter cell"
        assert json.loads(path.read_text(encoding="utf-8")) == json.loads(nbformat.writes(built[path.name])), \
            f"{path.name} differs from what examples/notebooks/build.py writes: run it"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec that runs this interpreter (the venv's), found through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "duboko tests", "language": "python",
    }))
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_tiny_settings(path, tmp_path, kernel_dir, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("DUBOKO_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})
                or "data:image/png;base64," in o.get("data", {}).get("text/html", "")]  # a Run's curves
    assert pictures, "every notebook shows a picture"
    assert (tmp_path / "runs" / "notebooks").is_dir()  # the runs went into the working directory
