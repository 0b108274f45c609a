"""``python -m bench.run --smoke`` (as ``scripts/bench --smoke`` runs it) works end to end and
prints its table. Never a timing threshold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.support import REPO


def test_bench_smoke_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== runtools-gateway bench ==" in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) >= 8, result.stdout
    ratios = [
        cell.strip()
        for line in table[1:]
        for cell in line.strip("|").split("|")[4:6]
        if cell.strip() != "—"
    ]
    assert ratios, result.stdout
    for cell in ratios:
        match = re.fullmatch(r"(\d+\.\d+)x", cell)
        assert match and float(match.group(1)) > 0, cell
    data = json.loads(out.read_text())
    for row in data["rows"]:
        for key in ("ratio_direct", "ratio_bastion"):
            assert row[key] is None or row[key] > 0, row
