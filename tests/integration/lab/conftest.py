"""Lab-area fixtures: a user's key pair, as the demo and the seeding take them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.lab.user_keys import UserKey, make_key


@pytest.fixture
def user_key(tmp_path: Path) -> UserKey:
    return make_key(tmp_path, "me")
