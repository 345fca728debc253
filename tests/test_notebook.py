"""The Colab notebook, executed end to end in a headless kernel against the tiny pipeline.

Only the values of the notebook's ``parameters`` cell change: a cell that reassigns them is
inserted right after it (what papermill does), so every other cell runs as users run it. The
install cell is skipped because ``flax_latentup`` is importable (from this checkout), and the
pictures are made in the notebook, so nothing touches the network.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import helpers

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "latent_upscaler.ipynb")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def print_cell_times(nb) -> None:
    """Seconds per executed code cell (shown with ``pytest -s`` or on failure)."""
    from datetime import datetime

    for i, cell in enumerate(nb.cells):
        timing = cell.metadata.get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
            print(f"cell {i:2d}: {seconds:6.1f} s  {cell.source.splitlines()[0][:60]}")


def test_notebook_is_stripped_and_has_one_parameters_cell():
    nb = read_notebook()
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} holds outputs: strip them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"
    params = nb.cells[parameters_index(nb)]
    assert {"MODEL", "DTYPE", "STEPS", "SEED", "GUIDANCE_SCALE", "IMAGE_SIZE"} <= assigned_names(
        params.source
    )
    assert nb.metadata.kernelspec.name == "python3"


def test_kernel_is_this_interpreter():
    """``python3`` must start this Python, where flax_latentup and its deps are installed."""
    from jupyter_client.manager import KernelManager

    cmd = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert os.path.realpath(cmd[0]) == os.path.realpath(sys.executable), cmd


@pytest.mark.heavy
def test_notebook_runs_on_tiny_model(flax_pipe_dir, tmp_path, monkeypatch):
    overrides = dict(
        MODEL=flax_pipe_dir,
        DTYPE="float32",
        PROMPT="a photo of the cat",
        NEGATIVE_PROMPT="the dog",
        STEPS=2,
        GUIDANCE_SCALE=6.0,
        IMAGE_URL=None,
        IMAGE_SIZE=64,
        LATENT_SIZE=8,
        # a 64-px picture encoded in 32-px tiles, 16 latents -> 128 px decoded in 32-px tiles;
        # the UNet program is the latents cell's
        LARGE_LATENT_SIZE=8,
        TILE_SAMPLE_SIZE=32,
        BATCH_PER_DEVICE=1,
        TIMING_REPEATS=1,
    )
    nb = read_notebook()
    index = parameters_index(nb)
    unknown = set(overrides) - assigned_names(nb.cells[index].source)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell(
        "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in overrides.items()),
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(index + 1, injected)

    # The kernel inherits this environment: JAX on one CPU device (the sharded and pmap paths
    # over several devices are checked in test_parallel.py; one device keeps the compiles few),
    # no display, this checkout first on the path.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", helpers.xla_flags("--xla_force_host_platform_device_count=1"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    finally:
        print_cell_times(nb)

    def text(cell) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    out = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "nothing to install" in out
    assert "1 device(s)" in out
    assert "loaded" in out and "float32" in out
    assert "upscaled latents: (1, 16, 16, 4)" in out
    assert "batch of 1 pictures over 1 device(s)" in out
    assert "large picture: (64, 64, 3)" in out and "large output: (128, 128, 3)" in out
    diff = float(out.split("sharded vs pmap: max abs difference ")[1].split()[0])
    assert diff <= 1e-5, f"sharded and pmap batches differ by {diff:.3g}"
    for name in ("picture", "latents", "batch of 1, sharded jit", "batch of 1, pmap"):
        assert f"{name} (first call, with compile)" in out
        assert f"{name} (steady state)" in out
