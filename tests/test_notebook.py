"""notebooks/quickstart.ipynb: stored without outputs, and executed end to end (FAST) in a Jupyter kernel."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def read() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs one code cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_stored_without_outputs() -> None:
    notebook = read()
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"strip the outputs of: {cell.source[:60]!r}"
    assert re.search(r"^FAST = False\b", parameters_cell(notebook).source, re.M)


@pytest.mark.slow
def test_quickstart_executes(tmp_path: Path, digits_data_dir: str) -> None:
    """Every cell runs (its asserts check the method: q(x_t | x_0) against single steps, the sampler table,
    training lowering the loss, guidance raising class purity) and every figure is drawn."""
    notebook = read()
    parameters_cell(notebook).source = (
        f"FAST = True\nDATA_DIR = {digits_data_dir!r}\nWORKDIR = {str(tmp_path / 'ddpm_digits')!r}\n"
        "SAMPLER = 'dpm_solver++'\nSTEPS = 4"
    )
    # One CPU device, as a notebook user has (the suite simulates 8 for its sharded tests).
    env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                           os.environ.get("XLA_FLAGS", "")))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 6  # every section's figures
    assert (tmp_path / "ddpm_digits" / "checkpoints").is_dir()  # section 5 trained the workdir it then loaded
