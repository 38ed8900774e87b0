"""examples/quickstart.py (the notebook's source) runs end to end at tiny size, and examples/quickstart.ipynb
holds the same cells (jupytext pairing; regenerate with `jupytext --sync examples/quickstart.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "quickstart.py"
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def percent_cells(text: str) -> list[tuple[str, str]]:
    """(cell type, source) of each `# %%` cell of a jupytext percent script (markdown with its '# ' removed)."""
    lines = text.splitlines()
    if lines and lines[0] == "# ---":  # the YAML header: notebook metadata, not a cell
        lines = lines[lines.index("# ---", 1) + 1:]
    cells: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, body in cells:
        if kind == "markdown":
            body = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in body]
        out.append((kind, "\n".join(body).strip("\n")))
    return out


def test_the_notebook_is_in_sync_with_its_script():
    notebook = json.loads(NOTEBOOK.read_text())
    cells = [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]
    assert cells == percent_cells(SCRIPT.read_text()), "run `jupytext --sync examples/quickstart.py`"
    assert len(cells) >= 12 and all(not c.get("outputs") for c in notebook["cells"])
    assert notebook["metadata"]["jupytext"]["formats"] == "ipynb,py:percent"


def test_the_quickstart_runs_at_tiny_size(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "QUICKSTART_SIZE": "tiny", "QUICKSTART_DIR": str(work), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-W", "error", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "strongest induction head: layer" in out and "strongest prev_token head: layer" in out
    assert "fewshot_rare     accuracy_closed" in out and "n=256" in out
    assert sorted(p.name for p in work.glob("*.png")) == ["attention.png", "icl_iwl.png"]
    run = work / "runs" / "tiny"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-20", "step-40"]
    assert (run / "analysis.jsonl").is_file() and not (run / "evaluations").exists()  # evaluate records nothing
