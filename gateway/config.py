"""One typed Config, built once from a TOML file plus ``RTGW_<SECTION>_<KEY>`` variables.

Environment variables win over the file, so a unit file or container can override one setting
without templating the whole file. Every value is validated at start; a bad one raises
``ConfigError`` naming the key (``ssh.listen``) and the reason.

Settings with a fixed set of values are typed as ``Literal``; the accepted values are checked
against the Literal's arguments, so the type is the only list. A setting declared with
``field(..., metadata=RESTART)`` is read only at start: a reload (SIGHUP) keeps its old value
until the next restart, and ``restart_required_changes`` names the ones a new config changed.
Every other setting applies to new connections on reload.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from gateway.errors import ConfigError
from keystore.roles import DEFAULT_ROLES, parse_roles

ProxyProtocol = Literal["off", "optional", "required"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
RevocationMode = Literal["strict", "best_effort"]
Auto = Literal["auto"]

# Field metadata of a setting read only at start: changing it needs a restart, a reload keeps
# the old value.
RESTART: Mapping[str, bool] = MappingProxyType({"restart": True})

# Bounds of upstream.certificate_lifetime_seconds (gateway/upstream/certificates.py).
CERTIFICATE_LIFETIME_MIN_SECONDS = 30
CERTIFICATE_LIFETIME_MAX_SECONDS = 300


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    # Restart: the pool (sizes and timeouts included) is created once, at start.
    url: str = field(default="postgresql://runtools@127.0.0.1:5432/runtools", metadata=RESTART)
    pool_min_size: int = field(default=1, metadata=RESTART)
    pool_max_size: int = field(default=10, metadata=RESTART)
    connect_timeout_seconds: float = field(default=5.0, metadata=RESTART)
    command_timeout_seconds: float = field(default=5.0, metadata=RESTART)


@dataclass(frozen=True, slots=True)
class SshConfig:
    listen: str = field(default="0.0.0.0:2222", metadata=RESTART)
    login_timeout_seconds: float = 30.0
    max_auth_tries: int = 6
    max_sessions_per_connection: int = 10
    # Connections not yet authenticated, gateway-wide (per process): the "full" mark of the
    # random early drop in [admission]; at it every new connection is dropped.
    max_unauthenticated: int = 1000
    keepalive_interval_seconds: float = 30.0
    keepalive_count_max: int = 4
    register_key_hint: str = "runtools ssh-key add ~/.ssh/id_ed25519.pub"
    # SIGTERM: sessions get this long to finish before they are closed.
    drain_timeout_seconds: float = 30.0
    # PROXY protocol v1/v2 from a load balancer: off | optional | required.
    proxy_protocol: ProxyProtocol = "off"
    # Only these sources may send a PROXY header (a header from anywhere else is refused).
    proxy_trusted_cidrs: tuple[str, ...] = ()
    proxy_header_timeout_seconds: float = 5.0
    # Bytes relayed channels may hold, per process: each session or forwarding channel reserves
    # its windows and send buffers (~4.2 MiB, the worst case; back-pressure keeps the real use
    # far lower); past the budget new ones are refused. 4 GiB: ~970 channels per process.
    max_buffered_bytes: int = 4 * 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """Before authentication: who may open connections at all (gateway/ssh/admission.py)."""

    # A source is one IPv4 address (/32) or one IPv6 /64.
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    # Unauthenticated connections one source may hold at once (CI behind NAT opens many).
    max_unauthenticated_per_source: int = 64
    # OpenSSH MaxStartups start:rate:full, with full = ssh.max_unauthenticated: from
    # startups_start unauthenticated connections on, new ones are dropped with a probability
    # rising from startups_rate % to 100 % at the full mark.
    startups_start: int = 200
    startups_rate: int = 30
    # Time a new connection gets to finish key exchange and ask to authenticate.
    kex_grace_seconds: float = 10.0
    # OpenSSH 9.8 PerSourcePenalties: seconds of penalty per failure kind; a source is refused
    # while its penalty exceeds penalty_min_seconds; repeat offenders get longer penalties.
    penalty_authfail_seconds: float = 5.0
    penalty_noauth_seconds: float = 1.0
    penalty_grace_exceeded_seconds: float = 10.0
    penalty_min_seconds: float = 15.0
    penalty_max_seconds: float = 600.0
    # Sources never penalized (the load balancer's health checks, the office NAT).
    penalty_exempt_cidrs: tuple[str, ...] = ()
    # Login names one connection may try (OpenSSH allows one); each is looked up once.
    max_login_names: int = 3
    # Audit rows of refused connections per source and minute; beyond it they are counted only.
    audit_refusals_per_minute: int = 30


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_seconds: float = 10.0
    # Session channels per shared upstream connection: the sandbox sshd's MaxSessions.
    # Restart: the upstream pool is created once, at start, with this and pool_idle_seconds.
    max_sessions_per_connection: int = field(default=10, metadata=RESTART)
    # Idle shared upstream connections close after this long.
    pool_idle_seconds: float = field(default=60.0, metadata=RESTART)
    # Shared upstream connections per sandbox: a sandbox carries at most this many x
    # max_sessions_per_connection channels (sessions and forwards) at once. Below the cap a
    # new upstream connection opens whenever the others are full.
    max_connections_per_sandbox: int = 32
    # Upstream connections per process, all sandboxes together; idle ones close to make room.
    max_connections_total: int = 1024
    # At its cap, a sandbox's next channel waits this long for a free slot, then is refused
    # (upstream_busy).
    lease_timeout_seconds: float = 10.0
    keepalive_interval_seconds: float = 30.0
    keepalive_count_max: int = 3
    # Upstream certificates (gateway/upstream/certificates.py): the gateway's user-CA private
    # key; each dedicated upstream connection (agent and remote forwarding) then presents a
    # certificate naming its user, so the sandbox's sshd logs who it is. "" = off. The key
    # files are read at start and on every reload.
    ca_key_file: str = ""
    # Validity of each certificate after it is made (it is also valid from 30 s before):
    # 30..300. sshd checks it at login only; a live connection outlives it.
    certificate_lifetime_seconds: int = 300
    # CA public keys, one per line: a sandbox host key in a host certificate signed by one of
    # them is trusted in addition to the keys pinned in its sandbox row. "" = pinned keys only.
    host_ca_keys_file: str = ""


@dataclass(frozen=True, slots=True)
class QuotasConfig:
    """After authentication: what one client connection, key or organization may hold
    (gateway/ssh/quotas.py). Sessions per connection are ssh.max_sessions_per_connection.
    Counts are per process (per worker with process.workers > 1)."""

    # Forwarding channels (ssh -L, -D, -W) open or being opened on one client connection.
    max_forwards_per_connection: int = 64
    # One client connection may hold at most this share of its sandbox's upstream capacity
    # (upstream.max_connections_per_sandbox x upstream.max_sessions_per_connection).
    upstream_share_percent: int = 25
    # Authenticated client connections open at once with one key, and in one organization.
    max_connections_per_key: int = 100
    max_connections_per_org: int = 1000


@dataclass(frozen=True, slots=True)
class ForwardingConfig:
    """What a client may forward (gateway/ssh/forwarding.py). Agent and remote forwardings run
    on an upstream connection of the client's own (never a shared one); X11 is always refused."""

    # ssh -A: the sandbox's ssh-agent requests reach the client's agent.
    agent: bool = True
    # ssh -R port forwardings (TCP listeners inside the sandbox, port 0 included).
    remote: bool = True
    # Unix sockets: ssh -L /local.sock:/remote.sock and ssh -R /remote.sock:/local.sock.
    streamlocal: bool = True
    # Remote forwardings (listeners) one client connection may hold at once.
    max_remote_per_connection: int = 16


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = field(default="127.0.0.1:8080", metadata=RESTART)
    enabled: bool = field(default=True, metadata=RESTART)
    # Restart: the API app is built once, at start.
    max_body_bytes: int = field(default=65536, metadata=RESTART)
    # Limits (keystore/api/limits.py), read at start like the rest of [api]. A source is one
    # IPv4 address or IPv6 /64 (admission.ipv4_prefix / ipv6_prefix, read at start here).
    # A request head (line + headers) must be complete this long after the connection opened
    # or the request's first byte; a keep-alive connection idle this long is closed; a JSON
    # body must have arrived this long after its handler started reading it.
    header_timeout_seconds: float = field(default=10.0, metadata=RESTART)
    idle_timeout_seconds: float = field(default=30.0, metadata=RESTART)
    body_timeout_seconds: float = field(default=30.0, metadata=RESTART)
    # Open connections per source; more are answered 429 too_many_connections and closed.
    max_connections_per_source: int = field(default=32, metadata=RESTART)
    # Unknown, malformed, expired or revoked API keys per source: a bucket of this many,
    # refilled at this rate; an empty one answers 429 too_many_invalid_keys with no lookup.
    invalid_key_burst: int = field(default=20, metadata=RESTART)
    invalid_key_per_second: float = field(default=1.0, metadata=RESTART)
    # Requests per valid API key: this many at once, refilled at this rate (429 rate_limited).
    key_rate_burst: int = field(default=100, metadata=RESTART)
    key_rate_per_second: float = field(default=20.0, metadata=RESTART)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # /metrics, /healthz and /readyz: on a listener of their own, loopback by default (not the
    # public API port); "" serves them on the API listener instead (api.enabled must be true).
    listen: str = field(default="127.0.0.1:9122", metadata=RESTART)


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    # 1 (one process, the default), N worker processes, or "auto" (one per usable core).
    workers: int | Auto = field(default=1, metadata=RESTART)
    # How long a worker may go without a heartbeat before the supervisor restarts it (the
    # supervisor reads its config once).
    worker_watchdog_seconds: float = field(default=30.0, metadata=RESTART)

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.workers)


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: str = field(default="/var/lib/runtools-gateway", metadata=RESTART)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = field(default="info", metadata=RESTART)
    format: LogFormat = field(default="json", metadata=RESTART)


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    # What a live connection may do while the access-change listener is down: "strict"
    # refuses new sessions and channels until a reconcile succeeded again; "best_effort"
    # lets them open on the per-channel database check alone.
    mode: RevocationMode = field(default="strict", metadata=RESTART)
    # The safety net: every live connection is re-checked this often, changes or not.
    reconcile_interval_seconds: float = field(default=60.0, metadata=RESTART)
    # Logins answer from an in-memory copy of a sandbox's keys and CAs while the listener is
    # up (every change drops the copy it concerns); a copy is refetched after this long at the
    # latest. 0 turns the cache off (every login queries the database).
    access_cache_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class WorkosConfig:
    """Members signed in through WorkOS (keystore/api/README.md); read by the API at start.
    With jwks_url and issuer unset, only API keys are accepted."""

    # Where AuthKit publishes its signing keys (https://api.workos.com/sso/jwks/<client id>).
    jwks_url: str = field(default="", metadata=RESTART)
    # The tokens' exact "iss" (https://api.workos.com/user_management/<client id>).
    issuer: str = field(default="", metadata=RESTART)
    # The webhook endpoint's secret; "" answers POST /v1/webhooks/workos with 404.
    webhook_secret: str = field(default="", metadata=RESTART)
    # What each role may do: "role=permission ...", permissions being API scopes or
    # ssh-key:write:own (keystore/roles.py).
    roles: tuple[str, ...] = field(default=DEFAULT_ROLES, metadata=RESTART)


