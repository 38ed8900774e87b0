"""The README's map of the code matches the tree: every module of each package is named in its row, and
every module a row names exists. Paths the docs name exist (removed files are named only as removed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["seqgen", "trainer", "trainer/models", "trainer/sweep", "trainer/analyze", "trainer/runtime"]


def _map_rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `([a-z/]+)/`[^|]*\| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.mark.parametrize("package", PACKAGES)
def test_the_readme_map_names_every_module_and_only_modules_that_exist(package):
    row = _map_rows().get(package)
    assert row is not None, f"README's map has no row for {package}/"
    named = set(re.findall(r"`([a-z_]+\.py)`", row))
    present = {p.name for p in (ROOT / package).glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert present - named == set(), f"{package}/ modules missing from README's map: {sorted(present - named)}"
    assert named - present == set(), f"README's map names {package}/ modules that do not exist: {sorted(named - present)}"


def test_every_path_the_docs_name_exists():
    pattern = re.compile(r"\b((?:seqgen|trainer|bench|tests|examples|configs)/[A-Za-z0-9_./-]+\.(?:py|toml|sh|ipynb|sbatch))\b")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "removed" in line or "retired" in line:  # history names what is gone on purpose
                continue
            missing += [f"{doc.name}: {p}" for p in pattern.findall(line) if not (ROOT / p).exists()]
    assert missing == []
