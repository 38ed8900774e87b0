"""Where a sweep's runs were trained: per run, `runs/<name>/provenance.json` in the results folder, one
segment per piece of work (what was done, how long, the code commit, the hardware with the CPU model,
library versions, the cores and the size of the vectorized group), and the lines a report prints of them.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from seqgen.atomic import atomic_write_json
from trainer.runtime.platform import cpu_model, versions

PROVENANCE_FILE = "provenance.json"


def hardware() -> str:
    """The machine (architecture, CPU model: `trainer.runtime.platform.cpu_model`) / `jax.devices()` (and the
    device kind)."""
    import jax

    devices = jax.devices()
    return f"{platform.machine()} {cpu_model()} / {devices} ({devices[0].device_kind})"


def code_commit() -> str:
    """The git commit of the code running (with `+dirty` when tracked files differ), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "diff", "--quiet", "HEAD", "--", "."],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head[:12] + ("+dirty" if dirty else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_provenance(results: Path) -> dict[str, dict[str, Any]]:
    """{run name: {"segments": [...]}} from each run's `runs/<name>/provenance.json`."""
    runs = Path(results) / "runs"
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(runs.rglob(PROVENANCE_FILE)) if runs.is_dir() else []:
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("segments"), list):
            out[path.parent.relative_to(runs).as_posix()] = data
    return out


def record_provenance(results: Path, run_name: str, action: str, wall_s: float, *, jobs: int,
                      cpus: list[int] | None, group: int = 1) -> None:
    """Add one segment (what was done, how long, on which code and hardware) to a run's provenance
    (`<results>/runs/<name>/provenance.json`: one file per run, so concurrent sweeps never share one)."""
    path = Path(results) / "runs" / run_name / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_json(path)
    entry = data if isinstance(data, dict) and isinstance(data.get("segments"), list) else {"segments": []}
    entry["segments"].append({"action": action, "wall_s": round(wall_s, 1), "commit": code_commit(),
                              "hardware": hardware(), "versions": versions(), "jobs": jobs, "cpus": cpus,
                              "group": group,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    atomic_write_json(path, entry)



def provenance_lines(results: Path, rows: Sequence[Any]) -> list[str]:
    """The report's lines of hardware and commit, each naming the runs (`rows`: `.name`, `.steps`) it holds."""
    prov = read_provenance(results)
    lines = []
    for key, title in (("hardware", "Hardware"), ("commit", "Code at commit")):
        users: dict[str, list[str]] = {}
        for r in rows:
            for seg in prov.get(r.name, {}).get("segments", []):
                if seg.get(key):
                    users.setdefault(str(seg[key]), [])
                    if r.name not in users[str(seg[key])]:
                        users[str(seg[key])].append(r.name)
        lines += [f"{title}: `{h}` ({', '.join(names)})" for h, names in users.items()]
    if not any(line.startswith("Hardware:") for line in lines) or any(
            r.steps is not None and r.name not in prov for r in rows):
        lines.append(f"Hardware of this report: `{hardware()}`")
    return [x for line in lines for x in (line, "")]


__all__ = ["PROVENANCE_FILE", "code_commit", "hardware", "provenance_lines", "read_provenance", "record_provenance"]
