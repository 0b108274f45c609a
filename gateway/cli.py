"""``runtools-gateway`` subcommands: thin wrappers over the gateway and keystore packages.

Every command reads the same Config (``--config FILE`` plus ``RTGW_*`` variables). Errors print
one line to stderr, saying what to do, and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.daemon import logs
from gateway.errors import GatewayError
from gateway.ssh import hostkeys
from keystore import db as keystore_db
from keystore import keys as keyparse
from keystore import orgs, sandboxes, ssh_keys
from keystore.errors import KeystoreError
from keystore.migrate import migrate
from keystore.models import CLI


def _config(args: argparse.Namespace) -> Config:
    return Config.load(getattr(args, "config", None))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def cmd_serve(args: argparse.Namespace) -> int:
    """The entry point wires the parts: a supervisor of workers, or one gateway in-process."""
    from gateway import asyncssh_patches
    from gateway.daemon import sockets

    config = _config(args)
    path = getattr(args, "config", None)
    logs.configure(config.log.level, config.log.format)
    # Before any SSH: refuses an unverified asyncssh (IncompatibleLibrary, exit 1). Workers run
    # this command too; the supervisor checks first, so a bad install fails before spawning.
    asyncssh_patches.apply()
    if not sockets.is_worker() and config.process.worker_count() > 1:
        from gateway.daemon.supervisor import Supervisor

        return await Supervisor(config, path).run()
    from gateway.daemon.lifecycle import Gateway

    await Gateway(config, path).run()
    return 0


async def cmd_audit_tail(args: argparse.Namespace) -> int:
    from gateway.audit.tail import tail

    return await tail(
        _config(args), org_slug=args.org, follow=args.follow, lines=args.lines, as_json=args.json
    )


async def cmd_migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        applied = await migrate(conn)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _workos_note(org: Any) -> str:
    return f"; WorkOS organization {org.workos_org_id}" if org.workos_org_id else ""


async def cmd_org_create(args: argparse.Namespace) -> int:
    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.create_org(conn, args.slug, args.name, workos_org_id=args.workos_org_id)
    print(f"created organization {org.slug} ({org.id}){_workos_note(org)}")
    return 0


async def cmd_org_update(args: argparse.Namespace) -> int:
    """Map (or unmap) an organization to the WorkOS organization whose members act for it."""
    config = _config(args)
    if args.workos_org_id is None and not args.no_workos_org_id:
        raise GatewayError("nothing to update: give --workos-org-id ORG_ID or --no-workos-org-id")
    workos_org_id = None if args.no_workos_org_id else args.workos_org_id
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.set_workos_org_id(conn, args.slug, workos_org_id)
    mapped = _workos_note(org) or "; no WorkOS organization"
    print(f"updated organization {org.slug} ({org.id}){mapped}")
    return 0


async def cmd_sandbox_add(args: argparse.Namespace) -> int:
    config = _config(args)
    host_keys = []
    for line in args.host_key:
        try:
            host_keys.append(keyparse.parse_public_key(line).public_key)
        except KeystoreError as exc:
            raise KeystoreError(f"--host-key: {exc}") from exc
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        project = await orgs.get_project(conn, org.id, args.project)
        await sandboxes.add_sandbox(
            conn,
            sandbox_id=args.id,
            org_id=org.id,
            project_id=project.id,
            upstream_host=args.host,
            upstream_port=args.port,
            login_user=args.user,
            host_keys=host_keys,
            status=args.status,
            host_ca=args.host_ca,
        )
    print(f"added {args.id} to {org.slug} -> {args.user}@{args.host}:{args.port}")
    return 0


async def cmd_sandbox_set_status(args: argparse.Namespace) -> int:
    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        sandboxes.check_sandbox_id(args.id)
        org_id = await sandboxes.find_org_of_sandbox(conn, args.id)
        await sandboxes.set_status(conn, org_id, args.id, args.status)
    print(f"{args.id} is now {args.status}")
    return 0


async def cmd_sandbox_list(args: argparse.Namespace) -> int:
    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        rows = await sandboxes.list_sandboxes(conn, org.id)
    for s in rows:
        print(f"{s.id}\t{s.status}\t{s.login_user}@{s.upstream_host}:{s.upstream_port}")
    return 0


async def cmd_ssh_key_add(args: argparse.Namespace) -> int:
    config = _config(args)
    path = Path(args.file)
    try:
        if path.stat().st_size > keyparse.MAX_PUBLIC_KEY_CHARS:
            text = "x" * (keyparse.MAX_PUBLIC_KEY_CHARS + 1)
        else:
            text = path.read_text("utf-8", errors="replace")
    except OSError as exc:
        raise GatewayError(f"cannot read {args.file}: {exc.strerror}") from exc
    parsed = keyparse.parse_public_key(text)
    name = args.name or parsed.comment or path.name
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        project = await orgs.get_project(conn, org.id, args.project)
        key = await ssh_keys.add_key(
            conn, org_id=org.id, project_id=project.id, key=parsed, name=name, created_by=CLI
        )
    print(key.fingerprint)
    print(
        f"registered {key.algorithm} {key.bits} bits as {key.name!r} (id {key.id})", file=sys.stderr
    )
    return 0


async def cmd_ssh_key_list(args: argparse.Namespace) -> int:
    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        keys = await ssh_keys.list_keys(conn, org.id, include_revoked=args.all, limit=10000)
    for k in keys:
        state = "revoked" if k.revoked_at else "active"
        used = k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "never"
        by = f"{k.created_by_type}:{k.created_by}" if k.created_by_type else "unknown"
        print(
            f"{k.id}\t{k.fingerprint}\t{k.algorithm}\t{k.bits}\t{k.name}\t{state}\t"
            f"last used {used}\tcreated by {by}"
        )
    return 0


async def cmd_ssh_key_revoke(args: argparse.Namespace) -> int:
    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        key = await ssh_keys.revoke_key(conn, org.id, args.key)
    print(f"revoked {key.fingerprint} ({key.name})")
    return 0


def _read_public_key(name: str) -> str:
    """A public key file's text, or stdin's for ``-``; more than the key size cap is cut so
    that the parser refuses it as too large without reading a huge file."""
    limit = keyparse.MAX_PUBLIC_KEY_CHARS + 1
    if name == "-":
        return sys.stdin.read(limit)
    try:
        with open(name, encoding="utf-8", errors="replace") as file:
            return file.read(limit)
    except OSError as exc:
        raise GatewayError(f"cannot read {name}: {exc.strerror}") from exc


def _ca_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise GatewayError(
            f"{text[:80]!r} is not a CA id: give the id (a UUID) that ssh-ca list prints"
        ) from None


async def _audit_cli(
    conn: Any, org_id: uuid.UUID, action: str, target: str, details: dict[str, Any]
) -> None:
    from keystore import audit_events
    from keystore.audit_events import AuditEvent

    event = AuditEvent(
        action=action, result="ok", org_id=org_id, actor="cli", target=target, details=details
    )
    await audit_events.insert_many(conn, [event])


async def cmd_ssh_ca_add(args: argparse.Namespace) -> int:
    """Register a certificate authority: its id on stdout, what it is on stderr."""
    from keystore import cert_authorities as cas

    config = _config(args)
    text = _read_public_key(args.file)
    # Everything is checked before the database is asked.
    cas.parse_ca_key(text)
    cas.check_name(args.name)
    cas.check_principals(args.principal or ())
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        ca = await cas.add_ca(
            conn,
            org.id,
            public_key_line=text,
            name=args.name,
            principals=args.principal or (),
            creator=CLI,
        )
        await _audit_cli(
            conn,
            org.id,
            "cli.ssh_ca.create",
            str(ca.id),
            {"fingerprint": ca.fingerprint, "name": ca.name, "principals": list(ca.principals)},
        )
    print(ca.id)
    principals = ", ".join(ca.principals) or "none besides the sandbox id"
    print(
        f"registered certificate authority {ca.name!r} for {org.slug}: {ca.algorithm} "
        f"{ca.bits} bits, {ca.fingerprint}; extra principals: {principals}",
        file=sys.stderr,
    )
    return 0


async def cmd_ssh_ca_list(args: argparse.Namespace) -> int:
    from keystore import cert_authorities as cas

    config = _config(args)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        rows = await cas.list_cas(conn, org.id, include_revoked=args.all, limit=10000)
    for ca in rows:
        state = "revoked" if ca.revoked_at else "active"
        by = f"{ca.created_by_type}:{ca.created_by}" if ca.created_by_type else "unknown"
        print(
            f"{ca.id}\t{ca.fingerprint}\t{ca.algorithm}\t{ca.bits}\t{ca.name}\t{state}\t"
            f"principals {','.join(ca.principals) or '-'}\tcreated by {by}"
        )
    return 0


async def cmd_ssh_ca_revoke(args: argparse.Namespace) -> int:
    from keystore import cert_authorities as cas

    config = _config(args)
    ca_id = _ca_id(args.ca_id)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        ca = await cas.revoke_ca(conn, org.id, ca_id)
        await _audit_cli(
            conn, org.id, "cli.ssh_ca.revoke", str(ca.id), {"fingerprint": ca.fingerprint}
        )
    print(f"revoked certificate authority {ca.fingerprint} ({ca.name})")
    return 0


async def cmd_ssh_ca_revoke_cert(args: argparse.Namespace) -> int:
    """Revoke a CA's certificates by key id or serial: the revocation's id on stdout."""
    from keystore import cert_authorities as cas

    config = _config(args)
    ca_id = _ca_id(args.ca_id)
    cas.check_revocation_target(args.key_id, args.serial)
    cas.check_reason(args.reason)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        revocation = await cas.revoke_certificate(
            conn,
            org.id,
            ca_id,
            cert_key_id=args.key_id,
            serial=args.serial,
            reason=args.reason,
            creator=CLI,
        )
        what = (
            f"key id {revocation.cert_key_id!r}"
            if revocation.cert_key_id is not None
            else f"serial {revocation.serial}"
        )
        await _audit_cli(
            conn,
            org.id,
            "cli.ssh_ca.revoke_certificate",
            str(ca_id),
            {"revocation_id": str(revocation.id), "revoked": what},
        )
    print(revocation.id)
    print(f"revoked the certificates with {what} signed by CA {ca_id}", file=sys.stderr)
    return 0


async def cmd_ssh_ca_revocations(args: argparse.Namespace) -> int:
    from keystore import cert_authorities as cas

    config = _config(args)
    ca_id = _ca_id(args.ca_id)
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        rows = await cas.list_revocations(conn, org.id, ca_id, limit=100000)
    for r in rows:
        what = f"key-id {r.cert_key_id}" if r.cert_key_id is not None else f"serial {r.serial}"
        by = f"{r.created_by_type}:{r.created_by}" if r.created_by_type else "unknown"
        print(
            f"{r.id}\t{what}\t{r.created_at.isoformat(timespec='seconds')}\t"
            f"created by {by}\t{r.reason or ''}"
        )
    return 0


async def cmd_api_key_create(args: argparse.Namespace) -> int:
    """The org's first API key: the secret alone on stdout (once), what it is on stderr."""
    from keystore import api_keys, audit_events, tokens
    from keystore.audit_events import AuditEvent

    config = _config(args)
    scopes = tokens.validate_scopes(args.scope)
    expires_in = tokens.parse_duration(args.expires_in) if args.expires_in else None
    async with keystore_db.connect(config.database.url) as conn:
        org = await orgs.get_org(conn, args.org)
        created = await api_keys.create_key(
            conn,
            org_id=org.id,
            name=args.name,
            scopes=scopes,
            environment="test" if args.test else "live",
            expires_in=expires_in,
            created_by=CLI,
        )
        await audit_events.insert_many(
            conn,
            [
                AuditEvent(
                    action="cli.api_key.create",
                    result="ok",
                    org_id=org.id,
                    actor="cli",
                    target=str(created.key.id),
                    details={"name": created.key.name, "scopes": list(scopes)},
                )
            ],
        )
    key = created.key
    print(created.secret)
    expiry = key.expires_at.isoformat(timespec="seconds") if key.expires_at else "never"
    print(
        f"created API key {key.name!r} (id {key.id}) for {org.slug}: scopes "
        f"{', '.join(key.scopes)}; expires {expiry}. The key above is shown only this once.",
        file=sys.stderr,
    )
    return 0


