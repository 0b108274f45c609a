"""Every message a user can see, each with a stable reason code.

The reason code goes into logs, audit rows and metrics; the text goes to the user's terminal
(auth banner before login, one stderr line after). Texts say what happened and what to do next,
and never reveal whether a sandbox exists to someone who has not authenticated.

| code                        | when                                                    | exit |
|-----------------------------|---------------------------------------------------------|------|
| key_not_registered          | offered key is not registered for the sandbox's org,     |  -   |
|                             | or the sandbox does not exist (same text, on purpose)   |      |
| invalid_login_name          | login name is not sandbox-<id>                          |  -   |
| too_many_auth_failures      | more failed attempts than ssh.max_auth_tries (any       |  -   |
|                             | method or reason; the first 'none' probe excepted)      |      |
| too_many_login_names        | more than admission.max_login_names names on one conn.  |  -   |
| keystore_unavailable        | the database did not answer; login refused (fail closed)|  -   |
| sandbox_stopped             | authenticated, but the sandbox is stopped               | 255  |
| upstream_unreachable        | the sandbox's SSH endpoint could not be reached (no     | 255  |
|                             | answer in time, refused, reset: said which)             |      |
| upstream_host_key_mismatch  | the sandbox presented a host key that is not pinned     | 255  |
| upstream_auth_failed        | the sandbox refused the gateway's upstream identity     | 255  |
| upstream_refused            | the sandbox refused the session or channel request      | 255  |
| too_many_sessions           | more sessions than ssh.max_sessions_per_connection on   | 255  |
|                             | one connection (the session opens, says so and exits)   |      |
| too_many_forwards           | more forwarding channels (-L/-D/-W) than quotas.        |  -   |
|                             | max_forwards_per_connection (channel open failure)      |      |
| upstream_share_exceeded     | one connection would hold more than quotas.             | 255  |
|                             | upstream_share_percent of its sandbox's upstream slots  |      |
| upstream_busy               | every upstream slot of the sandbox is in use and none   | 255  |
|                             | came free within upstream.lease_timeout_seconds         |      |
| too_many_connections_per_key| quotas.max_connections_per_key connections with this key|  -   |
|                             | are open; the new one is disconnected after auth        |      |
| too_many_connections_per_org| quotas.max_connections_per_org connections of the org   |  -   |
|                             | are open; the new one is disconnected after auth        |      |
| gateway_draining            | the gateway is restarting                                |  -   |
| access_ended                | the key (or certificate, or its CA) was revoked/expired/| 255  |
|                             | deleted, or the sandbox                                 |      |
|                             | stopped/deleted/moved, or the org removed (live session) |      |
| revocation_unverified       | revocation.mode=strict and the change listener is down: |  -   |
|                             | new channels on live connections are refused            |      |
| forwarding_disabled         | -A, -R or a Unix-socket forwarding switched off in      |  -   |
|                             | [forwarding] (open failure, or one stderr line)         |      |
| x11_refused                 | ssh -X/-Y: X11 is never relayed (one stderr line)       |  -   |
| too_many_remote_forwards    | forwarding.max_remote_per_connection listeners held     |  -   |
| env_too_large               | the session's environment (ssh SendEnv/SetEnv) is over  | 255  |
|                             | 128 variables or 128 KiB; up to that it passes whole    |      |
| unknown_subsystem           | the sandbox's sshd has no such subsystem                | 255  |
| buffer_budget_exhausted     | ssh.max_buffered_bytes reserved by open channels; a new | 255  |
|                             | session (or forwarding channel: open failure) refused   |      |

Codes that only logs, audit rows and metrics carry (the user sees a closed connection or the
key_not_registered banner):

| code                        | when                                                    |
|-----------------------------|---------------------------------------------------------|
| unknown_sandbox             | no such sandbox (shown to the user as key_not_registered)|
| too_many_unauthenticated    | ssh.max_unauthenticated reached; connection dropped     |
| too_many_unauthenticated_from_source | admission.max_unauthenticated_per_source reached |
| startups_random_drop        | random early drop between startups_start and the full mark |
| source_penalized            | the source's failures earned it a penalty (PerSourcePenalties) |
| kex_grace_exceeded          | no key exchange within admission.kex_grace_seconds      |
| rsa_too_large, rsa_bad_exponent, rsa_too_small | a hostile or weak RSA key offered at login |
| certificate_unknown_ca      | a certificate signed by no CA of the sandbox's organization |
| certificate_expired, certificate_not_yet_valid | a certificate outside its validity window |
| certificate_no_principals   | a certificate naming no principal (valid for anyone: refused) |
| certificate_wrong_principal | a certificate naming neither the sandbox id nor one of  |
|                             | the principals its CA was registered with               |
| certificate_revoked         | the CA revoked the certificate's key id or serial      |
| certificate_principal_removed | live: the CA no longer has the principal the        |
|                             | certificate was let in by                               |
| certificate_not_user        | a host certificate offered as a user's                 |
| certificate_sha1_signature  | the CA signed the certificate with ssh-rsa (SHA-1)      |
| proxy_header_untrusted      | a PROXY header from outside ssh.proxy_trusted_cidrs     |
| proxy_untrusted_source      | proxy_protocol=required and the source is not trusted   |
| proxy_header_missing        | proxy_protocol=required and no header came              |
| proxy_header_invalid        | a malformed PROXY v1/v2 header                          |
| proxy_header_timeout        | no complete header within ssh.proxy_header_timeout_seconds |

Audit actions: ssh.auth (every offered key: ok, or refused with a code), ssh.session.start,
ssh.session.end (bytes each way, duration, exit status or signal; result error with a code
when the gateway ended it).
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit status for failures of the gateway itself, as OpenSSH's ssh uses for its own errors.
GATEWAY_EXIT_STATUS = 255


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    text: str

    def render(self, **values: object) -> str:
        return "runtools: " + self.text.format(**values)


KEY_NOT_REGISTERED = Reason(
    "key_not_registered",
    "none of the keys you offered is registered for this sandbox's organization.\n"
    "If your login is refused: check the sandbox id, then register your public key with\n"
    "  {hint}\nand connect again.",
)
INVALID_LOGIN_NAME = Reason(
    "invalid_login_name",
    "'{login}' is not a sandbox login. Connect as sandbox-<id>, e.g. ssh sandbox-abc123@<gateway>.",
)
TOO_MANY_AUTH_FAILURES = Reason(
    "too_many_auth_failures",
    "too many keys refused. Register your key ({hint}) or pick it with "
    "ssh -i ~/.ssh/KEY -o IdentitiesOnly=yes.",
)
KEYSTORE_UNAVAILABLE = Reason(
    "keystore_unavailable",
    "the gateway cannot check keys right now, so it refuses all logins. "
    "Try again in a minute; if it persists, check status.runtools.ai.",
)
SANDBOX_STOPPED = Reason(
    "sandbox_stopped",
    "{sandbox} is stopped. Start it (runtools sandbox start {sandbox}) and connect again.",
)
UPSTREAM_UNREACHABLE = Reason(
    "upstream_unreachable",
    "{sandbox} could not be reached ({detail}). It may be starting or overloaded; "
    "try again in a minute (connection id {conn_id}).",
)
UPSTREAM_HOST_KEY_MISMATCH = Reason(
    "upstream_host_key_mismatch",
    "{sandbox} presented an unexpected host key, so the gateway refused to connect you. "
    "Contact support with connection id {conn_id}.",
)
UPSTREAM_AUTH_FAILED = Reason(
    "upstream_auth_failed",
    "{sandbox} refused the gateway's login. The sandbox image must trust the gateway's "
    "upstream key; contact support with connection id {conn_id}.",
)
UPSTREAM_REFUSED = Reason(
    "upstream_refused",
    "{sandbox} refused the request ({detail}). Try again; if it persists, contact support "
    "with connection id {conn_id}.",
)
TOO_MANY_LOGIN_NAMES = Reason(
    "too_many_login_names",
    "too many login names on one connection. Connect again as the one sandbox you want "
    "(ssh sandbox-<id>@<gateway>).",
)
TOO_MANY_SESSIONS = Reason(
    "too_many_sessions",
    "too many sessions on one connection (limit {limit}). Close some or open a new connection.",
)
TOO_MANY_FORWARDS = Reason(
    "too_many_forwards",
    "too many forwarded connections on one SSH connection (limit {limit}). Close some, or "
    "open another SSH connection for more.",
)
UPSTREAM_SHARE_EXCEEDED = Reason(
    "upstream_share_exceeded",
    "this connection already holds {limit} of the {capacity} channels the gateway opens to "
    "{sandbox}, its fair share. Close some sessions or forwarded connections and try again.",
)
UPSTREAM_BUSY = Reason(
    "upstream_busy",
    "all {capacity} channels the gateway may open to {sandbox} are in use and none came free "
    "within {seconds:g} s. Close sessions or forwarded connections you no longer need and try "
    "again (connection id {conn_id}).",
)
TOO_MANY_CONNECTIONS_PER_KEY = Reason(
    "too_many_connections_per_key",
    "this key already has {limit} connections open through the gateway. Close some, or run "
    "several sessions over one connection (ssh -o ControlMaster=auto -o "
    "ControlPath=~/.ssh/cm-%r@%h:%p -o ControlPersist=60), and connect again.",
)
TOO_MANY_CONNECTIONS_PER_ORG = Reason(
    "too_many_connections_per_org",
    "your organization already has {limit} connections open through the gateway. Close "
    "some and connect again; if you need more, ask your organization's owner to contact "
    "support.",
)
GATEWAY_DRAINING = Reason(
    "gateway_draining",
    "the gateway is restarting; your session will end in {seconds:g} s. Reconnect to continue.",
)
ACCESS_ENDED = Reason(
    "access_ended",
    "your access to {sandbox} ended: {what}. This session was closed; {next}",
)
REVOCATION_UNVERIFIED = Reason(
    "revocation_unverified",
    "the gateway cannot confirm right now that your key is still valid, so it opens no new "
    "session on this connection. Reconnect in a minute (connection id {conn_id}).",
)
ENV_TOO_LARGE = Reason(
    "env_too_large",
    "the session's environment is too large ({detail}), so the gateway refused the session. "
    "Send fewer or smaller variables (ssh SendEnv/SetEnv).",
)
UNKNOWN_SUBSYSTEM = Reason(
    "unknown_subsystem",
    "the sandbox has no '{name}' subsystem (its sshd refused the request).",
)
BUFFER_BUDGET_EXHAUSTED = Reason(
    "buffer_budget_exhausted",
    "the gateway is relaying as much data as it can hold right now, so it opened no new "
    "{what}. Try again in a minute.",
)
FORWARDING_DISABLED = Reason(
    "forwarding_disabled",
    "{what} is turned off on this gateway, so it was refused.",
)
X11_REFUSED = Reason(
    "x11_refused",
    "X11 forwarding is not available through this gateway; the session goes on without it.",
)
TOO_MANY_REMOTE_FORWARDS = Reason(
    "too_many_remote_forwards",
    "this connection already holds {limit} remote forwardings (ssh -R); cancel one first.",
)

# What ended access (keystore/access.py reasons) -> (what happened, what to do next).
_ACCESS_ENDED_BECAUSE = {
    "key_revoked": ("the SSH key {key} was revoked", "register a current key ({hint})."),
    "key_expired": ("the SSH key {key} expired", "register a current key ({hint})."),
    "key_deleted": ("the SSH key {key} was removed", "register a current key ({hint})."),
    "certificate_revoked": (
        "your certificate (key {key}) was revoked",
        "ask your certificate authority for a new one, or register a key ({hint}).",
    ),
    "certificate_principal_removed": (
        "the certificate authority that signed your certificate no longer grants its "
        "principal here",
        "ask your certificate authority for a certificate naming {sandbox}, or register a key "
        "({hint}).",
    ),
    "ca_revoked": (
        "the certificate authority that signed your certificate was revoked",
        "get a certificate from a current authority, or register a key ({hint}).",
    ),
    "ca_deleted": (
        "the certificate authority that signed your certificate was removed",
        "get a certificate from a current authority, or register a key ({hint}).",
    ),
    "sandbox_stopped": (
        "{sandbox} was stopped",
        "start it (runtools sandbox start {sandbox}) and connect again.",
    ),
    "sandbox_deleted": ("{sandbox} was deleted", "check the sandbox id."),
    "sandbox_moved": (
        "{sandbox} now belongs to another organization",
        "ask its new organization for access.",
    ),
    "sandbox_target_changed": ("{sandbox} moved to a new host", "connect again."),
    "org_deleted": ("your organization was removed", "contact your organization's owner."),
    "org_disabled": ("your organization was disabled", "contact your organization's owner."),
}


def access_ended(reason: str, **values: object) -> str:
    """The one stderr line a live session gets when revocation ends it."""
    values.setdefault("hint", "runtools ssh-key add ~/.ssh/id_ed25519.pub")
    what, next_step = _ACCESS_ENDED_BECAUSE.get(reason, ("access was withdrawn", "connect again."))
    return ACCESS_ENDED.render(
        sandbox=values.get("sandbox"),
        what=what.format(**values),
        next=next_step.format(**values),
    )
