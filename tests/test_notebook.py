"""notebooks/quickstart.ipynb runs from top to bottom (nbclient, a kernel on this interpreter)
and shows what it says it shows; the committed file carries no outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 300  # per cell; the whole notebook takes about 80 s on a 2-core CPU


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def _kernel_on_this_python(root: Path) -> None:
    """A ``python3`` kernelspec under ``root`` (to be put first on JUPYTER_PATH) that starts
    ``sys.executable``, so the kernel imports the paged_jax this test runs against."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher"]
    kernel = {
        "argv": [*argv, "-f", "{connection_file}"],
        "display_name": "Python 3 (paged_jax tests)",
        "language": "python",
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))


def _text(cell: dict) -> str:
    """Everything a code cell printed or returned as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] == "stdout":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _cell(cells: list[dict], snippet: str) -> dict:
    """The one code cell whose source contains ``snippet``."""
    found = [c for c in cells if c["cell_type"] == "code" and snippet in c["source"]]
    assert len(found) == 1, f"{len(found)} code cells contain {snippet!r}"
    return found[0]


@pytest.mark.slow
def test_quickstart_notebook_runs(smollm2_gguf, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    _kernel_on_this_python(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('KERNEL', sys.executable)"))
    workdir = tmp_path / "run"  # the notebook's working directory
    workdir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    cells = nb.cells
    errors = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors
    assert _text(cells[-1]).strip() == f"KERNEL {sys.executable}"

    assert "KV pool: 18 pages x 16 tokens" in _text(_cell(cells, "llm = LLM("))
    generated = _text(_cell(cells, "llm.generate(prompts, greedy"))
    first, second = generated.strip().splitlines()[:2]
    assert "Paris" in first  # greedy "The capital of France is" -> " Paris.\n\n..."
    assert "4" in second.split(":", 1)[1]  # the chat answer to "What is 2+2?"
    streamed = _text(_cell(cells, "llm.stream("))
    text, count = streamed.rsplit("[", 1)
    assert count.strip().endswith("pieces]") and len(text.strip()) > 20

    summary = _text(_cell(cells, "run_eval(")).splitlines()[0]
    assert summary.startswith("eval quickstart smollm2-135m: declaration_ppl perplexity=")
    ppl = float(summary.split("perplexity=")[1].split()[0])
    assert 5 < ppl < 60  # about 22 over non-overlapping 256-token windows
    assert "mc_general acc=" in summary and "qa_short exact_match=" in summary

    timeline = _text(_cell(cells, "llm.reset_stats()"))
    assert timeline.startswith("12 requests in ")
    plots = [_cell(cells, "ax2.plot(steps, frag"), _cell(cells, "tokens = [len(o.prompt")]
    for cell in plots:
        assert any("image/png" in o.get("data", {}) for o in cell["outputs"]), "no figure shown"
    stats = _text(plots[0])
    assert "preemptions=" in stats and "compiles after warmup=" in stats
    assert "mean KV utilization=" in stats and "mean fragmentation:" in stats
    assert "batch shapes compiled on demand: T=" in stats
    waste = _text(plots[1])
    max_waste = int(waste.split("max ")[1].split()[0])
    assert 0 <= max_waste < 16
    assert list(workdir.iterdir()) == []  # the notebook writes no files
