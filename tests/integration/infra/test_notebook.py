"""notebooks/quickstart.ipynb executed top to bottom (nbclient) against a champion and a Serve endpoint set up by
the small tiny pipeline of tests/integration/pipeline/test_full.py (shared with it when both run in one session)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def deployed(ray_head, tmp_path_factory):
    from tests.integration.pipeline.test_full import ensure_pipeline, shutdown_serve

    run = ensure_pipeline(tmp_path_factory.getbasetemp() / "hiar-full-pipeline", ray_head.address)
    yield run
    shutdown_serve(ray_head.address)


def test_notebook_is_committed_clean():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)  # no stale outputs


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(deployed, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("HIAR_RUN_DIR", str(deployed["run_dir"]))
    monkeypatch.setenv("HIAR_SERVE_URL", deployed["url"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any cell error
    seconds = time.monotonic() - t0

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert "champion: hiar-student version 1" in text
    assert "hierarchical: Drift Score" in text and "block_first: Drift Score" in text
    assert "PyAV decodes" in text and "stream vs offline hierarchical rollout" in text
    assert len(images) >= 2  # the frames side by side and the per-segment drift plot
    for name in ("side_by_side.mp4", "drift_segments.png", "served.mp4"):
        assert (deployed["run_dir"] / "notebook" / name).stat().st_size > 0
    print(f"notebook executed in {seconds:.1f} s")
