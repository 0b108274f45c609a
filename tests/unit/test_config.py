from __future__ import annotations

import ast
import inspect
import os
import typing
from pathlib import Path

import pytest

from gateway import config as config_module
from gateway.config import Config, parse_listen, restart_required_changes, restart_settings
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


# --- choices typed as Literal -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "section", "key", "choices"),
    [
        ("RTGW_SSH_PROXY_PROTOCOL", "ssh", "proxy_protocol", ("off", "optional", "required")),
        ("RTGW_LOG_LEVEL", "log", "level", ("debug", "info", "warning", "error")),
        ("RTGW_LOG_FORMAT", "log", "format", ("json", "console")),
    ],
)
def test_a_choice_setting_accepts_exactly_the_values_of_its_literal_type(
    variable: str, section: str, key: str, choices: tuple[str, ...]
) -> None:
    section_type = typing.get_type_hints(Config)[section]
    assert typing.get_args(typing.get_type_hints(section_type)[key]) == choices
    trusted = {"RTGW_SSH_PROXY_TRUSTED_CIDRS": "10.0.0.0/8"}
    for choice in choices:
        loaded = Config.load(env={variable: choice, **trusted})
        assert getattr(getattr(loaded, section), key) == choice
    with pytest.raises(ConfigError) as err:
        Config.load(env={variable: "nonsense", **trusted})
    assert err.value.key == f"{section}.{key}"  # named as in the file, set from the environment


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[log]\nformat = "xml"\n', "config: log.format: must be json or console"),
        ('[log]\nlevel = "loud"\n', "config: log.level: must be debug, info, warning or error"),
        (
            '[ssh]\nproxy_protocol = "maybe"\n',
            "config: ssh.proxy_protocol: must be off, optional or required",
        ),
        ("[log]\nlevel = 5\n", "config: log.level: expected a string (got 5)"),
    ],
)
def test_a_choice_outside_the_literal_is_refused_listing_the_choices(
    tmp_path: Path, toml: str, message: str
) -> None:
    f = tmp_path / "g.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        Config.load(f, env={})
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("toml", "env", "workers", "count"),
    [
        ("", {}, 1, 1),
        ("[process]\nworkers = 3\n", {}, 3, 3),
        ('[process]\nworkers = "auto"\n', {}, "auto", None),
        ("", {"RTGW_PROCESS_WORKERS": " 4 "}, 4, 4),
        ("", {"RTGW_PROCESS_WORKERS": "auto"}, "auto", None),
    ],
)
def test_workers_are_a_count_or_auto(
    tmp_path: Path, toml: str, env: dict[str, str], workers: int | str, count: int | None
) -> None:
    f = tmp_path / "g.toml"
    f.write_text(toml)
    process = Config.load(f, env={"RTGW_SSH_LISTEN": "127.0.0.1:2222", **env}).process
    assert process.workers == workers
    assert process.worker_count() == (count or max(1, len(os.sched_getaffinity(0))))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"RTGW_PROCESS_WORKERS": "many"},
            "config: process.workers: must be \"auto\" or an integer >= 1 (got 'many')",
        ),
        (
            {"RTGW_PROCESS_WORKERS": "0"},
            'config: process.workers: must be "auto" or an integer >= 1 (got 0)',
        ),
    ],
)
def test_workers_that_are_neither_a_count_nor_auto_are_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        Config.load(env=env)
    assert str(err.value) == message


def test_a_workers_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text("[process]\nworkers = true\n")
    with pytest.raises(ConfigError, match=r"^config: process\.workers: expected an integer"):
        Config.load(f, env={})


def test_setting_types_are_resolved_without_eval() -> None:
    tree = ast.parse(inspect.getsource(config_module))
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not calls & {"eval", "exec"}


# --- settings that need a restart -------------------------------------------------------------

RESTART_NEEDED = [
    "database.url",
    "database.pool_min_size",
    "database.pool_max_size",
    "database.connect_timeout_seconds",
    "database.command_timeout_seconds",
    "ssh.listen",
    "upstream.max_sessions_per_connection",
    "upstream.pool_idle_seconds",
    "api.listen",
    "api.enabled",
    "api.max_body_bytes",
    "api.header_timeout_seconds",
    "api.idle_timeout_seconds",
    "api.body_timeout_seconds",
    "api.max_connections_per_source",
    "api.invalid_key_burst",
    "api.invalid_key_per_second",
    "api.key_rate_burst",
    "api.key_rate_per_second",
    "metrics.listen",
    "process.workers",
    "process.worker_watchdog_seconds",
    "state.dir",
    "log.level",
    "log.format",
    "revocation.mode",
    "revocation.reconcile_interval_seconds",
    "workos.jwks_url",
    "workos.issuer",
    "workos.webhook_secret",
    "workos.roles",
]


def test_the_settings_a_reload_cannot_apply_are_marked_restart() -> None:
    assert restart_settings() == RESTART_NEEDED


def test_a_reload_names_only_the_changed_settings_that_need_a_restart() -> None:
    old = Config.load(env={})
    assert restart_required_changes(old, Config.load(env={})) == []
    new = Config.load(
        env={
            "RTGW_SSH_LISTEN": "0.0.0.0:22",
            "RTGW_SSH_MAX_AUTH_TRIES": "3",  # applied by a reload
            "RTGW_LOG_LEVEL": "debug",
            "RTGW_UPSTREAM_CONNECT_TIMEOUT_SECONDS": "3",  # applied by a reload
            "RTGW_DATABASE_POOL_MAX_SIZE": "20",
        }
    )
    assert restart_required_changes(old, new) == [
        "database.pool_max_size",
        "ssh.listen",
        "log.level",
    ]


def test_every_setting_that_needs_a_restart_says_so_in_the_example_config() -> None:
    """A key's own comments (the lines right above it and its line) say "restart needed"
    exactly when the setting is marked restart."""
    example = Path(__file__).resolve().parents[2] / "config" / "gateway.example.toml"
    said: dict[str, bool] = {}
    section = ""
    comments: list[str] = []
    for line in example.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section, comments = stripped.strip("[]"), []
        elif stripped.startswith("#"):
            comments.append(stripped)
        elif "=" in stripped:
            key, _, rest = stripped.partition("=")
            own = " ".join([*comments, rest.partition("#")[2]])
            said[f"{section}.{key.strip()}"] = "restart needed" in own.lower()
            comments = []
        else:
            comments = []
    assert [name for name, yes in said.items() if yes] == RESTART_NEEDED
    assert len(said) == len(list(config_module._settings(Config())))  # every key is shown
