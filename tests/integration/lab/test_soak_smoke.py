"""``python -m bench.soak --smoke`` runs end to end under attack and prints its rows.

No thresholds (CI machines vary); the figures that matter are in bench/README.md.
"""

from __future__ import annotations

import subprocess
import sys

from gateway.lab.process import REPO


def test_soak_smoke_prints_rows_while_the_gateway_is_attacked() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert len(rows) >= 3, result.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and int(cells[2]) > 0, row  # RSS MiB, fds
        assert int(cells[4]) >= 1, row  # legitimate logins got through in every interval
    assert "first -> last row" in result.stdout
