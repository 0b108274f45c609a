"""Render tests/compat/results.json as the README's "Works with" table.

Usage: ``python -m tests.compat.table`` after ``pytest tests/compat`` (prints Markdown).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("results.json")


def render(results: dict[str, dict[str, object]]) -> str:
    lines = [
        "| Client and flow | Same outcome as direct OpenSSH sshd |",
        "|---|---|",
    ]
    for _, entry in sorted(results.items(), key=lambda kv: str(kv[1]["doc"])):
        same = entry.get("same")
        if isinstance(same, str):
            mark = same  # differs on purpose, and says how (a documented bound)
        else:
            mark = "yes" if same is True else ("NO" if same is False else "not run")
        lines.append(f"| {entry['doc']} | {mark} |")
    return "\n".join(lines)


def main() -> int:
    print(render(json.loads(RESULTS.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
