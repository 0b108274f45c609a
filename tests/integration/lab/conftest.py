"""Lab-area fixtures: a user's key pair, as the demo and the seeding take them, and a private
TMPDIR to see what a lab process leaves behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab.user_keys import UserKey, make_key


@pytest.fixture
def user_key(tmp_path: Path) -> UserKey:
    return make_key(tmp_path, "me")


@pytest.fixture
def private_tmpdir() -> Iterator[Path]:
    """A TMPDIR for one lab process: whatever it leaves behind shows up here, not mixed with
    the temp dirs of everything else running on the machine. Outside pytest's tmp_path (0700
    as root), so the ``postgres`` and sandbox users can reach what is made in it."""
    path = Path(tempfile.mkdtemp(prefix="rtgw-tmpdir-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
