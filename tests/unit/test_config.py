from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, parse_listen
from gateway.errors import ConfigError


def test_defaults_load_without_a_file() -> None:
    config = Config.load(env={})
    assert config.ssh.listen == "0.0.0.0:2222"
    assert config.upstream.connect_timeout_seconds == 10.0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text(
        '[ssh]\nlisten = "127.0.0.1:2200"\nmax_auth_tries = 3\n[database]\nurl = "postgresql://a/b"\n'
    )
    config = Config.load(f, env={"RTGW_SSH_LISTEN": "[::1]:2201", "RTGW_STATE_DIR": "/srv/state"})
    assert config.ssh.listen == "[::1]:2201"
    assert config.ssh.max_auth_tries == 3
    assert config.database.url == "postgresql://a/b"
    assert config.state.dir == "/srv/state"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[ssh]\nlisten = "nope"\n', {}, "ssh.listen"),
        ('[ssh]\nmax_auth_tries = "6"\n', {}, "ssh.max_auth_tries"),
        ("[ssh]\nmax_auth_tries = 0\n", {}, "ssh.max_auth_tries"),
        ('[ssh]\nlisten_typo = "x"\n', {}, "ssh.listen_typo"),
        ("[nonsense]\n", {}, "nonsense"),
        ("", {"RTGW_API_LISTEN": "127.0.0.1:99999"}, "api.listen"),
        (
            "",
            {"RTGW_UPSTREAM_CONNECT_TIMEOUT_SECONDS": "soon"},
            "RTGW_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
        ),
        ("", {"RTGW_DATABASE_URL": "mysql://x"}, "database.url"),
        ("", {"RTGW_API_ENABLED": "maybe"}, "RTGW_API_ENABLED"),
        ('[log]\nlevel = "loud"\n', {}, "log.level"),
    ],
)
def test_a_bad_setting_fails_at_start_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], key: str
) -> None:
    f = tmp_path / "g.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        Config.load(f, env=env)
    assert err.value.key == key
    assert str(err.value).startswith(f"config: {key}: ")


def test_a_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("[ssh\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(f, env={})


def test_the_example_config_is_valid_and_equals_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "gateway.example.toml"
    assert Config.load(example, env={}) == Config.load(env={})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:22", ("0.0.0.0", 22)),
        ("[::1]:2222", ("::1", 2222)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addresses_parse(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value, "k") == expected
