"""Who may import what: the daemon never reaches gateway.lab (the lab is not in the wheel), the
bench stands on gateway.lab rather than on tests/, and no test imports a conftest."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = ("gateway", "keystore")
LAB = "gateway.lab"
# Everything the daemon runs: its entry points and every module of the packages it serves with.
DAEMON_ROOTS = ("gateway.daemon.lifecycle", "gateway.daemon.supervisor")
DAEMON_PACKAGES = ("gateway.ssh", "gateway.relay", "gateway.upstream", "gateway.audit")


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def package_modules(package: str) -> list[str]:
    directory = REPO.joinpath(*package.split("."))
    return [package] + [
        f"{package}.{path.stem}"
        for path in sorted(directory.glob("*.py"))
        if path.stem != "__init__"
    ]


def imported_names(name: str, path: Path) -> Iterator[str]:
    """Every module name an import statement in the file may load, lazy imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # maybe submodules


def reachable(roots: list[str]) -> dict[str, str | None]:
    """Our modules reachable from ``roots`` by static imports: module -> who imported it."""
    seen: dict[str, str | None] = {}
    todo: list[tuple[str, str | None]] = [(root, None) for root in roots]
    while todo:
        name, parent = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen[name] = parent
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parts = name.split(".")
        todo += [(".".join(parts[:i]), name) for i in range(1, len(parts))]
        path = module_file(name)
        assert path is not None
        todo += [
            (imported, name)
            for imported in imported_names(name, path)
            if imported.split(".")[0] in OURS
        ]
    return seen


def chain(seen: dict[str, str | None], name: str) -> str:
    links = [name]
    while (parent := seen[links[-1]]) is not None:
        links.append(parent)
    return " <- ".join(links)


def test_the_static_import_graph_of_the_daemon_never_reaches_the_lab() -> None:
    roots = list(DAEMON_ROOTS)
    for package in DAEMON_PACKAGES:
        roots += package_modules(package)
    seen = reachable(roots)
    assert "gateway.ssh.server" in seen and "keystore.db" in seen  # the walk does walk
    lab = [chain(seen, m) for m in seen if m == LAB or m.startswith(LAB + ".")]
    assert lab == [], "the daemon imports gateway.lab:\n" + "\n".join(lab)


def test_the_walk_would_see_a_lazy_import_of_the_lab() -> None:
    # gateway.cli imports the lab inside cmd_demo only: the walk counts lazy imports too.
    seen = reachable(["gateway.cli"])
    assert "gateway.lab.demo" in seen


def test_importing_the_cli_and_the_daemon_loads_no_lab_module() -> None:
    code = (
        "import sys\n"
        "import gateway.cli, gateway.daemon.lifecycle, gateway.daemon.supervisor\n"
        "gateway.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['gateway', 'lab']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def python_files(*dirs: str) -> Iterator[Path]:
    for directory in dirs:
        yield from sorted((REPO / directory).rglob("*.py"))


def test_no_test_imports_a_conftest() -> None:
    offenders = []
    for path in python_files("tests", "bench"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for imported in imported_names(name, path):
            if imported.split(".")[-1] == "conftest" or ".conftest." in imported:
                offenders.append(f"{path.relative_to(REPO)}: {imported}")
    assert offenders == []


def test_the_bench_needs_neither_tests_nor_sys_path_edits() -> None:
    offenders = []
    for path in python_files("bench"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        offenders += [
            f"{path.name} imports {imported}"
            for imported in imported_names(name, path)
            if imported.split(".")[0] == "tests"
        ]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                if isinstance(node.value, ast.Name) and node.value.id == "sys":
                    offenders.append(f"{path.name}:{node.lineno} uses sys.path")
    assert offenders == []
