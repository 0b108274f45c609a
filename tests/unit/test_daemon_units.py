"""sd_notify, LISTEN_FDS and the daemon's config settings, without a daemon."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gateway.config import Config, restart_required_changes
from gateway.daemon import systemd
from gateway.errors import ConfigError


def test_notifier_sends_datagrams_and_is_silent_without_a_socket(tmp_path: Path) -> None:
    assert systemd.Notifier({}).ready("x") is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        n = systemd.Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
        assert n.watchdog_interval() == pytest.approx(1.0)
        n.reloading()
        lines = rx.recv(1024).decode().splitlines()
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        n.ready("serving")
        assert rx.recv(1024).decode().splitlines()[:2] == ["READY=1", "STATUS=serving"]
        n.close()


def test_watchdog_is_ignored_for_another_pid() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert systemd.Notifier(env).watchdog_interval() is None


def test_listen_fds_only_for_our_pid() -> None:
    me = str(os.getpid())
    assert systemd.listen_fds({"LISTEN_PID": me, "LISTEN_FDS": "2"}) == [3, 4]
    assert systemd.listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == []
    assert systemd.listen_fds({}) == []


def test_daemon_settings_parse_and_validate() -> None:
    c = Config.load(
        env={
            "RTGW_PROCESS_WORKERS": "auto",
            "RTGW_SSH_PROXY_PROTOCOL": "required",
            "RTGW_SSH_PROXY_TRUSTED_CIDRS": "10.0.0.0/8, 192.0.2.1/32",
            "RTGW_METRICS_LISTEN": "127.0.0.1:9122",
        }
    )
    assert c.process.worker_count() >= 1
    assert c.ssh.proxy_trusted_cidrs == ("10.0.0.0/8", "192.0.2.1/32")
    assert Config.load(env={"RTGW_PROCESS_WORKERS": "3"}).process.worker_count() == 3
    bad = [
        {"RTGW_SSH_PROXY_PROTOCOL": "maybe"},
        {"RTGW_SSH_PROXY_PROTOCOL": "optional"},  # no trusted CIDRs
        {"RTGW_SSH_PROXY_PROTOCOL": "optional", "RTGW_SSH_PROXY_TRUSTED_CIDRS": "nope"},
        {"RTGW_PROCESS_WORKERS": "0"},
        {"RTGW_PROCESS_WORKERS": "many"},
        {"RTGW_PROCESS_WORKERS": "2", "RTGW_SSH_LISTEN": "127.0.0.1:0"},
        {"RTGW_SSH_DRAIN_TIMEOUT_SECONDS": "0"},
        {"RTGW_METRICS_LISTEN": "nowhere"},
    ]
    for env in bad:
        with pytest.raises(ConfigError):
            Config.load(env=env)


def test_reload_names_the_settings_that_need_a_restart() -> None:
    old = Config.load(env={})
    new = Config.load(env={"RTGW_SSH_LISTEN": "0.0.0.0:22", "RTGW_SSH_MAX_AUTH_TRIES": "3"})
    assert restart_required_changes(old, new) == ["ssh.listen"]
