"""What the wheel carries: every package but gateway.lab (see gateway/lab/__init__.py), the
migrations and the py.typed markers; and what ``demo`` says where the lab is missing."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def setuptools_table() -> dict[str, object]:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert isinstance(table, dict)
    return table


def packages_on_disk() -> set[str]:
    found = set()
    for top in ("gateway", "keystore"):
        for init in (REPO / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(REPO).parts))
    return found


def test_the_wheel_lists_every_package_except_the_lab() -> None:
    listed = setuptools_table()["packages"]
    assert isinstance(listed, list)
    assert "gateway.lab" in packages_on_disk()
    assert set(listed) == packages_on_disk() - {"gateway.lab"}


def test_the_wheel_carries_the_migrations_and_the_type_markers() -> None:
    data = setuptools_table()["package-data"]
    assert isinstance(data, dict)
    assert "py.typed" in data["gateway"] and "py.typed" in data["keystore"]
    assert "*.sql" in data["keystore.migrations"]
    assert list((REPO / "keystore" / "migrations").glob("*.sql"))


def test_demo_without_the_lab_says_where_it_runs_and_exits_1() -> None:
    # As from an installed wheel: gateway.lab cannot be imported.
    code = (
        "import sys\n"
        "sys.modules['gateway.lab'] = None\n"
        "from gateway.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        "runtools-gateway demo: the demo runs from a source checkout: bash scripts/demo"
    ]
