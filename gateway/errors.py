"""Exceptions raised by the gateway package.

GatewayError
 +-- ConfigError      a setting is missing or invalid; ``str(exc)`` names the key and the reason
 +-- UpstreamError    the sandbox's SSH endpoint could not be used: a reason code and technical
 |                    detail only; the user's text is rendered from gateway/messages.py at
 |                    the edge, once (gateway/ssh/channels.py)
 +-- IncompatibleLibrary  an installed library is not a version the gateway was verified on
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every gateway error."""


class ConfigError(GatewayError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config: {key}: {reason}")
        self.key = key
        self.reason = reason


class UpstreamError(GatewayError):
    def __init__(self, reason_code: str, detail: str) -> None:
        super().__init__(f"{reason_code}: {detail}")
        self.reason_code = reason_code
        self.detail = detail


class IncompatibleLibrary(GatewayError):
    """An installed library's version is not one the gateway was verified on; ``remedy`` says
    what to do (raised at start-up, e.g. by ``gateway.asyncssh_patches.apply()``)."""

    def __init__(self, library: str, found: str, verified: str, remedy: str) -> None:
        super().__init__(
            f"{library} {found} is installed but the gateway was verified on {library} "
            f"{verified}: {remedy}"
        )
        self.library = library
        self.found = found
        self.verified = verified
        self.remedy = remedy
