"""One typed Config, built once from a TOML file plus ``RTGW_<SECTION>_<KEY>`` variables.

Environment variables win over the file, so a unit file or container can override one setting
without templating the whole file. Every value is validated at start; a bad one raises
``ConfigError`` naming the key (``ssh.listen``) and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = "postgresql://runtools@127.0.0.1:5432/runtools"
    pool_min_size: int = 1
    pool_max_size: int = 10
    connect_timeout_seconds: float = 5.0
    command_timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class SshConfig:
    listen: str = "0.0.0.0:2222"
    login_timeout_seconds: float = 30.0
    max_auth_tries: int = 6
    max_sessions_per_connection: int = 10
    max_unauthenticated: int = 100
    keepalive_interval_seconds: float = 30.0
    keepalive_count_max: int = 4
    register_key_hint: str = "runtools ssh-key add ~/.ssh/id_ed25519.pub"
    # SIGTERM: sessions get this long to finish before they are closed.
    drain_timeout_seconds: float = 30.0
    # PROXY protocol v1/v2 from a load balancer: off | optional | required.
    proxy_protocol: str = "off"
    # Only these sources may send a PROXY header (a header from anywhere else is refused).
    proxy_trusted_cidrs: tuple[str, ...] = ()
    proxy_header_timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_seconds: float = 10.0
    # Session channels per shared upstream connection: the sandbox sshd's MaxSessions.
    max_sessions_per_connection: int = 10
    # Idle shared upstream connections close after this long.
    pool_idle_seconds: float = 60.0
    keepalive_interval_seconds: float = 30.0
    keepalive_count_max: int = 3


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = "127.0.0.1:8080"
    enabled: bool = True
    max_body_bytes: int = 65536


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # "" serves /metrics, /healthz and /readyz on the API listener (api.enabled must be true);
    # "host:port" serves them on a listener of their own instead.
    listen: str = ""


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    # 1 (one process, the default), N worker processes, or "auto" (one per usable core).
    workers: int | str = 1
    # How long a worker may go without a heartbeat before the supervisor restarts it.
    worker_watchdog_seconds: float = 30.0

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.workers)


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: str = "/var/lib/runtools-gateway"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
        """Defaults, then the TOML file (if any), then ``RTGW_*`` variables; then validate."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        if path is not None:
            try:
                raw = tomllib.loads(Path(path).read_text("utf-8"))
            except FileNotFoundError as exc:
                raise ConfigError(str(path), "file not found") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
        sections: dict[str, Any] = {}
        for section in dataclasses.fields(cls):
            section_type = _resolve(section.type)
            given = raw.pop(section.name, {})
            if not isinstance(given, dict):
                raise ConfigError(section.name, "must be a table")
            values: dict[str, Any] = {}
            names = {f.name: f for f in dataclasses.fields(section_type)}
            for key, value in given.items():
                if key not in names:
                    raise ConfigError(f"{section.name}.{key}", "unknown setting")
                values[key] = _convert(f"{section.name}.{key}", value, names[key].type, False)
            for key, fld in names.items():
                var = f"RTGW_{section.name}_{key}".upper()
                if var in env:
                    values[key] = _convert(var, env[var], fld.type, True)
            sections[section.name] = section_type(**values)
        if raw:
            raise ConfigError(next(iter(raw)), "unknown section")
        config = cls(**sections)
        config.validate()
        return config

    def validate(self) -> None:
        parse_listen(self.ssh.listen, "ssh.listen")
        parse_listen(self.api.listen, "api.listen")
        if not self.database.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("database.url", "must start with postgresql://")
        positive = {
            "database.pool_min_size": self.database.pool_min_size,
            "database.pool_max_size": self.database.pool_max_size,
            "database.connect_timeout_seconds": self.database.connect_timeout_seconds,
            "database.command_timeout_seconds": self.database.command_timeout_seconds,
            "ssh.login_timeout_seconds": self.ssh.login_timeout_seconds,
            "ssh.max_auth_tries": self.ssh.max_auth_tries,
            "ssh.max_sessions_per_connection": self.ssh.max_sessions_per_connection,
            "ssh.max_unauthenticated": self.ssh.max_unauthenticated,
            "upstream.connect_timeout_seconds": self.upstream.connect_timeout_seconds,
            "api.max_body_bytes": self.api.max_body_bytes,
            "ssh.drain_timeout_seconds": self.ssh.drain_timeout_seconds,
            "ssh.proxy_header_timeout_seconds": self.ssh.proxy_header_timeout_seconds,
            "process.worker_watchdog_seconds": self.process.worker_watchdog_seconds,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(key, "must be greater than 0")
        if self.database.pool_min_size > self.database.pool_max_size:
            raise ConfigError("database.pool_min_size", "must not exceed pool_max_size")
        if self.log.level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log.level", "must be one of debug, info, warning, error")
        if self.log.format not in ("json", "console"):
            raise ConfigError("log.format", "must be json or console")
        if not self.state.dir:
            raise ConfigError("state.dir", "must not be empty")
        if self.metrics.listen:
            parse_listen(self.metrics.listen, "metrics.listen")
        if self.ssh.proxy_protocol not in ("off", "optional", "required"):
            raise ConfigError("ssh.proxy_protocol", "must be off, optional or required")
        for cidr in self.ssh.proxy_trusted_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError("ssh.proxy_trusted_cidrs", f"{cidr!r} is not a CIDR") from exc
        if self.ssh.proxy_protocol != "off" and not self.ssh.proxy_trusted_cidrs:
            raise ConfigError(
                "ssh.proxy_trusted_cidrs", "must list the load balancers when proxy_protocol is on"
            )
        workers = self.process.workers
        if not (workers == "auto" or (isinstance(workers, int) and workers >= 1)):
            raise ConfigError(
                "process.workers", f'must be "auto" or an integer >= 1 (got {workers!r})'
            )
        if self.process.worker_count() > 1 and parse_listen(self.ssh.listen, "ssh.listen")[1] == 0:
            raise ConfigError("ssh.listen", "needs a fixed port when process.workers is not 1")

    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.ssh.proxy_trusted_cidrs]


def parse_listen(value: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from exc
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(key, f"port {port_text!r} is not a number") from exc
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range 0-65535")
    return host, port


def _resolve(annotation: Any) -> Any:
    """Field types are strings under ``from __future__ import annotations``."""
    if isinstance(annotation, str):
        return eval(annotation, globals())  # noqa: S307 - our own annotations only
    return annotation


def _convert(key: str, value: Any, annotation: Any, from_env: bool) -> Any:
    kind = _resolve(annotation)
    args = set(typing.get_args(kind))
    if args == {int, str}:  # e.g. process.workers: 4 or "auto"
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return int(value) if value.strip().isdigit() else value.strip()
        raise ConfigError(key, f"expected an integer or a string (got {value!r})")
    if typing.get_origin(kind) is tuple:  # a list of strings; comma-separated in a variable
        if from_env and isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(key, f"expected a list of strings (got {value!r})")
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if from_env and str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if from_env and str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            if isinstance(value, bool) or (not from_env and not isinstance(value, int)):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            if isinstance(value, bool) or (not from_env and not isinstance(value, int | float)):
                raise ValueError("expected a number")
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
    except ValueError as exc:
        raise ConfigError(key, f"{exc} (got {value!r})") from exc
    raise ConfigError(key, f"unsupported type {kind!r}")