async def cmd_upstream_key(args: argparse.Namespace) -> int:
    config = _config(args)
    key = hostkeys.load_upstream_key(config.state.dir)
    print(hostkeys.public_line(key))
    return 0


async def cmd_upstream_ca(args: argparse.Namespace) -> int:
    """The user CA of upstream certificates: its TrustedUserCAKeys line (stdout) and the
    sandbox's sshd_config lines (stderr, or stdout with --sshd-config); --generate makes one."""
    from gateway.upstream import certificates

    if args.generate:
        try:
            key = certificates.generate_ca_key(args.generate)
        except FileExistsError:
            print(f"runtools-gateway: {args.generate} exists; not overwritten", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"runtools-gateway: cannot write {args.generate}: {exc}", file=sys.stderr)
            return 1
        print(certificates.public_line(key))
        print(
            f"created the upstream CA key {args.generate} (mode 0600) and {args.generate}.pub; "
            f"set upstream.ca_key_file = {str(args.generate)!r} and reload",
            file=sys.stderr,
        )
        return 0
    if args.sshd_config:
        print("\n".join(certificates.sshd_config_lines()))
        return 0
    path = _config(args).upstream.ca_key_file
    if not path:
        print(
            "runtools-gateway: upstream.ca_key_file is not set: create a CA key with "
            "`runtools-gateway upstream-ca --generate PATH` and set it",
            file=sys.stderr,
        )
        return 1
    try:
        key = certificates.read_ca_key(path)
    except certificates.CaKeyError as exc:
        print(f"runtools-gateway: upstream.ca_key_file: {exc}", file=sys.stderr)
        return 1
    print(certificates.public_line(key))
    print(
        f"# Put the line above in the sandbox image's {certificates.TRUSTED_CA_PATH}, and in "
        "its sshd_config (runtools-gateway upstream-ca --sshd-config prints these):\n"
        + "\n".join(certificates.sshd_config_lines()),
        file=sys.stderr,
    )
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    """The demo lives in gateway.lab, which the wheel leaves out (see gateway/lab/__init__.py)."""
    try:
        from gateway.lab.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("gateway.lab", "gateway.lab.demo"):
            raise
        print(
            "runtools-gateway demo: the demo runs from a source checkout: bash scripts/demo",
            file=sys.stderr,
        )
        return 1
    from gateway import asyncssh_patches

    asyncssh_patches.apply()  # the demo runs the gateway in this process
    return await run_demo(ssh_port=args.port, key_file=args.key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runtools-gateway", description="SSH access gateway for runtools sandboxes."
    )
    parser.add_argument("--config", help="TOML config file (RTGW_* variables override it)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], Awaitable[int]],
        help_: str,
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the gateway (SSH listener and key API)")
    add("migrate", cmd_migrate, "apply pending database migrations")
    add(
        "upstream-key",
        cmd_upstream_key,
        "print the public key sandboxes must trust (creates it on first use)",
    )
    p = add(
        "upstream-ca",
        cmd_upstream_ca,
        "print the upstream certificate CA's line sandboxes trust (TrustedUserCAKeys)",
    )
    p.add_argument(
        "--sshd-config", action="store_true", help="print the sandbox's sshd_config lines instead"
    )
    p.add_argument(
        "--generate", metavar="PATH", help="create a new ed25519 CA key at PATH (mode 0600)"
    )
    demo = add("demo", cmd_demo, "run a self-contained demo: Postgres, a sandbox and the gateway")
    demo.add_argument("--port", type=int, default=2222, help="SSH port for the demo gateway")
    demo.add_argument("--key", help="public key file to register (default: ~/.ssh/*.pub)")

    org = sub.add_parser("org", help="organizations").add_subparsers(dest="sub", required=True)
    p = add("create", cmd_org_create, "create an organization", org)
    p.add_argument("slug")
    p.add_argument("--name")
    p.add_argument(
        "--workos-org-id",
        metavar="ORG_ID",
        help="the WorkOS organization (org_...) whose members' session tokens act for it",
    )
    p = add("update", cmd_org_update, "map an organization to its WorkOS organization", org)
    p.add_argument("slug")
    mapping = p.add_mutually_exclusive_group()
    mapping.add_argument("--workos-org-id", metavar="ORG_ID", help="the WorkOS organization")
    mapping.add_argument(
        "--no-workos-org-id", action="store_true", help="remove the WorkOS mapping"
    )

    sb = sub.add_parser("sandbox", help="sandboxes").add_subparsers(dest="sub", required=True)
    p = add("add", cmd_sandbox_add, "register a sandbox's SSH endpoint", sb)
    p.add_argument("id", help="sandbox-<id>")
    p.add_argument("--org", required=True)
    p.add_argument("--project", help="project slug (default: the org's default project)")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True, help="login user inside the sandbox")
    p.add_argument(
        "--host-key",
        action="append",
        default=[],
        help='pinned host key "ssh-ed25519 AAAA..." (repeatable; needed unless --host-ca)',
    )
    p.add_argument(
        "--host-ca",
        action="store_true",
        help="no pin needed: the host key is trusted through upstream.host_ca_keys_file",
    )
    p.add_argument("--status", choices=sandboxes.STATUSES, default="running")
    p = add("set-status", cmd_sandbox_set_status, "mark a sandbox running or stopped", sb)
    p.add_argument("id")
    p.add_argument("status", choices=sandboxes.STATUSES)
    p = add("list", cmd_sandbox_list, "list an organization's sandboxes", sb)
    p.add_argument("--org", required=True)

    from gateway.audit.tail import add_parser as add_audit_parser

    add_audit_parser(sub, cmd_audit_tail)

    keys = sub.add_parser("ssh-key", help="SSH keys").add_subparsers(dest="sub", required=True)
    p = add("add", cmd_ssh_key_add, "register a public key for an organization", keys)
    p.add_argument("file", help="public key file (id_ed25519.pub)")
    p.add_argument("--org", required=True)
    p.add_argument("--name")
    p.add_argument("--project")
    p = add("list", cmd_ssh_key_list, "list an organization's keys", keys)
    p.add_argument("--org", required=True)
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p = add("revoke", cmd_ssh_key_revoke, "revoke a key by id or SHA256: fingerprint", keys)
    p.add_argument("key", metavar="FINGERPRINT_OR_ID")
    p.add_argument("--org", required=True)

    ca = sub.add_parser("ssh-ca", help="SSH certificate authorities").add_subparsers(
        dest="sub", required=True
    )
    p = add("add", cmd_ssh_ca_add, "register a user certificate authority's public key", ca)
    p.add_argument(
        "file", metavar="PUBKEY_FILE", help="the CA's public key (ca.pub), or - for stdin"
    )
    p.add_argument("--org", required=True)
    p.add_argument("--name", required=True)
    p.add_argument(
        "--principal",
        action="append",
        help="a principal certificates may name besides the sandbox id (repeatable)",
    )
    p = add("list", cmd_ssh_ca_list, "list an organization's certificate authorities", ca)
    p.add_argument("--org", required=True)
    p.add_argument("--all", action="store_true", help="include revoked CAs")
    p = add("revoke", cmd_ssh_ca_revoke, "revoke a certificate authority", ca)
    p.add_argument("ca_id", metavar="CA_ID")
    p.add_argument("--org", required=True)
    p = add("revoke-cert", cmd_ssh_ca_revoke_cert, "revoke certificates a CA signed", ca)
    p.add_argument("ca_id", metavar="CA_ID")
    p.add_argument("--org", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key-id", help="the certificate's key id (ssh-keygen -I)")
    which.add_argument("--serial", type=int, help="the certificate's serial (ssh-keygen -z)")
    p.add_argument("--reason")
    p = add("revocations", cmd_ssh_ca_revocations, "list the certificates a CA revoked", ca)
    p.add_argument("ca_id", metavar="CA_ID")
    p.add_argument("--org", required=True)

    ak = sub.add_parser("api-key", help="API keys").add_subparsers(dest="sub", required=True)
    p = add("create", cmd_api_key_create, "create an API key; prints the secret once", ak)
    p.add_argument("--org", required=True)
    p.add_argument("--name", required=True)
    p.add_argument(
        "--scope", action="append", required=True, help="ssh-key:*, ssh-key:read, api-key:*, *"
    )
    p.add_argument("--test", action="store_true", help="an rt_test_ key instead of rt_live_")
    p.add_argument("--expires-in", help="e.g. 90d, 12h, 2w (default: never)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = asyncio.run(args.func(args))
        return code
    except (KeystoreError, GatewayError) as exc:
        print(f"runtools-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