@dataclass(frozen=True, slots=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    forwarding: ForwardingConfig = field(default_factory=ForwardingConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)
    workos: WorkosConfig = field(default_factory=WorkosConfig)

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
        for section_name, section_type in _type_hints(cls).items():
            given = raw.pop(section_name, {})
            if not isinstance(given, dict):
                raise ConfigError(section_name, "must be a table")
            values: dict[str, Any] = {}
            hints = _type_hints(section_type)
            for key, value in given.items():
                if key not in hints:
                    raise ConfigError(f"{section_name}.{key}", "unknown setting")
                values[key] = _convert(f"{section_name}.{key}", value, hints[key], False)
            for key, hint in hints.items():
                var = f"RTGW_{section_name}_{key}".upper()
                if var in env:
                    values[key] = _convert(var, env[var], hint, True)
            sections[section_name] = section_type(**values)
        if raw:
            raise ConfigError(next(iter(raw)), "unknown section")
        url = database_url_from_file(env)
        if url is not None:
            sections["database"] = dataclasses.replace(sections["database"], url=url)
        config = cls(**sections)
        config.validate()
        return config

    def validate(self) -> None:
        parse_listen(self.ssh.listen, "ssh.listen")
        parse_listen(self.api.listen, "api.listen")
        if not self.database.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("database.url", "must start with postgresql://")
        positive = {
            "admission.max_unauthenticated_per_source": (
                self.admission.max_unauthenticated_per_source
            ),
            "admission.kex_grace_seconds": self.admission.kex_grace_seconds,
            "admission.max_login_names": self.admission.max_login_names,
            "admission.audit_refusals_per_minute": self.admission.audit_refusals_per_minute,
            "revocation.reconcile_interval_seconds": self.revocation.reconcile_interval_seconds,
            "database.pool_min_size": self.database.pool_min_size,
            "database.pool_max_size": self.database.pool_max_size,
            "database.connect_timeout_seconds": self.database.connect_timeout_seconds,
            "database.command_timeout_seconds": self.database.command_timeout_seconds,
            "ssh.login_timeout_seconds": self.ssh.login_timeout_seconds,
            "ssh.max_auth_tries": self.ssh.max_auth_tries,
            "ssh.max_sessions_per_connection": self.ssh.max_sessions_per_connection,
            "ssh.max_unauthenticated": self.ssh.max_unauthenticated,
            "ssh.max_buffered_bytes": self.ssh.max_buffered_bytes,
            "upstream.connect_timeout_seconds": self.upstream.connect_timeout_seconds,
            "upstream.max_sessions_per_connection": self.upstream.max_sessions_per_connection,
            "upstream.max_connections_per_sandbox": self.upstream.max_connections_per_sandbox,
            "upstream.max_connections_total": self.upstream.max_connections_total,
            "upstream.lease_timeout_seconds": self.upstream.lease_timeout_seconds,
            "quotas.max_forwards_per_connection": self.quotas.max_forwards_per_connection,
            "quotas.upstream_share_percent": self.quotas.upstream_share_percent,
            "forwarding.max_remote_per_connection": self.forwarding.max_remote_per_connection,
            "quotas.max_connections_per_key": self.quotas.max_connections_per_key,
            "quotas.max_connections_per_org": self.quotas.max_connections_per_org,
            "api.max_body_bytes": self.api.max_body_bytes,
            "api.header_timeout_seconds": self.api.header_timeout_seconds,
            "api.idle_timeout_seconds": self.api.idle_timeout_seconds,
            "api.body_timeout_seconds": self.api.body_timeout_seconds,
            "api.max_connections_per_source": self.api.max_connections_per_source,
            "api.invalid_key_burst": self.api.invalid_key_burst,
            "api.invalid_key_per_second": self.api.invalid_key_per_second,
            "api.key_rate_burst": self.api.key_rate_burst,
            "api.key_rate_per_second": self.api.key_rate_per_second,
            "ssh.drain_timeout_seconds": self.ssh.drain_timeout_seconds,
            "ssh.proxy_header_timeout_seconds": self.ssh.proxy_header_timeout_seconds,
            "process.worker_watchdog_seconds": self.process.worker_watchdog_seconds,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(key, "must be greater than 0")
        lifetime = self.upstream.certificate_lifetime_seconds
        low, high = CERTIFICATE_LIFETIME_MIN_SECONDS, CERTIFICATE_LIFETIME_MAX_SECONDS
        if not low <= lifetime <= high:
            raise ConfigError(
                "upstream.certificate_lifetime_seconds",
                f"must be between {low} and {high} seconds (got {lifetime}): an upstream "
                "certificate is valid for at most 5 minutes",
            )
        if not 0 <= self.revocation.access_cache_seconds <= 3600:
            raise ConfigError(
                "revocation.access_cache_seconds", "must be between 0 (off) and 3600 seconds"
            )
        if self.quotas.upstream_share_percent > 100:
            raise ConfigError("quotas.upstream_share_percent", "must be at most 100")
        if self.database.pool_min_size > self.database.pool_max_size:
            raise ConfigError("database.pool_min_size", "must not exceed pool_max_size")
        for name, value, hint, _ in _settings(self):  # ssh.proxy_protocol, log.level, log.format
            if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
                raise ConfigError(name, f"must be {_either(typing.get_args(hint))}")
        if not self.state.dir:
            raise ConfigError("state.dir", "must not be empty")
        if self.metrics.listen:
            parse_listen(self.metrics.listen, "metrics.listen")
        for cidr in self.admission.penalty_exempt_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(
                    "admission.penalty_exempt_cidrs", f"{cidr!r} is not a CIDR"
                ) from exc
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
        auto = typing.get_args(Auto)
        if not (workers in auto or (isinstance(workers, int) and workers >= 1)):
            words = " or ".join(f'"{a}"' for a in auto)
            raise ConfigError(
                "process.workers", f"must be {words} or an integer >= 1 (got {workers!r})"
            )
        if self.process.worker_count() > 1 and parse_listen(self.ssh.listen, "ssh.listen")[1] == 0:
            raise ConfigError("ssh.listen", "needs a fixed port when process.workers is not 1")
        self._validate_workos()

    def _validate_workos(self) -> None:
        workos = self.workos
        if bool(workos.jwks_url) != bool(workos.issuer):
            missing = "workos.issuer" if workos.jwks_url else "workos.jwks_url"
            raise ConfigError(missing, "must be set together with the other of jwks_url/issuer")
        if workos.jwks_url:
            url = urllib.parse.urlsplit(workos.jwks_url)
            loopback = url.hostname in ("localhost", "::1") or str(url.hostname).startswith("127.")
            if not url.hostname or not (
                url.scheme == "https" or (url.scheme == "http" and loopback)
            ):
                raise ConfigError(
                    "workos.jwks_url", "must be an https:// URL (http:// only to loopback)"
                )
        try:
            parse_roles(workos.roles)
        except ValueError as exc:
            raise ConfigError("workos.roles", str(exc)) from exc

    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.ssh.proxy_trusted_cidrs]


DATABASE_URL_FILE_ENV = "RTGW_DATABASE_URL_FILE"
DATABASE_URL_CREDENTIAL = "database-url"  # systemd LoadCredential=database-url:/path


def database_url_from_file(env: Mapping[str, str]) -> str | None:
    """The database URL (password included) from a file, kept out of the environment and the
    config file: ``$RTGW_DATABASE_URL_FILE``, else the systemd credential
    ``$CREDENTIALS_DIRECTORY/database-url`` when it exists; None when neither applies.
    ``RTGW_DATABASE_URL`` together with ``RTGW_DATABASE_URL_FILE`` is an error; with a
    credential, the variable wins (it is the more explicit of the two)."""
    path_text = env.get(DATABASE_URL_FILE_ENV, "")
    key = DATABASE_URL_FILE_ENV
    if path_text:
        if "RTGW_DATABASE_URL" in env:
            raise ConfigError(key, "set either RTGW_DATABASE_URL or RTGW_DATABASE_URL_FILE")
        path = Path(path_text)
    elif env.get("CREDENTIALS_DIRECTORY") and "RTGW_DATABASE_URL" not in env:
        path = Path(env["CREDENTIALS_DIRECTORY"]) / DATABASE_URL_CREDENTIAL
        key = f"credential {DATABASE_URL_CREDENTIAL}"
        if not path.is_file():
            return None
    else:
        return None
    try:
        url = path.read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
    if not url:
        raise ConfigError(key, f"{path} is empty")
    return url


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


def restart_required_changes(old: Config, new: Config) -> list[str]:
    """Dotted names of the ``RESTART`` settings whose value ``new`` changes."""
    return [
        name
        for (name, before, _, fld), (_, after, _, _) in zip(
            _settings(old), _settings(new), strict=True
        )
        if fld.metadata.get("restart") and before != after
    ]


def restart_settings() -> list[str]:
    """Dotted names of every setting that needs a restart to change."""
    defaults = Config()
    return [name for name, _, _, fld in _settings(defaults) if fld.metadata.get("restart")]


def _type_hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (they are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def _settings(config: Config) -> Iterator[tuple[str, Any, Any, dataclasses.Field[Any]]]:
    """Every setting as (``section.key``, value, type, dataclass field), in declaration order."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = _type_hints(type(values))
        for fld in dataclasses.fields(values):
            yield f"{section.name}.{fld.name}", getattr(values, fld.name), hints[fld.name], fld


def _either(choices: tuple[Any, ...]) -> str:
    """``a, b or c``."""
    words = [str(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _is_union(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union


def _convert(key: str, value: Any, kind: Any, from_env: bool) -> Any:
    if typing.get_origin(kind) is Literal:  # the choices are checked by Config.validate()
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string (got {value!r})")
        return value
    args = typing.get_args(kind) if _is_union(kind) else ()
    if int in args and any(typing.get_origin(a) is Literal for a in args):  # workers: 4, "auto"
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
    if _is_union(kind):
        kind = next(a for a in args if a is not type(None))
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
