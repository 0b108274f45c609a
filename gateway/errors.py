"""Exceptions raised by the gateway package.

GatewayError
 +-- ConfigError      a setting is missing or invalid; ``str(exc)`` names the key and the reason
 +-- UpstreamError    the sandbox's SSH endpoint could not be used; carries a reason code
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
